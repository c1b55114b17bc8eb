"""Training of the X-Scene triplane diffusion (occlab.models.xscene_diffusion.TriplaneDiT) on static town frames.

1. `encode_frames`: every window of the data split (frames of the VAE's run; each frame a static scene) is
   encoded by a trained X-Scene VAE (mu, or the planes without a Gaussian head) with its layout map and
   3D boxes (box rows of that frame, `boxes_condition` over the window's grid bounds).
2. `triplane_stats`: per plane and channel mean / std; the denoiser learns x = (h - mean) / std.
3. `train_triplane_diffusion`: AdamW, linear warm-up (`lr_at`), EMA (`ema_update`, `ema_decay_at`) as the
   HexPlane DiT trainer (same `DiTTrainConfig`), classifier-free guidance by dropping all conditions together
   with p = cond_dropout (0.25, inside TriplaneDiT), epsilon loss masked to plane cells; atomic checkpoints with
   exact resumption (model, EMA, optimiser, RNG, step; the batch of a step depends only on seed and step).
4. `load_triplane_diffusion` -> (vae, EMA denoiser, Diffusion, stats); `sample_scenes` samples and decodes.

The checkpoint records the DiT config, the latent statistics and the VAE checkpoint path, so
`occlab generate --model xscene --ckpt ...` needs nothing else.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from occlab import checkpoint
from occlab.diffusion import Diffusion, cfg_model
from occlab.errors import OcclabError
from occlab.models.xscene_diffusion import (
    TriplaneDiT,
    TriplaneDiTConfig,
    boxes_condition,
    config_for_vae,
    decode_labels,
    diffusion_loss,
    encode_latent,
)
from occlab.outpaint import _normalise
from occlab.train.config import DataConfig, from_dict
from occlab.train.dit_trainer import DiTTrainConfig, ema_decay_at, ema_update, lr_at

CKPT_KIND = "occlab-triplane-dit"
CONDITION_KEYS = ("layout", "boxes", "box_classes")


def window_bounds(data: DataConfig) -> tuple[tuple, tuple]:
    """Metric (min, max) bounds of the windows' grid (the centre crop when the data config crops)."""
    from occlab.data import get_geometry

    if data.crop_mode != "center":
        raise OcclabError(f"triplane diffusion needs crop_mode='center' (box bounds), got {data.crop_mode!r}")
    geo = get_geometry(data.geometry)
    if data.crop:
        geo = geo.crop(tuple(data.crop))
    return tuple(geo.min_bound), tuple(geo.max_bound)


@torch.no_grad()
def encode_frames(vae, data: DataConfig, split: str = "train", max_boxes: int = 16, batch_size: int = 8) -> dict:
    """{"planes": {plane: (N, C, a, b)}, "layout": (N, X, Y) long, "boxes": (N, M, 8, 3), "box_classes": (N, M),
    "labels": (N, X, Y, Z) uint8}: every frame of every window of `split` under the VAE (eval mode)."""
    from occlab.data import make_dataset

    ds = make_dataset(data.dataset, data.data_root, split, **data.source_options(split))
    lo, hi = window_bounds(data)
    vae.eval()
    labels, layouts, corners, classes = [], [], [], []
    for i in range(len(ds)):
        item = ds[i]
        for f in range(item["labels"].shape[0]):
            labels.append(item["labels"][f])
            layouts.append(item["layout"][f].long())
            c, k = boxes_condition(item["boxes"][f:f + 1], lo, hi, max_boxes)  # (1, M, 8, 3), (1, M)
            corners.append(c[0])
            classes.append(k[0])
    if not labels:
        raise OcclabError(f"the {split} split of {data.dataset} has no windows; give more sequences")
    labels = torch.stack(labels)
    planes: dict = {}
    for s in range(0, len(labels), batch_size):
        for n, v in encode_latent(vae, labels[s:s + batch_size].long()).items():
            planes.setdefault(n, []).append(v.float())
    return {"planes": {n: torch.cat(v) for n, v in planes.items()}, "layout": torch.stack(layouts),
            "boxes": torch.stack(corners), "box_classes": torch.stack(classes), "labels": labels.to(torch.uint8)}


