"""Latents of a dataset, cached on disk for DiT training (DynamicCity's second stage, OccSora's generator).

`encode_latents(vae_ckpt)` encodes every window of the train split (and others) with a trained VAE (eval mode)
and writes one file per split, `<split>.pt`, atomically. Two latent kinds (`LATENT_KINDS`, by VAE model):
"hexplane" (DynamicCity: the posterior mean mu, six planes) and "grid" (OccSora: the quantised latent, the code
vectors of its tokens, one entry {"grid": (N, D, T', X', Y')}; decoded by snapping each vector to its nearest
code first, `decode_latent`). Everything below holds for both; "planes" names the latent's entries.

- `planes` {tx, ty, tz, xy, xz, yz: (N, C, a, b) float32} (or {grid: (N, D, T', X', Y')}): the raw latents;
- the conditions of each window: `command` (N,) long, `trajectory` (N, T, 3) float32 (per-frame dx, dy, dyaw of
  the window's own poses), `layout` (N, K, X', Y') float16 (the fraction of the window's frames and of the
  (dX x dY) BEV cells under each latent cell whose top class is k: the BEV map per frame, one-hot, averaged
  over time and pooled to the latent xy grid), `previous` (N,) long: the index of the window that ends right
  before this one in the same scene (-1 where the split has none);
- `stats` {mean, std: {plane: (C,)}}: per plane and channel, over every cell of every *train* window; the same
  train statistics are stored in (and applied to) every split;
- `vae` {ckpt, fingerprint, model_info, data}: which VAE (the fingerprint hashes its weights) encoded which data.

A cache is reused while its VAE weights, data options and format version match, and re-encoded otherwise (a
corrupt file too). `LatentDataset` reads one split: items {"x": normalised map of a token layout (or planes),
"cond": {command, trajectory, layout, previous}, "has_previous": bool}.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from occlab import checkpoint
from occlab.errors import OcclabError
from occlab.models.grid_latent import GRID, LATENT_NAME, token_layout
from occlab.planes import AXES, PLANES, plane_shapes

CACHE_KIND = "occlab-latents"
CACHE_VERSION = 1
HEXPLANE_MODELS = ("dynamiccity",)  # VAEs whose latent is a HexPlane the DiT can take
LATENT_KINDS = {"dynamiccity": "hexplane", "occsora": "grid"}  # VAE model -> the latent kind the DiT takes
CONDITION_KEYS = ("command", "trajectory", "layout", "previous")
STD_FLOOR = 1e-6  # a channel that never varies is divided by this instead of zero


# ---------------------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------------------

def vae_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a model's weights (names, shapes, dtypes and values), independent of the file."""
    h = hashlib.sha1()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _missing_vae(path: Path) -> OcclabError:
    return OcclabError(f"VAE checkpoint {path}: no such file; train a HexPlane VAE first (e.g. `occlab train vae "
                       f"--model dynamiccity --preset smoke --out DIR`, which writes DIR/checkpoint.pt)")


def read_vae_checkpoint(path: str | os.PathLike) -> dict:
    """The trainer checkpoint of a HexPlane VAE, checked: {state, info, data, fingerprint}."""
    path = Path(path)
    if not path.is_file():
        raise _missing_vae(path)
    state = checkpoint.load(path)
    info = state.get("model_info") if isinstance(state, dict) else None
    if not info or "model" not in state or "data" not in state:
        raise OcclabError(f"{path}: not a VAE checkpoint of `occlab train vae` (keys {sorted(state)[:8]})")
    if info.get("name") not in LATENT_KINDS:
        raise OcclabError(f"{path}: a {info.get('name')!r} model has no latent the DiT takes; the DiT needs one of "
                          f"{tuple(LATENT_KINDS)}")
    return {"state": state, "info": info, "data": state["data"], "fingerprint": vae_fingerprint(state["model"])}


