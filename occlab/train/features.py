"""The fixed recipe that trains the generation-metric networks of a dataset (3D sparse-conv f3d, 2D CNN f2d).

Recipe v1 (change it only together with features3d.VERSION, since every cached checkpoint depends on it):
- Data: single frames of the train split, every `frame_stride`-th (4) frame of each scene (synthetic town: 192
  sequences of 16 frames = 768 frames), at most `max_frames`, held in memory; validation on 16 scenes of the
  val split.
- Attribute (the IS head's target): traffic density (light / medium / heavy, 3 classes) for the synthetic town
  and CarlaSC (from the scene folder name); other datasets train the autoencoder alone and report no IS. The
  town's ego command is not identifiable from one frame (measured: command x density, 12 classes, 600 steps
  on 768 frames at a 64x64x8 crop: validation accuracy 0.09, chance; density alone: 0.59 with the head as a
  linear probe, 0.67 trained jointly), so it is available (`attribute=`) but not the default.
- Optimisation: Adam, lr 1e-3, batch 8, `steps` steps (default 600), seed 0, fp32. f3d loss = soft block
  cross-entropy (autoencoder) + attribute cross-entropy of the head applied to the detached features (a linear
  probe: the features stay the autoencoder's); f2d loss = attribute cross-entropy on the renders (occlab.render.
  semantic views BEV/front/rear at 128 px). On CPU the sparse network trains on one thread (features3d).
  Measured on 2 shared CPU cores: about 0.3 s a step at a 64x64x8 crop (3 minutes), 0.7 s at 128x128x8.
- Crops: `crop` trains on the study grids, centred on the ego (`crop_mode="center"`) or anywhere in the grid
  ("spread", cached as <geometry>-spread; pass its path as `weights=` to the metrics).
- Output: $OCCLAB_CACHE/metrics/<kind>-<dataset>-v1/<geometry>-<X>x<Y>x<Z>.pt (default ~/.cache/occlab) and a
  `.csv` loss log beside it (step, loss, recon, cls, acc, seconds; the last row is the validation). An existing
  checkpoint is reused unless force=True. A CUDA device trains on the GPU when spconv is a CUDA build.
"""
from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from occlab.errors import OcclabError
from occlab.metrics import features2d, features3d
from occlab.render.semantic import VIEWS, render_views, to_uint8

ATTRIBUTES = {"density": 3, "command": 4, "command x density": 12, "none": 0}  # name -> number of classes
DEFAULT_ATTRIBUTE = {"synthetic_town": "density", "carlasc": "density"}  # others: "none"


def scene_attribute(seq, attribute: str) -> int:
    """The IS class of a Sequence (-1 if unknown): traffic density, ego command, or both (command * 3 + density)."""
    if attribute == "density":
        return seq.density
    if attribute == "command":
        return seq.command
    if attribute == "command x density":
        return seq.command * 3 + seq.density if seq.density >= 0 else -1
    return -1


def _attribute(dataset: str, attribute: str | None) -> tuple[str, int]:
    """The attribute of a run and its number of classes (commands exist only in the synthetic town)."""
    name = attribute or DEFAULT_ATTRIBUTE.get(dataset, "none")
    if name not in ATTRIBUTES:
        raise OcclabError(f"unknown attribute {name!r}; expected one of {', '.join(ATTRIBUTES)}")
    if "command" in name and dataset != "synthetic_town":
        raise OcclabError(f"{dataset} has no ego command; use attribute 'density' or 'none'")
    return name, ATTRIBUTES[name]


def _options(dataset: str, split: str, geometry: str, sequences: int) -> dict:
    """make_dataset options: the town needs its geometry and size, the readers know their own."""
    if dataset == "synthetic_town":
        return {"geometry": geometry, "num_sequences": sequences, "seq_len": 16}
    return {}


def windows(dataset: str = "synthetic_town", data_root: str | None = None, split: str = "train",
            geometry: str = "carlasc", crop: tuple[int, int, int] | None = None, sequences: int = 64,
            frame_stride: int = 2, crop_mode: str = "center"):
    """Single-frame windows of one split (every `frame_stride`-th frame of each scene)."""
    from occlab.data import make_dataset

    return make_dataset(dataset, data_root, split, frames=1, stride=frame_stride, crop=crop, crop_mode=crop_mode,
                        **_options(dataset, split, geometry, sequences))


