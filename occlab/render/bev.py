"""matplotlib views: bird's-eye semantic maps (x forward = image up, y left = image left) and class statistics."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence as Seq

import matplotlib
import numpy as np

if ("matplotlib.pyplot" not in sys.modules and "ipykernel" not in sys.modules and not os.environ.get("MPLBACKEND")
        and sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))):
    matplotlib.use("Agg")  # no display and not in Jupyter: render to files only

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from occlab.classes import CLASS_NAMES, FREE, IGNORE, PALETTE  # noqa: E402
from occlab.data.geometry import Geometry  # noqa: E402
from occlab.data.sequence import BOX_FIELDS, Sequence, bev_layout  # noqa: E402
from occlab.errors import OcclabError  # noqa: E402
from occlab.render.common import PALETTE_ARRAY, as_frames, present_classes  # noqa: E402

UNOBSERVED = (210, 210, 210)  # BEV colour of columns with no observed voxel (when a mask is given)
_F = {name: i for i, name in enumerate(BOX_FIELDS)}


def bev_image(labels: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (...,X,Y,3) of the top-most non-free class per column.

    Orientation: row 0 is the front (largest x), column 0 the far left (largest y), so x forward points up,
    y left points left and the ego sits at the image centre; pixel [r, c] shows voxel column (X-1-r, Y-1-c).
    With a mask, unobserved voxels count as free and columns with nothing observed are light grey.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (3, 4):
        raise OcclabError(f"bev_image expects labels of shape (X,Y,Z) or (T,X,Y,Z), got {labels.shape}")
    rgb = PALETTE_ARRAY[bev_layout(labels if mask is None else np.where(mask, labels, FREE))]
    if mask is not None:
        rgb[~np.broadcast_to(mask, labels.shape).any(-1)] = UNOBSERVED
    return np.ascontiguousarray(rgb[..., ::-1, ::-1, :])


def _legend_handles(classes: Seq[int]) -> list[Patch]:
    """One coloured patch per class id, for a figure legend."""
    return [Patch(facecolor=np.asarray(PALETTE[c]) / 255, edgecolor="black", linewidth=0.4, label=CLASS_NAMES[c])
            for c in classes]


def _box_outline(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed outline (y, x) in ego metres of one box row (cx, cy, l, w, yaw)."""
    cx, cy, l, w, yaw = (row[_F[k]] for k in ("cx", "cy", "l", "w", "yaw"))
    dx = np.array([1, 1, -1, -1, 1]) * l / 2
    dy = np.array([1, -1, -1, 1, 1]) * w / 2
    c, s = np.cos(yaw), np.sin(yaw)
    return cy + s * dx + c * dy, cx + c * dx - s * dy


def plot_bev(data: Sequence | np.ndarray, frames: Seq[int] | None = None, ax=None,
             mask: np.ndarray | bool | None = None, geometry: Geometry | str | None = None, boxes: bool = True,
             legend: bool = True) -> Figure:
    """A row of BEV panels (frames 0, middle, last by default) in ego metres, with box outlines and a legend."""
    f = as_frames(data, geometry, mask)
    n_frames = len(f.labels)
    if frames is None and ax is not None:  # as many evenly spaced frames as axes given
        frames = np.linspace(0, n_frames - 1, len(np.ravel(ax))).round().astype(int)
    frames = sorted({0, n_frames // 2, n_frames - 1}) if frames is None else [int(t) for t in frames]
    bad = [t for t in frames if not 0 <= t < n_frames]
    if bad or not frames:
        raise OcclabError(f"frames {bad or '[]'} are out of range: the input has {n_frames} frames "
                          f"(0..{n_frames - 1})")
    if ax is None:
        fig, axes = plt.subplots(1, len(frames), figsize=(3.3 * len(frames) + (1.6 if legend else 0.2), 3.6),
                                 squeeze=False, layout="constrained")
        axes = list(axes[0])
    else:
        axes = list(np.ravel(ax))
        if len(axes) != len(frames):
            raise OcclabError(f"got {len(axes)} axes for {len(frames)} frames; pass one axis per frame")
        fig = axes[0].figure
    g = f.geometry
    extent = (g.max_bound[1], g.min_bound[1], g.min_bound[0], g.max_bound[0])  # left, right, bottom, top
    for i, (a, t) in enumerate(zip(axes, frames)):
        a.imshow(bev_image(f.labels[t], None if f.mask is None else f.mask[t]), extent=extent,
                 interpolation="nearest")
        if boxes and f.boxes is not None and len(f.boxes):
            for row in f.boxes[f.boxes[:, _F["frame"]].astype(int) == t]:
                a.plot(*_box_outline(row), color="black", linewidth=0.7)
        a.plot(0, 0, marker="^", color="black", markersize=6)
        a.set_title(f"frame {t}")
        a.set_xlabel("y (m, left +)")
        if i == 0:
            a.set_ylabel("x (m, forward +)")
    if legend:
        shown = f.labels[frames] if f.mask is None else np.where(f.mask[frames], f.labels[frames], FREE)
        classes = present_classes(shown)
        if classes:
            fig.legend(handles=_legend_handles(classes), loc="outside right center", fontsize=8, frameon=False)
    return fig


def class_counts(labels: np.ndarray | Sequence, num_classes: int = 12,
                 mask: np.ndarray | None = None) -> dict[str, int]:
    """Voxels per class name (free included, 255 = ignore left out), over observed voxels if a mask is given."""
    labels = labels.labels if isinstance(labels, Sequence) else np.asarray(labels)
    values = labels[np.broadcast_to(mask, labels.shape)] if mask is not None else labels.ravel()
    counts = np.bincount(values, minlength=256)
    extra = [c for c in np.nonzero(counts)[0] if num_classes <= c < IGNORE or c > IGNORE]
    if extra:
        raise OcclabError(f"labels contain ids {extra} outside 0..{num_classes - 1} (and 255 = ignore); "
                          f"pass a larger num_classes (at most {len(CLASS_NAMES)})")
    return {CLASS_NAMES[c]: int(counts[c]) for c in range(num_classes)}


def plot_class_stats(data: np.ndarray | Sequence, ax=None, log: bool = True, num_classes: int | None = None,
                     mask: np.ndarray | None = None) -> Figure:
    """Bar chart of each class's share of the non-ignored voxels (percent), bars in palette colours."""
    labels = data.labels if isinstance(data, Sequence) else np.asarray(data)
    if num_classes is None:
        num_classes = 12 if (labels == 11).any() else 11
    counts = class_counts(labels, num_classes, mask)
    total = sum(counts.values())
    shares = [100.0 * v / total if total else 0.0 for v in counts.values()]
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 3.4), layout="constrained")
    fig = ax.figure
    ax.bar(list(counts), shares, color=[np.asarray(PALETTE[c]) / 255 for c in range(num_classes)],
           edgecolor="black", linewidth=0.5)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("share of voxels (%)")
    ax.set_title(f"{total:,} voxels (ignore excluded)", fontsize=9)
    ax.tick_params(axis="x", labelrotation=45)
    return fig