def load_vae(path: str | os.PathLike, fingerprint: str | None = None):
    """(VAE in eval mode, its record) from a checkpoint; `fingerprint` (when given) must match its weights."""
    from occlab.train.runs import build_model

    rec = read_vae_checkpoint(path)
    if fingerprint is not None and rec["fingerprint"] != fingerprint:
        raise OcclabError(f"VAE checkpoint {path} has changed since its latents were encoded (weights "
                          f"{rec['fingerprint']}, expected {fingerprint}); its latents no longer decode. Use the "
                          f"VAE checkpoint the DiT was trained with, or re-encode and retrain the DiT")
    model = build_model(rec["info"]["name"], rec["info"]["config"])
    model.load_state_dict(rec["state"]["model"])
    return model.eval(), rec


def latent_geometry(vae_config) -> dict:
    """{kind, sizes, channels, frames, grid, num_classes} of a VAE config (object or dict): a HexPlane VAE's sizes
    (T', X', Y', Z') and latent channels, or an OccSora tokenizer's (kind "grid") sizes (T', X', Y') and code width."""
    get = (lambda k: vae_config[k]) if isinstance(vae_config, Mapping) else (lambda k: getattr(vae_config, k))
    has = (lambda k: k in vae_config) if isinstance(vae_config, Mapping) else (lambda k: hasattr(vae_config, k))
    frames, grid = int(get("frames")), tuple(int(v) for v in get("grid"))
    if has("rates"):
        kind, rates, channels = "hexplane", tuple(int(v) for v in get("rates")), int(get("latent_channels"))
        sizes = tuple(n // r for n, r in zip((frames, *grid), rates))
    else:  # OccSora: rates (dT, dX, dY), height folded into channels
        kind, rates, channels = "grid", tuple(int(v) for v in get("downsample")), int(get("code_dim"))
        sizes = tuple(n // r for n, r in zip((frames, *grid[:2]), rates))
    return {"kind": kind, "sizes": sizes, "channels": channels, "frames": frames, "grid": grid,
            "num_classes": int(get("num_classes"))}


def latent_names(kind: str) -> tuple[str, ...]:
    """The entries of a latent of `kind`: the six planes, or ("grid",)."""
    return PLANES if kind == "hexplane" else (LATENT_NAME,)


def latent_shapes(geo: Mapping) -> dict[str, tuple[int, ...]]:
    """{entry: shape without batch} of the latent of a geometry (latent_geometry)."""
    if geo.get("kind", "hexplane") == "grid":
        return {LATENT_NAME: (geo["channels"], *geo["sizes"])}
    return {n: (geo["channels"], *ab) for n, ab in _plane_shapes(geo["sizes"]).items()}


def encode_latent(model, labels: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """labels (B, T, X, Y, Z) -> the latent the DiT learns: HexPlane mu {plane: (B, C, a, b)}, or OccSora's
    quantised latent {"grid": (B, D, T', X', Y')}."""
    from occlab.train.trainer import model_input

    if kind == "grid":
        return {LATENT_NAME: model.encode(model_input(labels))["latent"]}
    return model.encode(model_input(labels))["mu"]


def decode_latent(model, latent: Mapping[str, torch.Tensor], kind: str) -> torch.Tensor:
    """A (sampled) latent -> logits (B, K, T, X, Y, Z). A grid latent is snapped to its nearest codes first (OccSora's
    decoder was trained on code vectors only)."""
    if kind == "grid":
        z = latent[LATENT_NAME]  # (B, D, T', X', Y')
        B, D, T, X, Y = z.shape
        idx = model.quantizer.nearest(z.float().permute(0, 2, 3, 4, 1).reshape(-1, D))  # (B*T'*X'*Y',)
        return model.decode_indices(idx.view(B, T, X, Y))
    return model.decode(latent)


# ---------------------------------------------------------------------------------------------------------
# Conditions and normalisation
# ---------------------------------------------------------------------------------------------------------

def layout_features(layout: torch.Tensor, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """BEV maps per frame (..., T, X, Y) integer -> (..., K, X', Y') float: for each latent xy cell the fraction
    of frames and BEV cells whose top class is k (values >= K count for no class)."""
    layout = torch.as_tensor(layout)
    if layout.is_floating_point() or layout.dim() < 3:
        raise OcclabError(f"layout must be integer BEV maps (T, X, Y) or (N, T, X, Y), got {layout.dtype} "
                          f"{tuple(layout.shape)}")
    lead, (T, X, Y) = layout.shape[:-3], layout.shape[-3:]
    flat = layout.reshape(-1, T, X, Y).long()
    onehot = (flat[:, :, None] == torch.arange(num_classes, device=flat.device)[None, None, :, None, None])
    frac = onehot.float().mean(1)  # (M, K, X, Y)
    if (X, Y) != tuple(size):
        if X % size[0] or Y % size[1]:
            raise OcclabError(f"layout of {X}x{Y} cells cannot be pooled to the latent's {size[0]}x{size[1]}")
        frac = F.adaptive_avg_pool2d(frac, tuple(size))
    return frac.reshape(*lead, num_classes, *size)


def normalise(planes: Mapping[str, torch.Tensor], stats: Mapping) -> dict[str, torch.Tensor]:
    """(planes - mean) / std per entry and channel; planes (C, a, b) or (B, C, a, b) (a grid: (C, T, X, Y) or
    (B, C, T, X, Y)); the entries are those of `stats`."""
    return {n: (planes[n] - _bc(stats["mean"][n], n, planes[n])) / _bc(stats["std"][n], n, planes[n])
            for n in stats["mean"]}


def denormalise(planes: Mapping[str, torch.Tensor], stats: Mapping) -> dict[str, torch.Tensor]:
    """Inverse of `normalise`."""
    return {n: planes[n] * _bc(stats["std"][n], n, planes[n]) + _bc(stats["mean"][n], n, planes[n])
            for n in stats["mean"]}


def _bc(v: torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
    cells = 3 if name == LATENT_NAME else 2  # spatial axes after the channel
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *[1] * cells)


def plane_stats(planes: Mapping[str, torch.Tensor]) -> dict:
    """Mean and (population) std per entry and channel of {name: (N, C, ...)}, in float64 then float32."""
    mean, std = {}, {}
    for n in planes:
        v = planes[n].double().transpose(0, 1).reshape(planes[n].shape[1], -1)  # (C, N * cells)
        mean[n] = v.mean(1).float()
        std[n] = v.std(1, unbiased=False).clamp_min(STD_FLOOR).float()
    return {"mean": mean, "std": std, "windows": int(next(iter(planes.values())).shape[0])}


# ---------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------

def cache_dir(vae_ckpt: str | os.PathLike, fingerprint: str, data_options: Mapping | None = None) -> Path:
    """Default home of a VAE's latents: beside its checkpoint, under a hash of its weights and data options."""
    key = json.dumps({"vae": fingerprint, "data": dict(data_options or {}), "v": CACHE_VERSION}, sort_keys=True)
    return Path(vae_ckpt).resolve().parent / "latents" / hashlib.sha1(key.encode()).hexdigest()[:10]


def previous_windows(dataset) -> torch.Tensor:
    """(N,) long: index of the window that ends right before each one in the same scene (-1: none)."""
    index = getattr(dataset, "index", None)
    n = len(dataset)
    if index is None:
        return torch.full((n,), -1, dtype=torch.long)
    where = {tuple(int(v) for v in key): i for i, key in enumerate(index)}
    span = int(dataset.frames) * int(getattr(dataset, "skip", 1))
    return torch.tensor([where.get((int(s), int(start) - span), -1) for s, start in index], dtype=torch.long)


@torch.no_grad()
def _encode_split(model, dataset, geo: dict, device: torch.device, batch_size: int, progress: bool, what: str) -> dict:
    n = len(dataset)
    if n == 0:
        raise OcclabError(f"{what}: the split has no windows")
    shapes = latent_shapes(geo)
    planes = {name: [] for name in shapes}
    command, trajectory, layout = [], [], []
    X, Y = geo["sizes"][1:3]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    bar = tqdm(total=n, desc=f"encode {what}", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        labels = batch["labels"]
        if tuple(labels.shape[1:]) != (geo["frames"], *geo["grid"]):
            raise OcclabError(f"{what}: windows of shape {tuple(labels.shape[1:])} do not fit the VAE, which "
                              f"takes (T, X, Y, Z) = {(geo['frames'], *geo['grid'])}")
        mu = encode_latent(model, labels.to(device).long(), geo["kind"])
        for name in shapes:
            planes[name].append(mu[name].float().cpu())
        command.append(batch["command"].long().reshape(-1))
        trajectory.append(batch["trajectory"].float())
        layout.append(layout_features(batch["layout"], geo["num_classes"], (X, Y)).half())
        bar.update(len(labels))
    bar.close()
    out = {name: torch.cat(v) for name, v in planes.items()}
    for name, want in shapes.items():
        if tuple(out[name].shape[1:]) != want:
            raise OcclabError(f"{what}: the VAE encodes {name} as {tuple(out[name].shape[1:])}, its config "
                              f"says {want}")
    index = getattr(dataset, "index", None)
    windows = torch.tensor(index, dtype=torch.long) if index is not None else torch.arange(n)[:, None]
    return {"planes": out, "command": torch.cat(command), "trajectory": torch.cat(trajectory),
            "layout": torch.cat(layout), "previous": previous_windows(dataset), "windows": windows}


def _plane_shapes(sizes) -> dict[str, tuple[int, int]]:
    return plane_shapes(dict(zip(AXES, sizes)), AXES)


def read_cache(path: str | os.PathLike, mmap: bool = True) -> dict:
    """A latent cache file, checked for its kind and version (OcclabError if missing or corrupt)."""
    path = Path(path)
    if not path.is_file():
        raise OcclabError(f"latent cache {path}: no such file; write it with `encode_latents(vae_ckpt)` "
                          f"(`occlab train dit` does it for you)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, foreign or not a zip file
        raise OcclabError(f"latent cache {path} is corrupt or not a latent cache ({type(e).__name__}: {e}); "
                          f"delete it and encode again (encode_latents(..., force=True))") from None
    if not isinstance(data, dict) or data.get("kind") != CACHE_KIND:
        raise OcclabError(f"{path}: not an occlab latent cache (kind {data.get('kind') if isinstance(data, dict) else type(data).__name__!r})")
    if data.get("version") != CACHE_VERSION:
        raise OcclabError(f"{path}: latent cache version {data.get('version')}, this occlab reads {CACHE_VERSION}; "
                          f"encode again")
    missing = [k for k in ("planes", "stats", "vae", "command", "trajectory", "layout", "previous") if k not in data]
    if missing or sorted(data["planes"]) != sorted(latent_names(data.get("latent_kind", "hexplane"))):
        raise OcclabError(f"latent cache {path} is incomplete (missing {missing or 'planes'}); encode again")
    return data


def _valid(path: Path, split: str, fingerprint: str, data_options: dict) -> bool:
    try:
        data = read_cache(path)
    except OcclabError:
        return False
    return (data["split"] == split and data["vae"]["fingerprint"] == fingerprint
            and data["vae"].get("data_options", {}) == data_options)


def encode_latents(vae_ckpt: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                   splits: Sequence[str] = ("train", "val"), *, device: str = "cpu", batch_size: int = 8,
                   data_options: Mapping | None = None, force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Encode `splits` (train always, for the statistics) with the VAE of `vae_ckpt` -> {split: cache file}.

    `data_options` override the VAE's data options for these windows (e.g. {"seq_len": 48} for longer
    synthetic-town scenes, so that windows have a previous window). Valid caches are reused unless `force`.
    """
    from occlab.data import make_dataset
    from occlab.train.config import DataConfig, from_dict
    from occlab.train.runs import load_trained

    rec = read_vae_checkpoint(vae_ckpt)
    opts = dict(data_options or {})
    out = Path(out_dir) if out_dir is not None else cache_dir(vae_ckpt, rec["fingerprint"], opts)
    splits = ["train", *[s for s in dict.fromkeys(splits) if s != "train"]]
    paths = {s: out / f"{s}.pt" for s in splits}
    todo = [s for s in splits if force or not _valid(paths[s], s, rec["fingerprint"], opts)]
    if not todo:
        return paths
    if "train" in todo:  # new train statistics: every split is normalised with them
        todo = splits
    geo = latent_geometry(rec["info"]["config"])
    data = from_dict(DataConfig, rec["data"])
    dev = torch.device(device)
    order = (["train"] if "train" in todo else []) + [s for s in todo if s != "train"]
    model, _, first = load_trained(vae_ckpt, order[0])  # the VAE in eval mode and the windows of a split
    model.to(dev)
    stats = None if "train" in todo else read_cache(paths["train"])["stats"]
    encoded = {}
    for split in order:
        if split == order[0] and not opts:
            dataset = first
        else:
            dataset = make_dataset(data.dataset, data.data_root, split, **{**data.source_options(split), **opts})
        enc = _encode_split(model, dataset, geo, dev, batch_size, progress, f"{split} split")
        if split == "train":
            stats = plane_stats(enc["planes"])
        encoded[split] = enc
    for split, enc in encoded.items():
        checkpoint.save_atomic({
            "kind": CACHE_KIND, "version": CACHE_VERSION, "split": split, **enc, "stats": stats,
            "latent_kind": geo["kind"],
            "sizes": list(geo["sizes"]), "channels": geo["channels"], "frames": geo["frames"],
            "grid": list(geo["grid"]), "num_classes": geo["num_classes"],
            "vae": {"ckpt": str(Path(vae_ckpt).resolve()), "fingerprint": rec["fingerprint"],
                    "model_info": rec["info"], "data": rec["data"], "data_options": opts},
        }, paths[split])
    return paths


# ---------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------

class LatentDataset(Dataset):
    """Normalised latents (HexPlane or grid) of one split with their conditions.

    `rollout` "pro" | "unfold" | "vconcat" (a HexPlane cache) or "grid" (a grid cache): x is the layout's map
    (C, H, W) (`patch_size` as the DiT's); None: x is the latent {name: (C, a, b)} ({"grid": (C, T', X', Y')}). `conditions` limits which conditions items carry. Items:
    {"x", "cond": {"command": () long, "trajectory": (T, 3), "layout": (K, X', Y'), "previous": like x (zeros
    when there is none)}, "has_previous": () bool, "index": () long}.
    """

    def __init__(self, path: str | os.PathLike, rollout: str | None = "pro", patch_size: int = 2,
                 conditions: Sequence[str] = CONDITION_KEYS):
        self.path = Path(path)
        data = read_cache(self.path)
        unknown = set(conditions) - set(CONDITION_KEYS)
        if unknown:
            raise OcclabError(f"unknown conditions {sorted(unknown)}; expected some of {CONDITION_KEYS}")
        self.conditions = tuple(c for c in CONDITION_KEYS if c in conditions)
        self.split, self.vae, self.stats = data["split"], data["vae"], data["stats"]
        self.sizes, self.channels = tuple(data["sizes"]), int(data["channels"])
        self.frames, self.num_classes, self.grid = int(data["frames"]), int(data["num_classes"]), tuple(data["grid"])
        self.planes, self.kind = data["planes"], data.get("latent_kind", "hexplane")
        self.names = latent_names(self.kind)
        n = int(self.planes[self.names[0]].shape[0])
        for name in self.names:
            if self.planes[name].shape[0] != n:
                raise OcclabError(f"latent cache {self.path} is inconsistent: plane {name} has "
                                  f"{self.planes[name].shape[0]} windows, {self.names[0]} has {n}; encode again")
        self.command, self.trajectory = data["command"], data["trajectory"]
        self.layout_maps, self.previous = data["layout"], data["previous"]
        self.windows = data.get("windows")
        if rollout is not None and (rollout == GRID) != (self.kind == "grid"):
            raise OcclabError(f"latent cache {self.path} holds {self.kind} latents; the token layout {rollout!r} "
                              f"takes {'grid' if rollout == GRID else 'hexplane'} latents (grid latents take the "
                              f"layout 'grid', HexPlanes 'pro', 'unfold' or 'vconcat')")
        self.rollout = rollout
        self.layout = token_layout(rollout, self.sizes, patch_size) if rollout is not None else None

    def __len__(self) -> int:
        return int(self.planes[self.names[0]].shape[0])

    @property
    def has_previous(self) -> torch.Tensor:
        """(N,) bool: which windows have a previous window in this split."""
        return self.previous >= 0

    def check(self, dit_config) -> None:
        """Raise unless the DiT config takes these latents (sizes, channels, trajectory frames, layout classes)."""
        want = (tuple(int(v) for v in dit_config.sizes), int(dit_config.channels))
        if want != (self.sizes, self.channels):
            axes = "(T', X', Y')" if self.kind == "grid" else "(T', X', Y', Z')"
            raise OcclabError(f"latent cache {self.path} holds {self.kind} latents of sizes {axes} = {self.sizes} "
                              f"with {self.channels} channels, the DiT expects {want[0]} with {want[1]}: encode "
                              f"with the VAE the DiT was sized for (config_for_vae)")
        if dit_config.trajectory_cond and dit_config.frames != self.frames:
            raise OcclabError(f"the DiT's trajectory condition takes {dit_config.frames} frames, the latents' "
                              f"windows have {self.frames}")
        if dit_config.layout_cond and dit_config.layout_channels != self.num_classes:
            raise OcclabError(f"the DiT's layout condition takes {dit_config.layout_channels} classes, the latents "
                              f"carry {self.num_classes}")

    def raw_planes(self, i: int) -> dict[str, torch.Tensor]:
        """Window i's un-normalised planes {name: (C, a, b)}."""
        return {n: self.planes[n][i] for n in self.names}

    def planes_of(self, i: int) -> dict[str, torch.Tensor]:
        """Window i's normalised planes {name: (C, a, b)}."""
        return normalise(self.raw_planes(i), self.stats)

    def _x(self, i: int):
        p = self.planes_of(i)
        return self.layout.to_map({n: v[None] for n, v in p.items()})[0] if self.layout is not None else p

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        x = self._x(i)
        cond: dict = {}
        if "command" in self.conditions:
            cond["command"] = self.command[i].long()
        if "trajectory" in self.conditions:
            cond["trajectory"] = self.trajectory[i].float()
        if "layout" in self.conditions:
            cond["layout"] = self.layout_maps[i].float()
        prev = int(self.previous[i])
        if "previous" in self.conditions:
            cond["previous"] = self._x(prev) if prev >= 0 else (
                torch.zeros_like(x) if self.layout is not None else {n: torch.zeros_like(v) for n, v in x.items()})
        return {"x": x, "cond": cond, "has_previous": torch.tensor(prev >= 0), "index": torch.tensor(i)}


def stats_to_json(stats: Mapping) -> dict:
    """The statistics as plain lists (for reports)."""
    return {k: ({n: [float(x) for x in np.asarray(v[n])] for n in v} if isinstance(v, Mapping) else v)
            for k, v in stats.items()}


__all__ = ["CACHE_VERSION", "CONDITION_KEYS", "HEXPLANE_MODELS", "LATENT_KINDS", "LatentDataset", "cache_dir",
           "decode_latent", "denormalise", "encode_latent", "encode_latents", "latent_geometry", "latent_names",
           "latent_shapes", "layout_features", "load_vae", "normalise", "plane_stats",
           "previous_windows", "read_cache", "read_vae_checkpoint", "stats_to_json", "vae_fingerprint"]