def load_frames(ds, attribute: str, max_frames: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """At most `max_frames` evenly spaced frames (N,X,Y,Z) uint8 of a window dataset and their attributes (N,)."""
    pick = np.unique(np.linspace(0, len(ds) - 1, min(len(ds), max_frames)).round().astype(int))
    labels, attrs = [], []
    for i in pick:
        seq = ds.window(int(i))
        labels.append(torch.from_numpy(np.ascontiguousarray(seq.labels[0])))
        attrs.append(scene_attribute(seq, attribute))
    return torch.stack(labels), torch.tensor(attrs)


def _target(kind: str, dataset: str, ds, crop, out) -> tuple[Path, str, tuple[int, int, int]]:
    """Checkpoint path, geometry name and grid of a training run ("spread" crops are cached apart)."""
    geo = ds.source.geometry
    grid = tuple(crop) if crop else tuple(geo.grid)
    key = geo.name + ("-spread" if crop and ds.crop_mode == "spread" else "")
    return (Path(out) if out else features3d.checkpoint_path(kind, dataset, key, grid)), geo.name, grid


def _fit(model: torch.nn.Module, data: torch.Tensor, attrs: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor],
         steps: int, batch_size: int, lr: float, device: str, log: Path, desc: str, guard: bool,
         progress: bool) -> dict:
    """Adam on random batches; a CSV loss log; returns the validation means."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr)
    gen = torch.Generator().manual_seed(0)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "recon", "cls", "acc", "seconds"])
        model.train()
        for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress):
            idx = torch.randint(len(data), (batch_size,), generator=gen)
            x, a = data[idx].to(device), attrs[idx].to(device)
            with features3d.single_thread(device, guard):
                out = model.loss(x, a)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
            opt.step()
            w.writerow([step] + [_num(out.get(k)) for k in ("loss", "recon", "cls", "acc")]
                       + [round(time.perf_counter() - start, 3)])
        result = evaluate(model, *val, device=device, guard=guard)
        w.writerow(["val"] + [_num(result.get(f"val_{k}")) for k in ("loss", "recon", "cls", "acc")]
                   + [round(time.perf_counter() - start, 3)])
    return {**result, "train_seconds": round(time.perf_counter() - start, 1)}


def _num(x) -> float | str:
    """A loss value for the CSV ('' when absent)."""
    return "" if x is None else round(float(x.detach() if isinstance(x, torch.Tensor) else x), 6)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor, attrs: torch.Tensor, device: str = "cpu",
             batch_size: int = 16, guard: bool = True) -> dict:
    """Mean loss parts and attribute accuracy of a model on held-out samples (eval mode)."""
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for s in range(0, len(data), batch_size):
        x, a = data[s:s + batch_size].to(device), attrs[s:s + batch_size].to(device)
        with features3d.single_thread(device, guard):
            out = model.loss(x, a)
        for k, v in out.items():
            if not math.isnan(float(v)):
                sums[k] = sums.get(k, 0.0) + float(v) * len(x)
                counts[k] = counts.get(k, 0) + len(x)
    return {f"val_{k}": sums[k] / counts[k] for k in sums}


def train_f3d(dataset: str = "synthetic_town", data_root: str | None = None, geometry: str = "carlasc",
              crop: tuple[int, int, int] | None = None, crop_mode: str = "center", steps: int = 600,
              batch_size: int = 8, lr: float = 1e-3, sequences: int = 192, frame_stride: int = 4,
              max_frames: int = 2048, attribute: str | None = None, probe: bool = True, val_sequences: int = 16,
              device: str = "cpu", seed: int = 0, out: str | os.PathLike | None = None, force: bool = False,
              progress: bool = True, widths: tuple[int, ...] = features3d.WIDTHS,
              features: int = features3d.FEATURES) -> Path:
    """Train (or reuse) the 3D feature network of a dataset; returns its checkpoint path (module docstring).

    `widths` / `features` narrow the network (occlab.metrics.networks' committed recipe uses 16/32/64 and 128)."""
    name, num_attr = _attribute(dataset, attribute)
    ds = windows(dataset, data_root, "train", geometry, crop, sequences, frame_stride, crop_mode)
    path, geo, grid = _target("f3d", dataset, ds, crop, out)
    if path.is_file() and not force:
        return path
    data, attrs = load_frames(ds, name, max_frames)
    val_ds = windows(dataset, data_root, "val", geometry, crop, val_sequences, frame_stride, crop_mode)
    val = load_frames(val_ds, name, 512)
    device = str(features3d.sparse_device(device))
    torch.manual_seed(seed)
    model = features3d.F3DNet(grid, ds.source.num_classes, num_attr, tuple(widths), features, probe=probe).to(device)
    result = _fit(model, data, attrs, val, steps, batch_size, lr, device, path.with_suffix(".csv"),
                  f"f3d {dataset} {geo} {'x'.join(map(str, grid))}", True, progress)
    meta = {"dataset": dataset, "geometry": geo, "grid": list(grid), "crop_mode": crop_mode, "attribute": name,
            "probe": probe, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "train_frames": len(data), "val_frames": len(val[0]), "recipe": f"v{features3d.VERSION}",
            "widths": list(widths), "features": features,
            "torch": str(torch.__version__), **result}
    return features3d.save_f3d(model.cpu().eval(), path, meta)


def train_f2d(dataset: str = "synthetic_town", data_root: str | None = None, geometry: str = "carlasc",
              crop: tuple[int, int, int] | None = None, crop_mode: str = "center", steps: int = 600,
              batch_size: int = 8, lr: float = 1e-3, sequences: int = 192, frame_stride: int = 4,
              max_frames: int = 1024, attribute: str | None = None, val_sequences: int = 16,
              views: tuple[str, ...] = VIEWS, image_size: int = 128, device: str = "cpu", seed: int = 0,
              out: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
              widths: tuple[int, ...] = features2d.WIDTHS) -> Path:
    """Train (or reuse) the 2D CNN on the renders of a dataset (its logits give the 2D Inception Score)."""
    name, num_attr = _attribute(dataset, attribute)
    if num_attr == 0:
        raise OcclabError(f"{dataset} provides no scene attribute to train the 2D network on")
    ds = windows(dataset, data_root, "train", geometry, crop, sequences, frame_stride, crop_mode)
    path, geo, grid = _target("f2d", dataset, ds, crop, out)
    if path.is_file() and not force:
        return path
    data, attrs = load_frames(ds, name, max_frames)
    val_ds = windows(dataset, data_root, "val", geometry, crop, val_sequences, frame_stride, crop_mode)
    val = load_frames(val_ds, name, 512)

    def images(lab: torch.Tensor, att: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.cat([to_uint8(render_views(lab[s:s + 32], views, image_size, geo))
                         for s in range(0, len(lab), 32)])
        return img.flatten(0, 1), att.repeat_interleave(len(views))

    torch.manual_seed(seed)
    model = features2d.F2DNet(num_attr, widths).to(device)
    result = _fit(model, *images(data, attrs), images(*val), steps, batch_size, lr, device,
                  path.with_suffix(".csv"), f"f2d {dataset} {geo} {'x'.join(map(str, grid))}", False, progress)
    meta = {"dataset": dataset, "geometry": geo, "grid": list(grid), "crop_mode": crop_mode, "attribute": name,
            "views": list(views), "image_size": image_size, "steps": steps, "batch_size": batch_size, "lr": lr,
            "seed": seed, "widths": list(widths), "recipe": f"v{features2d.VERSION}", "torch": str(torch.__version__),
            **result}
    return features2d.save_f2d(model.cpu().eval(), path, meta)


__all__ = ["ATTRIBUTES", "DEFAULT_ATTRIBUTE", "evaluate", "load_frames", "scene_attribute", "train_f2d", "train_f3d",
           "windows"]
