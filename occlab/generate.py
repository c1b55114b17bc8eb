"""Sample 4D occupancy from a trained DiT (HexPlane, or OccSora's latent grid): latents by DDIM or DDPM (EMA weights,
optional classifier-free guidance and conditions), un-normalised with the training statistics, decoded by the VAE the DiT was trained on,
written as occlab npz files (`labels` uint8 (T, X, Y, Z)) that `occlab eval gen` and `occlab view` read.

Long sequences (`generate_long`, `occlab generate --frames N`): ceil(N / T) chunks of the VAE window T, chunk
k + 1 sampled with chunk k's sampled latent as its previous-HexPlane condition (the normalised map the DiT was
trained with as `previous`), decoded one by one and concatenated into one npz. Editing (inpainting,
outpainting) lives in occlab.editing.

Determinism: sample i's starting noise comes from its own generator (seeded by `seed` and i), so with DDIM at
eta 0 a sample does not depend on `n` or the batch size; DDPM (and DDIM with eta > 0) draw their per-step noise
from one generator per batch (seeded by `seed` and the batch's first index), so a (seed, n, batch_size) triple
fixes every sample.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from occlab.errors import OcclabError

SAMPLERS = ("ddim", "ddpm")


def _seeded(seed: int, i: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63 - 1))


def _per_sample(value, n: int, sample_dims: int, what: str) -> torch.Tensor:
    """A condition value for one sample (sample_dims dims) broadcast to n, or already (n, ...)."""
    t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    if t.dim() == sample_dims:
        return t[None].expand(n, *t.shape)
    if t.dim() == sample_dims + 1 and t.shape[0] == n:
        return t
    raise OcclabError(f"condition {what}: expected one value of {sample_dims} dims or {n} of them, got shape "
                      f"{tuple(t.shape)}")


def prepare_conditions(cond: Mapping | None, n: int, model, vae, stats: Mapping, geo: dict) -> dict:
    """User conditions -> the DiT's: command (int, name, or n of them), trajectory (T, 3), layout (T, X, Y) BEV
    classes per frame, previous ((T, X, Y, Z) labels of the window before, encoded with the VAE); each either
    one value for every sample or n values."""
    from occlab.models.dit import COMMANDS
    from occlab.train.latents import CONDITION_KEYS, encode_latent, layout_features, normalise

    cond = dict(cond or {})
    unknown = set(cond) - set(CONDITION_KEYS)
    if unknown:
        raise OcclabError(f"unknown conditions {sorted(unknown)}; expected some of {', '.join(CONDITION_KEYS)}")
    off = [k for k in cond if k not in model.config.conditions]
    if off:
        takes = ", ".join(model.config.conditions) or "no condition"
        raise OcclabError(f"the DiT was trained without the {', '.join(off)} condition; it takes {takes}")
    out = {}
    if "command" in cond:
        c = cond["command"]
        names = [c] if isinstance(c, (str, int, np.integer)) else list(c)
        ids = []
        for v in names:
            if isinstance(v, str):
                if v not in COMMANDS:
                    raise OcclabError(f"unknown command {v!r}; expected one of {', '.join(COMMANDS)}")
                v = COMMANDS.index(v)
            if not 0 <= int(v) < len(COMMANDS):
                raise OcclabError(f"command {v} outside 0..{len(COMMANDS) - 1} ({', '.join(COMMANDS)})")
            ids.append(int(v))
        out["command"] = _per_sample(torch.tensor(ids if len(ids) > 1 else ids[0]), n, 0, "command").long()
    if "trajectory" in cond:
        traj = _per_sample(cond["trajectory"], n, 2, "trajectory").float()
        if tuple(traj.shape[1:]) != (geo["frames"], 3):
            raise OcclabError(f"trajectory must be ({geo['frames']}, 3) per sample (dx, dy, dyaw per frame), got "
                              f"{tuple(traj.shape[1:])}")
        out["trajectory"] = traj
    if "layout" in cond:
        lay = _per_sample(cond["layout"], n, 3, "layout")
        if tuple(lay.shape[1:]) != (geo["frames"], *geo["grid"][:2]):
            raise OcclabError(f"layout must be BEV classes ({geo['frames']}, {geo['grid'][0]}, {geo['grid'][1]}) "
                              f"per sample, got {tuple(lay.shape[1:])}")
        out["layout"] = layout_features(lay, geo["num_classes"], geo["sizes"][1:3]).float()
    if "previous" in cond:
        labels = _per_sample(cond["previous"], n, 4, "previous")
        if tuple(labels.shape[1:]) != (geo["frames"], *geo["grid"]):
            raise OcclabError(f"previous must be the labels of the window before, "
                              f"{(geo['frames'], *geo['grid'])} per sample, got {tuple(labels.shape[1:])}")
        with torch.no_grad():
            mu = {}
            for i in range(n):  # one window at a time: the VAE's memory stays that of batch 1
                window = labels[i:i + 1].long().to(next(vae.parameters()).device)
                enc = encode_latent(vae, window, geo["kind"])
                for k, v in enc.items():
                    mu.setdefault(k, []).append(v.float())
        out["previous"] = model.layout.to_map(normalise({k: torch.cat(v) for k, v in mu.items()}, stats))
    return out


def poses_from_trajectory(traj: np.ndarray) -> np.ndarray:
    """(T, 3) per-frame (dx, dy, dyaw) in the previous ego frame -> (T, 4, 4) ego poses starting at the identity
    (the inverse of occlab.data.sequence.trajectory_from_poses for planar motion)."""
    poses = np.tile(np.eye(4), (len(traj), 1, 1))
    for t in range(1, len(traj)):
        dx, dy, dyaw = (float(v) for v in traj[t])
        rel = np.eye(4)
        rel[:2, :2] = [[np.cos(dyaw), -np.sin(dyaw)], [np.sin(dyaw), np.cos(dyaw)]]
        rel[:2, 3] = dx, dy
        poses[t] = poses[t - 1] @ rel
    return poses


def _slice(cond: dict, a: int, b: int, device) -> dict:
    return {k: v[a:b].to(device) for k, v in cond.items()}


@torch.no_grad()
def sample_latents(model, diffusion, n: int, *, steps: int = 50, sampler: str = "ddim", guidance: float = 1.0,
                   cond: Mapping | None = None, seed: int = 0, batch_size: int = 8, eta: float = 0.0,
                   device: str | torch.device = "cpu", progress: bool = False,
                   clip: float | None = None) -> torch.Tensor:
    """n normalised latent maps (n, C, H, W) of a DiT (conditions already in the DiT's form). `clip` bounds each
    step's x_0 prediction to [-clip, clip] (normalised units; None: unbounded)."""
    from occlab.diffusion import cfg_model

    if sampler not in SAMPLERS:
        raise OcclabError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    device = torch.device(device)
    C, (H, W) = model.config.channels, model.layout.map_shape
    cond = dict(cond or {})
    maps = []
    for a in tqdm(range(0, n, batch_size), desc=f"sample ({sampler})", disable=not progress, dynamic_ncols=True):
        b = min(n, a + batch_size)
        noise = torch.stack([torch.randn(C, H, W, generator=_seeded(seed, i)) for i in range(a, b)]).to(device)
        if model.config.conditions:  # no condition given: one pass of the unconditional model
            fn = cfg_model(model, _slice(cond, a, b, device), guidance if cond else 1.0)
        else:
            fn = model
        gen = _seeded(seed + 7_919, a)  # per-step noise of this batch
        if sampler == "ddim":
            x = diffusion.ddim_sample(fn, noise=noise, steps=steps, eta=eta, generator=gen, clip=clip)
        else:
            x = diffusion.ddpm_sample(fn, noise=noise, generator=gen, clip=clip)
        maps.append(x.float().cpu())
    return torch.cat(maps)


def load_generator(ckpt: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu") -> dict:
    """Everything sampling needs from a DiT checkpoint: {model, vae, state, stats, geo, rec, diffusion}, on
    `device`, checked against the VAE the DiT was trained on."""
    from occlab.diffusion import Diffusion
    from occlab.train.dit_trainer import load_dit
    from occlab.train.latents import latent_geometry, load_vae

    dev = torch.device(device)
    model, state = load_dit(ckpt, ema=ema)
    model.to(dev)
    vae_path = Path(state["vae_ckpt"])
    if not vae_path.is_file():
        raise OcclabError(f"the DiT {ckpt} was trained on the latents of VAE checkpoint {vae_path}, which no longer "
                          f"exists; its samples cannot be decoded without it")
    vae, rec = load_vae(vae_path, state["vae_fingerprint"])
    geo = latent_geometry(rec["info"]["config"])
    if (tuple(geo["sizes"]), geo["channels"]) != (tuple(model.config.sizes), model.config.channels):
        raise OcclabError(f"the VAE {vae_path} has latents {geo['sizes']} x {geo['channels']} channels, the DiT "
                          f"{tuple(model.config.sizes)} x {model.config.channels}")
    vae.to(dev)
    return {"model": model, "vae": vae, "state": state, "stats": state["stats"], "geo": geo, "rec": rec,
            "diffusion": Diffusion(int(state.get("diffusion_steps", 1000))), "device": dev}


@torch.no_grad()
def decode_maps(gen: dict, maps: torch.Tensor) -> np.ndarray:
    """Normalised latent maps (n, C, H, W) -> labels (n, T, X, Y, Z) uint8 by the generator's VAE."""
    from occlab.train.latents import decode_latent, denormalise

    out = []
    for i in range(len(maps)):
        planes = denormalise(gen["model"].layout.from_map(maps[i:i + 1].to(gen["device"])), gen["stats"])
        logits = decode_latent(gen["vae"], planes, gen["geo"]["kind"])  # (1, K, T, X, Y, Z)
        out.append(logits.argmax(1)[0].to(torch.uint8).cpu().numpy())  # (T, X, Y, Z)
    return np.stack(out)


def write_sample(gen: dict, labels: np.ndarray, path: Path, *, command: int = -1, trajectory=None,
                 seed: int = 0) -> Path:
    """One occlab npz (labels, all-visible mask, poses from the trajectory) written atomically."""
    from occlab.data.sequence import Sequence

    T = labels.shape[0]
    poses = poses_from_trajectory(trajectory) if trajectory is not None else np.tile(np.eye(4), (T, 1, 1))
    seq = Sequence(labels, np.ones(labels.shape, bool), poses, command,
                   None if trajectory is None else np.asarray(trajectory, np.float32),
                   geometry=gen["rec"]["data"].get("geometry", "carlasc"), seed=int(seed),
                   num_classes=gen["geo"]["num_classes"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    seq.save(tmp)
    os.replace(tmp, path)
    return path


def generate(ckpt: str | os.PathLike, n: int, out_dir: str | os.PathLike, *, steps: int = 50, sampler: str = "ddim",
             guidance: float = 1.0, cond: Mapping | None = None, seed: int = 0, batch_size: int = 8,
             eta: float = 0.0, device: str = "cpu", ema: bool = True, progress: bool = True,
             clip: float | None = None) -> list[Path]:
    """Sample n sequences with the (EMA) DiT of `ckpt`, decode them with its VAE, write `sample_00000.npz`, ...
    (occlab npz: labels uint8 (T, X, Y, Z), mask, poses, command, trajectory, layout) and `generate.json`.

    `steps`: DDIM steps (DDPM always runs all of the schedule's steps). `guidance`: classifier-free guidance
    scale (1: the conditional model, 0: the unconditional one). `cond`: see `prepare_conditions`. `clip`: bound
    on each step's x_0 prediction, in normalised latent units (None: unbounded).
    """
    if n < 1:
        raise OcclabError(f"n must be at least 1, got {n}")
    if sampler not in SAMPLERS:
        raise OcclabError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    gen = load_generator(ckpt, ema, device)
    model, state = gen["model"], gen["state"]
    dit_cond = prepare_conditions(cond, n, model, gen["vae"], gen["stats"], gen["geo"])
    maps = sample_latents(model, gen["diffusion"], n, steps=steps, sampler=sampler, guidance=guidance, cond=dit_cond,
                          seed=seed, batch_size=batch_size, eta=eta, device=gen["device"], progress=progress,
                          clip=clip)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(n), desc="decode", disable=not progress, dynamic_ncols=True):
        labels = decode_maps(gen, maps[i:i + 1])[0]
        traj = dit_cond["trajectory"][i].numpy() if "trajectory" in dit_cond else None
        command = int(dit_cond["command"][i]) if "command" in dit_cond else -1
        paths.append(write_sample(gen, labels, out / f"sample_{i:05d}.npz", command=command, trajectory=traj,
                                  seed=seed))
    meta = {"ckpt": str(Path(ckpt).resolve()), "vae_ckpt": str(state["vae_ckpt"]), "n": n, "steps": steps,
            "sampler": sampler, "eta": eta, "guidance": guidance, "seed": seed, "batch_size": batch_size,
            "ema": ema, "clip": clip, "conditions": sorted(dit_cond), "dit_step": int(state["step"]),
            "files": [p.name for p in paths]}
    (out / "generate.json").write_text(json.dumps(meta, indent=2))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Long sequences: chunk by chunk, each conditioned on the previous chunk's latent
# ---------------------------------------------------------------------------------------------------------

def chunk_conditions(cond: Mapping | None, chunks: int) -> list[dict]:
    """Per-chunk DiT conditions: a value (n, ...) used for every chunk, or a list of `chunks` of them."""
    cond = dict(cond or {})
    out = [{} for _ in range(chunks)]
    for k, v in cond.items():
        values = v if isinstance(v, (list, tuple)) else [v] * chunks
        if len(values) != chunks:
            raise OcclabError(f"condition {k}: {len(values)} values for {chunks} chunks")
        for c, value in zip(out, values):
            c[k] = value
    return out


@torch.no_grad()
def sample_long(model, diffusion, chunks: int, *, cond: Mapping | None = None, first_previous=None,
                steps: int = 50, sampler: str = "ddim", guidance: float = 1.0, seed: int = 0, eta: float = 0.0,
                device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """(chunks, C, H, W) normalised latent maps of one long sequence: chunk k + 1 is sampled with chunk k's
    latent as its `previous` condition (when the DiT takes it); chunk 0 with `first_previous` (a map, or none).
    `cond`: the DiT's conditions for one sample ((1, ...) each), or per chunk (see `chunk_conditions`)."""
    if chunks < 1:
        raise OcclabError(f"chunks must be at least 1, got {chunks}")
    takes_previous = "previous" in model.config.conditions
    per_chunk = chunk_conditions(cond, chunks)
    maps, prev = [], first_previous
    for k in tqdm(range(chunks), desc="chunks", disable=not progress, dynamic_ncols=True):
        c = dict(per_chunk[k])
        if takes_previous and prev is not None:
            c["previous"] = prev
        x = sample_latents(model, diffusion, 1, steps=steps, sampler=sampler, guidance=guidance, cond=c,
                           seed=seed * 1_009 + k, batch_size=1, eta=eta, device=device)
        maps.append(x)
        prev = x
    return torch.cat(maps)


def generate_long(ckpt: str | os.PathLike, frames: int, out: str | os.PathLike, *, steps: int = 50,
                  sampler: str = "ddim", guidance: float = 1.0, cond: Mapping | None = None, seed: int = 0,
                  eta: float = 0.0, device: str = "cpu", ema: bool = True, progress: bool = True) -> Path:
    """One sequence of `frames` frames, longer than the VAE window T, chunk by chunk (ceil(frames / T) chunks,
    each conditioned on the previous chunk's latent), decoded and concatenated into one npz at `out` (a file,
    or a folder that gets `long_00000.npz`). `cond` as in `generate` (one value for every chunk; `previous`
    labels start the first chunk); a trajectory repeats per chunk and becomes the poses of the whole sequence."""
    gen = load_generator(ckpt, ema, device)
    model, T = gen["model"], gen["geo"]["frames"]
    if frames < 1:
        raise OcclabError(f"frames must be at least 1, got {frames}")
    if "previous" not in model.config.conditions:
        raise OcclabError(f"the DiT {ckpt} was trained without the previous-window condition, so its chunks would "
                          f"not follow each other; train one with conditions including previous")
    chunks = -(-frames // T)
    dit_cond = prepare_conditions(cond, 1, model, gen["vae"], gen["stats"], gen["geo"])
    first = dit_cond.pop("previous", None)
    maps = sample_long(model, gen["diffusion"], chunks, cond=dit_cond, first_previous=first, steps=steps,
                       sampler=sampler, guidance=guidance, seed=seed, eta=eta, device=gen["device"],
                       progress=progress)
    labels = np.concatenate(list(decode_maps(gen, maps)))[:frames]
    traj = None
    if "trajectory" in dit_cond:
        traj = np.concatenate([dit_cond["trajectory"][0].numpy()] * chunks)[:frames]
    command = int(dit_cond["command"][0]) if "command" in dit_cond else -1
    path = Path(out)
    if path.suffix != ".npz":
        path = path / "long_00000.npz"
    write_sample(gen, labels, path, command=command, trajectory=traj, seed=seed)
    meta = {"ckpt": str(Path(ckpt).resolve()), "frames": frames, "chunks": chunks, "window": T, "steps": steps,
            "sampler": sampler, "guidance": guidance, "seed": seed, "conditions": sorted(dit_cond),
            "file": path.name}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


__all__ = ["SAMPLERS", "chunk_conditions", "decode_maps", "generate", "generate_long", "load_generator",
           "poses_from_trajectory", "prepare_conditions", "sample_latents", "sample_long", "write_sample"]
