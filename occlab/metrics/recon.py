"""Reconstruction metrics (DESIGN.md §4): one confusion matrix behind IoU, mIoU and per-class IoU.

Conventions (DynamicCity's; every model, notebook and the CLI use this one code path):
- Rows of the confusion matrix are ground truth, columns prediction; only voxels whose gt is not the ignore
  label (255) and, when a mask is given, whose mask is True are counted.
- Per-class IoU = TP / (TP + FP + FN). A class that is neither in the gt nor predicted has IoU NaN
  (None in JSON); a class predicted but absent from the gt has IoU 0.
- mIoU (default) = mean IoU over the non-free classes present in the ground truth (gt count > 0, class 0
  excluded). A class absent from the gt but predicted is therefore NOT averaged (its false positives still
  lower the IoU of the gt classes they were taken from). With `all_classes=True` the mean runs over every
  non-free class 1..C-1 that is present in the gt OR predicted (a predicted-but-absent class counts as 0);
  classes neither present nor predicted are skipped.
- IoU (geometry) = binary IoU of occupied (label != 0) between prediction and gt on the counted voxels.
- No counted voxel (e.g. a mask that selects nothing): `compute()` warns and returns NaN metrics with
  `counted == 0`; `eval_recon_files` raises an OcclabError instead.
All values are fractions in 0..1.
"""
from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from occlab.classes import FREE, IGNORE, NUM_CLASSES_CARLASC, NUM_CLASSES_OCC3D, class_names
from occlab.errors import OcclabError

ArrayLike = np.ndarray | torch.Tensor


@dataclass
class ReconMetrics:
    """IoU, mIoU and per-class IoU (fractions 0..1, NaN where undefined) and the number of voxels counted."""

    miou: float
    iou: float
    per_class: dict[str, float]
    counted: int
    averaged: tuple[str, ...] = field(default=())  # the classes that entered the mIoU mean
    codebook: dict | None = None  # a VQ model's code use over the same windows: perplexity, dead_codes, used

    def to_dict(self) -> dict:
        """JSON-friendly dict: NaN becomes None."""
        d = asdict(self)
        d["miou"], d["iou"] = _nan_to_none(self.miou), _nan_to_none(self.iou)
        d["per_class"] = {k: _nan_to_none(v) for k, v in self.per_class.items()}
        d["averaged"] = list(self.averaged)
        return d


def _names(num_classes: int) -> tuple[str, ...]:
    """Class names for `num_classes`, or an OcclabError saying the valid range."""
    try:
        return class_names(num_classes)
    except ValueError as e:
        raise OcclabError(str(e)) from None


def _nan_to_none(x: float) -> float | None:
    """None for NaN, the float otherwise."""
    return None if math.isnan(x) else float(x)