def load_vae(vae_ckpt: str | os.PathLike):
    """(X-Scene VAE in eval mode, its DataConfig) from a checkpoint of the shared trainer."""
    from occlab.train.runs import build_model

    state = checkpoint.load(vae_ckpt)
    info = state.get("model_info", {})
    if info.get("name") != "xscene":
        raise OcclabError(f"{vae_ckpt}: not an X-Scene VAE checkpoint (model {info.get('name')!r}); train one with "
                          f"the shared trainer (model 'xscene')")
    vae = build_model("xscene", info["config"])
    vae.load_state_dict(state["model"])
    return vae.eval(), from_dict(DataConfig, state["data"])


def triplane_stats(planes: dict, floor: float = 1e-4) -> dict:
    """{"mean", "std": {plane: (C,)}} per plane and channel of {plane: (N, C, a, b)} (population std, floored)."""
    mean, std = {}, {}
    for n, v in planes.items():
        flat = v.double().transpose(0, 1).reshape(v.shape[1], -1)  # (C, N * a * b)
        mean[n], std[n] = flat.mean(1).float(), flat.std(1, unbiased=False).clamp_min(floor).float()
    return {"mean": mean, "std": std}


def run_key(dit: TriplaneDiTConfig, cfg: DiTTrainConfig, vae_ckpt: str | os.PathLike, data: DataConfig) -> str:
    """A stable id: hash of the DiT config, the training config (minus device/cadence), the VAE weights, data, code."""
    skip = ("device", "threads", "num_workers", "ckpt_every", "encode_batch")
    payload = json.dumps({"dit": asdict(dit), "train": {k: v for k, v in asdict(cfg).items() if k not in skip},
                          "vae": hashlib.sha1(Path(vae_ckpt).read_bytes()).hexdigest()[:12], "data": asdict(data),
                          "code": hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:10]},
                         sort_keys=True, default=list)
    return f"tdit-{hashlib.sha1(payload.encode()).hexdigest()[:12]}"


def _batch(frames: dict, idx: torch.Tensor, stats: dict) -> tuple[dict, dict]:
    planes = _normalise({n: v[idx] for n, v in frames["planes"].items()}, stats)
    return planes, {k: frames[k][idx] for k in CONDITION_KEYS}


