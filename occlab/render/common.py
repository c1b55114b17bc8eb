"""Input handling shared by the renderers: labels or a Sequence, a geometry, an optional mask."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occlab.classes import PALETTE
from occlab.data.geometry import GEOMETRIES, Geometry, get_geometry
from occlab.data.sequence import Sequence
from occlab.errors import OcclabError

PALETTE_ARRAY = np.zeros((256, 3), np.uint8)  # label -> RGB, 255 (ignore) and unknown ids black
PALETTE_ARRAY[: len(PALETTE)] = PALETTE


@dataclass
class Frames:
    """Labels as (T,X,Y,Z), the matching mask or None, the geometry and the boxes (N,10) or None."""

    labels: np.ndarray
    mask: np.ndarray | None
    geometry: Geometry
    boxes: np.ndarray | None


def resolve_geometry(geometry: Geometry | str | None, shape: tuple[int, int, int]) -> Geometry:
    """The geometry for a grid of `shape`; a smaller grid is taken as a crop centred on the ego in x and y."""
    if geometry is None:
        geometry = next((g for g in GEOMETRIES.values() if g.grid == tuple(shape)), GEOMETRIES["carlasc"])
    elif isinstance(geometry, str):
        try:
            geometry = get_geometry(geometry)
        except ValueError as e:
            raise OcclabError(str(e)) from None
    return geometry.crop(tuple(shape))


def as_frames(data: Sequence | np.ndarray, geometry: Geometry | str | None = None,
              mask: np.ndarray | bool | None = None) -> Frames:
    """Normalise labels (X,Y,Z) / (T,X,Y,Z) or a Sequence; mask=True uses the Sequence's own mask."""
    boxes = None
    if isinstance(data, Sequence):
        labels, boxes = data.labels, data.boxes
        geometry = data.geometry if geometry is None else geometry
        if mask is True:
            mask = data.mask
    else:
        labels = np.asarray(data)
        if mask is True:
            raise OcclabError("mask=True needs a Sequence; pass the mask array itself with plain labels")
    if labels.ndim == 3:
        labels = labels[None]
    if labels.ndim != 4 or labels.dtype != np.uint8:
        raise OcclabError(f"expected uint8 labels of shape (X,Y,Z) or (T,X,Y,Z), got {labels.dtype} "
                          f"{labels.shape}")
    if mask is None or mask is False:
        mask = None
    else:
        mask = np.asarray(mask, bool)
        try:
            mask = np.broadcast_to(mask, labels.shape)
        except ValueError:
            raise OcclabError(f"mask shape {mask.shape} does not match labels shape {labels.shape}") from None
    return Frames(labels, mask, resolve_geometry(geometry, labels.shape[1:]), boxes)


def present_classes(labels: np.ndarray) -> list[int]:
    """Non-free, non-ignored class ids that occur in `labels`, ascending."""
    counts = np.bincount(labels.ravel(), minlength=256)
    return [int(c) for c in np.nonzero(counts[1 : len(PALETTE)])[0] + 1]
