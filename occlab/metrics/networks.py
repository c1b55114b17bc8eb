"""Frozen, versioned metric networks: one folder per network, with its weights, manifest and reference statistics.

A network's version name says what it scores and by which recipe: `f3d-synthetic_town-carlasc-32x32x8-v1`
(kind, dataset, geometry, grid, recipe version). Its folder holds
- `weights.pt`: the checkpoint (occlab.metrics.features3d / features2d format),
- `manifest.json`: the recipe (every argument of train_f3d / train_f2d), the data split it was trained on, the
  seed, the torch version, the sha256 of weights.pt and the training result,
- `reference.npz`: `mean` (D,), `cov` (D, D) and `count` of the features of the real validation split, so a
  user scores FID against the very statistics everyone else uses.

Installed networks live in two places: the ones committed with the kit (occlab/metrics/weights/, the grids of the
smoke and study presets of the synthetic town) and the user's (`$OCCLAB_CACHE/metrics/networks/`, written by
`occlab metrics build`). A committed network wins over a user one of the same name.

The committed recipes are narrower than the trainers' defaults (RECIPE, f3d: widths 16/32/64 and 128 features
instead of 32/64/128 and 256; RECIPE_F2D, f2d: widths 16/32/64/128 instead of 32/64/128/256) so that the four
committed networks (f3d and f2d for the smoke and study grids) weigh about 5 MB together.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from occlab.errors import OcclabError
from occlab.metrics.features3d import num_threads

COMMITTED = Path(__file__).parent / "weights"
RECIPE_VERSION = 1
# The fixed recipe of every versioned f3d (arguments of occlab.train.features.train_f3d)
RECIPE = {"steps": 300, "batch_size": 8, "lr": 1e-3, "sequences": 96, "frame_stride": 4, "max_frames": 2048,
          "val_sequences": 16, "seed": 0, "widths": [16, 32, 64], "features": 128, "crop_mode": "center"}
RECIPE_F2D = {"steps": 300, "batch_size": 8, "lr": 1e-3, "sequences": 96, "frame_stride": 4, "max_frames": 1024,
              "val_sequences": 16, "seed": 0, "image_size": 128, "crop_mode": "center", "widths": [16, 32, 64, 128],
              "threads": 2}
# CPU threads of a recipe's training: the dense 2D network's 300 steps land elsewhere with another thread count
# (float summation order; measured: 1 thread vs the committed 2 moves the reference mean by 34%), so the recipe
# fixes it. f3d trains its sparse convolutions on one thread whatever is set (features3d.single_thread).
REFERENCE_SPLIT = "val"
REFERENCE_SEQUENCES = 16
# The grids the smoke and study presets score (occlab.studies.vae.SIZES: the VAE's window crop)
PRESET_GRIDS = {"smoke": (16, 16, 8), "study": (32, 32, 8)}
# How close a rerun of the recipe must land to the committed reference statistics (relative). Measured on the
# smoke grid (2 CPU cores, torch 2.14.1): a rerun on the same machine gives 0.0 for both; the same recipe with
# seed 1 (another network) gives mean 1.43, trace 0.029. 0.1 leaves room for float-order drift across machines
# and still rejects another network by the mean.
TOLERANCE = {"mean_rel": 0.1, "trace_rel": 0.1}


def user_root() -> Path:
    """$OCCLAB_CACHE/metrics/networks (default ~/.cache/occlab/metrics/networks)."""
    return Path(os.environ.get("OCCLAB_CACHE", Path.home() / ".cache" / "occlab")) / "metrics" / "networks"


def version_name(kind: str, dataset: str, geometry: str, grid: tuple[int, ...], version: int = RECIPE_VERSION) -> str:
    """E.g. f3d-synthetic_town-carlasc-32x32x8-v1."""
    return f"{kind}-{dataset}-{geometry}-{'x'.join(map(str, grid))}-v{version}"


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Network:
    """An installed metric network: its version name and folder."""

    name: str
    path: Path

    @property
    def weights(self) -> Path:
        return self.path / "weights.pt"

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    @property
    def committed(self) -> bool:
        return self.path.parent.resolve() == COMMITTED.resolve()

    def reference(self) -> dict:
        """{"mean", "cov", "count"} of the real validation split's features."""
        with np.load(self.path / "reference.npz") as z:
            return {"mean": z["mean"], "cov": z["cov"], "count": int(z["count"])}

    def verify(self) -> None:
        """Raise when weights.pt does not match the sha256 of its manifest."""
        want, got = self.manifest["sha256"], sha256(self.weights)
        if want != got:
            raise OcclabError(f"{self.weights}: sha256 {got[:12]} but its manifest says {want[:12]}; the weights "
                              f"were changed: rebuild with `occlab metrics build` or restore the file")


def installed() -> list[Network]:
    """Every installed network, committed first (a committed name hides a user one)."""
    seen: dict[str, Network] = {}
    for root in (COMMITTED, user_root()):
        for folder in sorted(root.glob("*/manifest.json")):
            seen.setdefault(folder.parent.name, Network(folder.parent.name, folder.parent))
    return list(seen.values())