def train_triplane_diffusion(vae_ckpt: str | os.PathLike, out_dir: str | os.PathLike,
                             dit: TriplaneDiTConfig | None = None, cfg: DiTTrainConfig | None = None, *,
                             preset: str = "tiny", data: DataConfig | None = None, progress: bool = False) -> dict:
    """Train (or resume, or return the finished run of) a TriplaneDiT on the VAE's latent frames -> metrics dict.

    dit: the denoiser config (default `config_for_vae(vae, preset)`); data: the frames (default: the VAE run's).
    Writes checkpoint.pt, log.csv (step, loss, lr, s_per_iter) and metrics.json into out_dir."""
    out = Path(out_dir)
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    cfg = cfg or DiTTrainConfig(steps=200, batch_size=8, lr=2e-4)
    if cfg.precision != "fp32":
        raise OcclabError(f"triplane diffusion training runs in fp32 only, got precision {cfg.precision!r}")
    vae, vae_data = load_vae(vae_ckpt)
    data = data or vae_data
    dit = dit or config_for_vae(vae.config, preset)
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    frames = encode_frames(vae, data, "train", dit.max_boxes)
    stats = triplane_stats(frames["planes"])
    torch.manual_seed(cfg.seed)
    model = TriplaneDiT(dit).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    diffusion = Diffusion(cfg.diffusion_steps)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.csv"
    step, rows = 0, []
    if ckpt_path.is_file():
        state = checkpoint.load(ckpt_path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"])
        step = int(state["step"])
        if log_path.is_file():
            with open(log_path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < step]

    def save(at: int) -> None:
        checkpoint.save_atomic({"kind": CKPT_KIND, "dit": asdict(dit), "train": asdict(cfg), "data": asdict(data),
                                "vae_ckpt": str(Path(vae_ckpt).resolve()), "stats": {k: {n: v.tolist() for n, v in d.items()} for k, d in stats.items()},
                                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                "rng": checkpoint.rng_state(), "step": at}, ckpt_path)
        with open(log_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "s_per_iter"])
            w.writeheader()
            w.writerows(rows)

    n = len(frames["labels"])
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the batch depends on seed and step only
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        planes, cond = _batch(frames, idx, stats)
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = diffusion_loss(model, diffusion, {k: v.to(device) for k, v in planes.items()},
                              {k: v.to(device) for k, v in cond.items()})
        if not torch.isfinite(loss):
            raise OcclabError(f"triplane diffusion loss became {loss.item()} at step {step}; the last good "
                              f"checkpoint is {ckpt_path}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, model, ema_decay_at(cfg, step))
        step += 1
        rows.append({"step": step - 1, "loss": loss.item(), "lr": lr, "s_per_iter": time.perf_counter() - t0})
        if progress and step % 50 == 0:
            print(f"step {step}/{cfg.steps} loss {loss.item():.4f}", flush=True)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save(step)
    losses = [float(r["loss"]) for r in rows]
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {"steps": step, "frames": n, "final_loss": sum(tail) / len(tail),
               "first_loss": sum(losses[:len(tail)]) / len(tail),
               "s_per_iter": sorted(float(r["s_per_iter"]) for r in rows)[len(rows) // 2]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def load_triplane_diffusion(ckpt: str | os.PathLike, ema: bool = True):
    """(vae, denoiser in eval mode, Diffusion, stats, DataConfig) from a triplane diffusion checkpoint."""
    state = checkpoint.load(ckpt)
    if state.get("kind") != CKPT_KIND:
        raise OcclabError(f"{ckpt}: not a triplane diffusion checkpoint (kind {state.get('kind')!r}); train one "
                          f"with occlab.train.triplane_diffusion.train_triplane_diffusion")
    vae_path = Path(state["vae_ckpt"])
    if not vae_path.is_file():
        raise OcclabError(f"{ckpt}: its VAE checkpoint {vae_path} is missing; put it back or retrain")
    vae, _ = load_vae(vae_path)
    model = TriplaneDiT(from_dict(TriplaneDiTConfig, state["dit"]))
    model.load_state_dict(state["ema" if ema else "model"])
    stats = {k: {n: torch.tensor(v) for n, v in state["stats"][k].items()} for k in ("mean", "std")}
    return vae, model.eval(), Diffusion(state["train"]["diffusion_steps"]), stats, from_dict(DataConfig, state["data"])


@torch.no_grad()
def sample_scenes(vae, model: TriplaneDiT, diffusion: Diffusion, stats: dict, cond: dict | None = None,
                  num: int = 1, *, steps: int = 50, guidance: float = 1.0, seed: int = 0) -> torch.Tensor:
    """`num` scenes (num, X, Y, Z) uint8: DDIM samples of the denoiser, denormalised and decoded by the VAE.
    cond: batched conditions of `num` scenes (or None: unconditional, every condition dropped)."""
    gen = torch.Generator().manual_seed(int(seed))
    cond = dict(cond or {})
    fn = cfg_model(model, cond, guidance) if cond else (lambda x, t: model(x, t, None, drop=True))
    shape = (num, model.config.channels, *model.layout.map_shape)
    x = diffusion.sample(fn, shape, method="ddim", steps=steps, generator=gen)
    planes = _normalise(model.from_map(x), stats, inverse=True)
    return decode_labels(vae, planes)


def _read_array(path: str | os.PathLike, key: str):
    """The array of a .npy file, or the one under `key` in a .npz; errors name the file and what it should hold."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise OcclabError(f"{p}: no such {key} file (want .npy, or .npz with a '{key}' array)")
    if p.suffix != ".npz":
        return np.load(p)
    with np.load(p) as npz:
        if key not in npz:
            raise OcclabError(f"{p}: no '{key}' array (keys {sorted(npz.keys())})")
        return npz[key]


def read_layout(path: str | os.PathLike) -> torch.Tensor:
    """A BEV layout map (X, Y) of integer classes from .npy, or .npz with key `layout` ((X, Y), or (T, X, Y) of an
    occlab sequence file: its first frame)."""
    import numpy as np

    arr = np.asarray(_read_array(path, "layout"))
    if arr.ndim == 3:
        arr = arr[0]
    if arr.ndim != 2:
        raise OcclabError(f"{Path(path)}: layout must be (X, Y) or (T, X, Y), got shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.int64))


def read_boxes(path: str | os.PathLike) -> torch.Tensor:
    """Box rows (M, 10) in BOX_FIELDS order from .npy, or .npz with key `boxes` (an occlab sequence file: the
    boxes of its first frame)."""
    import numpy as np

    from occlab.data import BOX_FIELDS

    arr = _read_array(path, "boxes")
    if Path(path).suffix == ".npz" and arr.ndim == 2 and len(arr):
        arr = arr[arr[:, 0] == 0]  # a sequence's first frame
    arr = np.asarray(arr, np.float32)
    if arr.ndim != 2 or arr.shape[1] != len(BOX_FIELDS):
        raise OcclabError(f"{Path(path)}: boxes must be (M, {len(BOX_FIELDS)}) rows {', '.join(BOX_FIELDS)}, "
                          f"got shape {arr.shape}")
    return torch.from_numpy(arr)


def outpaint_file(ckpt: str | os.PathLike, out: str | os.PathLike, chunks=(3, 3), layout: torch.Tensor | None = None,
                  boxes: torch.Tensor | None = None, *, overlap=None, steps: int = 50, seed: int = 0,
                  guidance: float = 1.0, resample: int = 0, voxel_size=(1.0, 1.0, 1.0),
                  min_bound=(0.0, 0.0, 0.0)) -> dict:
    """Outpaint a chunks[0] x chunks[1] map with a trained triplane diffusion and write it to `out` (.npz: labels
    (X_big, Y_big, Z) uint8, offsets (n, 4) rows i, j, x0, y0, agreement (k, 3) rows i, j, seam agreement).
    layout: the whole map's BEV (X_big, Y_big) (a smaller one is rejected with the size it needs); boxes: (M, 10)
    rows in the map's frame, whose origin corner is `min_bound` and voxels `voxel_size` (default: voxel units
    from the map's corner); each chunk is conditioned on the boxes whose centre it holds."""
    import numpy as np

    from occlab.outpaint import big_shape, outpaint

    vae, model, diffusion, stats, _ = load_triplane_diffusion(ckpt)
    if layout is not None and not model.config.layout_cond:
        raise OcclabError(f"{ckpt}: this denoiser was trained without the layout condition; drop --layout")
    if boxes is not None and not model.config.box_cond:
        raise OcclabError(f"{ckpt}: this denoiser was trained without the box condition; drop --boxes")
    shape = big_shape(vae.config.grid, chunks, overlap)
    if layout is not None and tuple(layout.shape) != tuple(shape[:2]):
        raise OcclabError(f"the layout is {tuple(layout.shape)}, a {chunks[0]}x{chunks[1]} map of {vae.config.grid} "
                          f"chunks needs ({shape[0]}, {shape[1]})")
    res = outpaint(vae, model, diffusion, layout, boxes, chunks, overlap, steps, seed, guidance=guidance, stats=stats,
                   details=True, resample=resample, voxel_size=voxel_size, min_bound=min_bound)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.array([[i, j, x, y] for (i, j), (x, y) in res.offsets.items()], np.int64)
    agreement = np.array([[i, j, a] for (i, j), a in res.agreement.items()], np.float64).reshape(-1, 3)
    np.savez_compressed(out, labels=res.labels.numpy(), offsets=offsets, agreement=agreement)
    return {"out": str(out), "shape": list(res.labels.shape), "chunks": list(chunks),
            "seam_agreement": float(agreement[:, 2].mean()) if len(agreement) else None}


__all__ = [
    "CKPT_KIND",
    "encode_frames",
    "load_triplane_diffusion",
    "load_vae",
    "outpaint_file",
    "read_boxes",
    "read_layout",
    "run_key",
    "sample_scenes",
    "train_triplane_diffusion",
    "triplane_stats",
    "window_bounds",
]