def _as_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    """A torch integer/bool tensor from a numpy array or tensor; float labels are an error."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "u" and x.dtype.itemsize > 1:
            x = x.astype(np.int64)
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise OcclabError(f"{what}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex():
        raise OcclabError(f"{what}: expected integer class labels, got dtype {x.dtype}")
    return x


class ConfusionMatrix:
    """Streaming (C, C) int64 confusion matrix (rows gt, columns prediction), on CPU or CUDA."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE, device: str | torch.device = "cpu") -> None:
        _names(num_classes)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix.zero_()

    def update(self, pred: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None, check: bool = True) -> None:
        """Add one batch: pred/gt integer labels of equal shape; only mask-True, non-ignore gt voxels count."""
        pred, gt = _as_tensor(pred, "pred"), _as_tensor(gt, "gt")
        if pred.shape != gt.shape:
            raise OcclabError(f"pred shape {tuple(pred.shape)} differs from gt shape {tuple(gt.shape)}; "
                              f"expected equal shapes, e.g. (B,T,X,Y,Z)")
        if mask is not None:
            mask = _as_tensor(mask, "mask")
            if mask.shape != gt.shape:
                raise OcclabError(f"mask shape {tuple(mask.shape)} differs from gt shape {tuple(gt.shape)}; "
                                  f"expected a boolean mask of the labels' shape")
        self.matrix = self.matrix.to(gt.device)
        pred = pred.to(gt.device)
        if check:
            self._check_range(pred, gt)
        c = self.num_classes
        valid = gt != self.ignore_index
        if mask is not None:
            valid &= mask.to(gt.device).bool()
        # one bincount; invalid voxels go to an extra bin c*c that is dropped (no boolean indexing, no sync)
        idx = torch.where(valid, gt.to(torch.int32) * c + pred.to(torch.int32), c * c)
        self.matrix += torch.bincount(idx.reshape(-1), minlength=c * c + 1)[: c * c].view(c, c)

    def _check_range(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """OcclabError unless pred is in 0..C-1 and gt in 0..C-1 or the ignore label."""
        c = self.num_classes
        bad_pred = (pred < 0) | (pred >= c)
        bad_gt = ((gt < 0) | (gt >= c)) & (gt != self.ignore_index)
        flags = torch.stack([bad_pred.any(), bad_gt.any()]).tolist()  # one device sync
        for flag, bad, x, what, extra in ((flags[0], bad_pred, pred, "pred", ""),
                                          (flags[1], bad_gt, gt, "gt", f" (and {self.ignore_index} = ignore)")):
            if flag:
                values = torch.unique(x[bad])[:10].tolist()
                raise OcclabError(f"{what}: label values {values} are outside 0..{c - 1}{extra}; expected "
                                  f"{c} classes (pass num_classes to match the data)")

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrix over torch.distributed ranks (no-op when not initialised); call once before compute."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl" and not self.matrix.is_cuda:
                self.matrix = self.matrix.cuda()
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def compute(self, all_classes: bool = False) -> ReconMetrics:
        """IoU, mIoU and per-class IoU from the accumulated counts (module docstring gives the conventions)."""
        return metrics_from_confusion(self.matrix.cpu().numpy(), all_classes)


def metrics_from_confusion(matrix: np.ndarray, all_classes: bool = False) -> ReconMetrics:
    """ReconMetrics from a (C, C) confusion matrix (rows gt, columns prediction)."""
    m = np.asarray(matrix, dtype=np.float64)
    names = _names(m.shape[0])
    counted = int(m.sum())
    tp, gt_n, pred_n = np.diag(m), m.sum(1), m.sum(0)
    union = gt_n + pred_n - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    nonfree = np.arange(m.shape[0]) != FREE
    chosen = nonfree & ((gt_n > 0) | ((pred_n > 0) if all_classes else False))
    miou = float(iou[chosen].mean()) if chosen.any() else math.nan
    occ_tp = m[1:, 1:].sum()
    occ_union = occ_tp + m[0, 1:].sum() + m[1:, 0].sum()
    geo = float(occ_tp / occ_union) if occ_union > 0 else math.nan
    if counted == 0:
        warnings.warn("reconstruction metrics: no voxel was counted (empty mask or all-ignore ground truth); "
                      "returning NaN", RuntimeWarning, stacklevel=3)
    elif not chosen.any():
        warnings.warn("reconstruction metrics: no non-free class in the ground truth; mIoU is NaN",
                      RuntimeWarning, stacklevel=3)
    per_class = {names[c]: float(iou[c]) for c in range(m.shape[0]) if c != FREE}
    averaged = tuple(names[c] for c in np.flatnonzero(chosen))
    return ReconMetrics(miou, geo, per_class, counted, averaged)


def _infer_num_classes(*arrays: torch.Tensor) -> int:
    """11 (CarlaSC) unless a label 11 (bicycle) or above appears, then 12 (Occ3D); ignore excluded."""
    top = max(int(torch.where(a == IGNORE, 0, a).max()) if a.numel() else 0 for a in arrays)
    return NUM_CLASSES_CARLASC if top < NUM_CLASSES_CARLASC else NUM_CLASSES_OCC3D


def _broadcast_pred(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """A static (X,Y,Z) prediction scored against (..., X,Y,Z) gt is expanded over the leading axes."""
    if pred.shape != gt.shape and pred.ndim < gt.ndim and tuple(gt.shape[gt.ndim - pred.ndim:]) == tuple(pred.shape):
        return pred.expand(gt.shape)
    return pred


def recon_metrics(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None, num_classes: int | None = None,
                  all_classes: bool = False, ignore_index: int = IGNORE) -> ReconMetrics:
    """Metrics of one prediction/gt pair (numpy or torch); a (X,Y,Z) pred is broadcast over T of the gt."""
    pred_t, gt_t = _as_tensor(pred, "pred"), _as_tensor(gt, "gt")
    pred_t = _broadcast_pred(pred_t, gt_t)
    if num_classes is None:
        num_classes = _infer_num_classes(pred_t, gt_t)
    cm = ConfusionMatrix(num_classes, ignore_index, device=gt_t.device)
    cm.update(pred_t, gt_t, mask)
    return cm.compute(all_classes)


def compression_ratio(input_shape: Sequence[int], latent_shapes: Iterable[Sequence[int]]) -> float:
    """C.R. = input voxels / latent floats, e.g. (T,X,Y,Z) over six HexPlane planes (C, a, b)."""
    shapes = [tuple(int(v) for v in s) for s in latent_shapes]
    if not shapes or any(v <= 0 for v in input_shape) or any(v <= 0 for s in shapes for v in s):
        raise OcclabError(f"compression_ratio: expected a positive input shape and a non-empty list of positive "
                          f"latent shapes, got {tuple(input_shape)} and {shapes}")
    return math.prod(input_shape) / sum(math.prod(s) for s in shapes)


def _load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an npz file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise OcclabError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise OcclabError(f"{path}: not a readable npz file ({e}); expected an npz holding 'labels'") from None


def _pick(data: dict[str, np.ndarray], path: str | os.PathLike, keys: tuple[str, ...]) -> np.ndarray:
    """The first of `keys` present in an npz's arrays, or an error naming the file and its keys."""
    for k in keys:
        if k in data:
            return data[k]
    raise OcclabError(f"{path}: has keys {sorted(data)}, expected {' or '.join(map(repr, keys))}")


def _labels_of(data: dict[str, np.ndarray], path: str | os.PathLike, what: str) -> np.ndarray:
    """Integer labels (T,X,Y,Z) or (X,Y,Z) from the `labels` key."""
    labels = _pick(data, path, ("labels",))
    if labels.dtype.kind not in "ui":
        raise OcclabError(f"{path}: {what} labels have dtype {labels.dtype}, expected integer (uint8) class ids")
    if labels.ndim not in (3, 4):
        raise OcclabError(f"{path}: {what} labels have shape {labels.shape}, expected (T,X,Y,Z) or (X,Y,Z)")
    return labels


def _mask_of(mask: np.ndarray, path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean visibility mask (nonzero = visible) of the gt's shape."""
    if mask.dtype.kind not in "uib":
        raise OcclabError(f"{path}: mask has dtype {mask.dtype}, expected bool or integer (nonzero = visible)")
    if mask.shape != shape:
        raise OcclabError(f"{path}: mask shape {mask.shape} differs from the gt shape {shape}")
    return mask != 0


def eval_recon_files(pred_path: str | os.PathLike, gt_path: str | os.PathLike,
                     mask_path: str | os.PathLike | None = None, num_classes: int | None = None,
                     all_classes: bool = False, use_gt_mask: bool = True) -> dict:
    """Score a predicted npz against a gt npz (`labels` each); mask from mask_path, else the gt's `mask` key.

    The mask npz holds `mask` (or `labels`), nonzero = visible. A (X,Y,Z) prediction is broadcast over the
    gt's T. Returns {"miou", "iou", "per_class", "counted", "averaged", "mask"}; raises OcclabError if no
    voxel counts.
    """
    gt_data = _load_npz(gt_path)
    pred, gt = _labels_of(_load_npz(pred_path), pred_path, "predicted"), _labels_of(gt_data, gt_path, "gt")
    if pred.shape != gt.shape and pred.shape != gt.shape[1:]:
        raise OcclabError(f"{pred_path}: predicted labels have shape {pred.shape}, expected the ground truth's "
                          f"{gt.shape} (from {gt_path})")
    mask, mask_source = None, None
    if mask_path is not None:
        mask = _mask_of(_pick(_load_npz(mask_path), mask_path, ("mask", "labels")), mask_path, gt.shape)
        mask_source = str(mask_path)
    elif use_gt_mask and "mask" in gt_data:
        mask, mask_source = _mask_of(gt_data["mask"], gt_path, gt.shape), f"{gt_path}:mask"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = recon_metrics(pred, gt, mask, num_classes, all_classes)
    if result.counted == 0:
        raise OcclabError(f"{gt_path}: no voxel to score: the mask ({mask_source}) selects no voxel whose "
                          f"ground-truth label is not {IGNORE}")
    return {**result.to_dict(), "mask": mask_source}


def mean_scene_baseline(label_iter: Iterable[ArrayLike], num_classes: int) -> np.ndarray:
    """The most frequent training class at each voxel position (ties -> lowest id; all-ignore -> free)."""
    _names(num_classes)
    hist: np.ndarray | None = None
    for i, labels in enumerate(label_iter):
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if labels.ndim == 3:
            labels = labels[None]
        if labels.ndim != 4:
            raise OcclabError(f"mean_scene_baseline: item {i} has shape {labels.shape}, expected (X,Y,Z) or "
                              f"(T,X,Y,Z)")
        if hist is None:
            hist = np.zeros((num_classes, *labels.shape[1:]), np.int32)
        elif labels.shape[1:] != hist.shape[1:]:
            raise OcclabError(f"mean_scene_baseline: item {i} has grid {labels.shape[1:]}, expected "
                              f"{hist.shape[1:]} like the first item")
        bad = (labels >= num_classes) & (labels != IGNORE)
        if bad.any():
            raise OcclabError(f"mean_scene_baseline: item {i} has labels {np.unique(labels[bad])[:10].tolist()} "
                              f"outside 0..{num_classes - 1} (and {IGNORE} = ignore)")
        for c in range(num_classes):
            hist[c] += (labels == c).sum(0, dtype=np.int32)
    if hist is None:
        raise OcclabError("mean_scene_baseline: no training labels were given")
    return hist.argmax(0).astype(np.uint8)


__all__ = ["ConfusionMatrix", "ReconMetrics", "compression_ratio", "eval_recon_files",
           "mean_scene_baseline", "metrics_from_confusion", "recon_metrics"]
