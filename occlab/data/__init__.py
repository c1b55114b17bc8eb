"""Datasets: the procedural town and the real readers, all behind one window Dataset.

Every model and notebook takes `dataset=` and `data_root=`; `make_dataset` does the rest.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from occlab.data.geometry import GEOMETRIES, Geometry, get_geometry
from occlab.data.sequence import BOX_FIELDS, COMMANDS, Sequence, load_sequence
from occlab.errors import OcclabError

if TYPE_CHECKING:
    from occlab.data.windows import SequenceSource, WindowDataset

# dataset name -> "module:SourceClass"; each class takes (data_root, split, **options).
SOURCES: dict[str, str] = {
    "synthetic_town": "occlab.data.town:TownSource",
    "carlasc": "occlab.data.carlasc:CarlaSCSource",
    "occ3d_nuscenes": "occlab.data.occ3d_nuscenes:Occ3DNuScenesSource",
    "occ3d_waymo": "occlab.data.occ3d_waymo:Occ3DWaymoSource",
    "semantickitti": "occlab.data.semantickitti:SemanticKITTISource",
    "sscbench_kitti360": "occlab.data.semantickitti:SSCBenchKITTI360Source",
}


def make_source(dataset: str = "synthetic_town", data_root: str | None = None, split: str = "train",
                **options) -> "SequenceSource":
    """The scenes of one split of a dataset (the synthetic town needs no data_root)."""
    if dataset not in SOURCES:
        raise OcclabError(f"unknown dataset {dataset!r}; expected one of {', '.join(SOURCES)}")
    module, cls = SOURCES[dataset].split(":")
    return getattr(importlib.import_module(module), cls)(data_root, split, **options)


def make_dataset(dataset: str = "synthetic_town", data_root: str | None = None, split: str = "train",
                 frames: int = 16, stride: int = 1, skip: int = 1, crop: tuple[int, int, int] | None = None,
                 crop_mode: str = "center", **options) -> "WindowDataset":
    """Sliding windows of `frames` frames over a dataset split."""
    from occlab.data.windows import WindowDataset

    return WindowDataset(make_source(dataset, data_root, split, **options), frames, stride, skip, crop, crop_mode)


def __getattr__(name: str):
    """The torch-backed names load torch only when first used (rendering and readers never need it)."""
    if name in ("SequenceSource", "WindowDataset", "to_item"):
        from occlab.data import windows

        return getattr(windows, name)
    raise AttributeError(f"module 'occlab.data' has no attribute {name!r}")


__all__ = ["BOX_FIELDS", "COMMANDS", "GEOMETRIES", "Geometry", "Sequence", "SequenceSource", "WindowDataset",
           "get_geometry", "load_sequence", "make_dataset", "make_source", "to_item", "SOURCES"]