def find(name: str) -> Network:
    """An installed network by version name, with a clear error listing the known ones."""
    for net in installed():
        if net.name == name:
            return net
    known = ", ".join(n.name for n in installed()) or "none"
    raise OcclabError(f"unknown metric network version {name!r}; installed: {known}. Build it with "
                      f"`occlab metrics build --dataset DATASET`")


def lookup(kind: str, dataset: str, geometry: str, grid: tuple[int, ...]) -> Network | None:
    """The installed network of a kind, dataset, geometry and grid at the current recipe version, or None."""
    name = version_name(kind, dataset, geometry, tuple(grid))
    return next((n for n in installed() if n.name == name), None)


def reference_statistics(weights: str | os.PathLike, dataset: str, data_root: str | None, geometry: str,
                         grid: tuple[int, ...], kind: str = "f3d") -> dict:
    """Feature mean, covariance and count of the real validation split (every 4th frame of its scenes)."""
    from occlab.metrics.generation import extract_features
    from occlab.train.features import load_frames, windows

    ds = windows(dataset, data_root, REFERENCE_SPLIT, geometry, tuple(grid), REFERENCE_SEQUENCES,
                 RECIPE["frame_stride"], RECIPE["crop_mode"])
    frames, _ = load_frames(ds, "none", 4096)
    space = "3d" if kind == "f3d" else "2d"
    feats = extract_features(frames, space, weights=weights, extractor="f2d", dataset=dataset, geometry=geometry,
                             frame_stride=1)
    f = feats["features"].double().numpy()
    return {"mean": f.mean(0), "cov": np.cov(f, rowvar=False), "count": len(f)}


def build(dataset: str = "synthetic_town", data_root: str | None = None, geometry: str = "carlasc",
          grid: tuple[int, int, int] | None = None, kinds: tuple[str, ...] = ("f3d", "f2d"),
          root: str | os.PathLike | None = None, device: str = "cpu", force: bool = False,
          progress: bool = True) -> list[Network]:
    """Train the metric networks of a dataset by the fixed recipe; write weights, manifest and reference stats."""
    from occlab.train import features as tf

    out_root = Path(root) if root else user_root()
    built = []
    for kind in kinds:
        if kind not in ("f3d", "f2d"):
            raise OcclabError(f"unknown metric network kind {kind!r}; expected f3d or f2d")
        ds = tf.windows(dataset, data_root, "val", geometry, grid, 1, 4)
        geo = ds.source.geometry
        g = tuple(grid) if grid else tuple(geo.grid)
        name = version_name(kind, dataset, geo.name, g)
        folder = out_root / name
        net = Network(name, folder)
        if (folder / "manifest.json").is_file() and not force:
            built.append(net)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        recipe = dict(RECIPE if kind == "f3d" else RECIPE_F2D)
        train = tf.train_f3d if kind == "f3d" else tf.train_f2d
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in recipe.items() if k != "threads"}
        with num_threads(recipe.get("threads")):
            train(dataset, data_root, geo.name, crop=grid, device=device, out=net.weights, force=True,
                  progress=progress, **kw)
        ref = reference_statistics(net.weights, dataset, data_root, geo.name, g, kind)
        np.savez(folder / "reference.npz", mean=ref["mean"], cov=ref["cov"], count=ref["count"])
        meta = torch.load(net.weights, map_location="cpu", weights_only=False).get("meta", {})
        manifest = {"name": name, "kind": kind, "dataset": dataset, "data_root": data_root, "geometry": geo.name,
                    "grid": list(g), "recipe_version": RECIPE_VERSION, "recipe": recipe,
                    "train_split": {"split": "train", "sequences": recipe["sequences"]},
                    "reference_split": {"split": REFERENCE_SPLIT, "sequences": REFERENCE_SEQUENCES,
                                        "frame_stride": RECIPE["frame_stride"], "count": ref["count"]},
                    "seed": recipe["seed"], "torch": str(torch.__version__), "sha256": sha256(net.weights),
                    "result": {k: v for k, v in meta.items() if k.startswith("val_") or k == "train_seconds"}}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        built.append(net)
    return built


def compare_reference(a: dict, b: dict) -> dict:
    """Relative distance of two reference statistics: |mean_a - mean_b| / |mean_a| and of the covariance traces."""
    mean_rel = float(np.linalg.norm(a["mean"] - b["mean"]) / max(np.linalg.norm(a["mean"]), 1e-12))
    ta, tb = float(np.trace(a["cov"])), float(np.trace(b["cov"]))
    return {"mean_rel": mean_rel, "trace_rel": abs(ta - tb) / max(abs(ta), 1e-12), "count": (a["count"], b["count"])}


__all__ = [
    "COMMITTED",
    "PRESET_GRIDS",
    "RECIPE",
    "TOLERANCE",
    "Network",
    "build",
    "compare_reference",
    "find",
    "installed",
    "lookup",
    "reference_statistics",
    "user_root",
    "version_name",
]
