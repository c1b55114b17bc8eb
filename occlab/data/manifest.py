"""Dataset manifests (data_manifests/*.yaml): where each dataset comes from, its layout, classes and mapping.

The manifest is the one place a dataset's class list, mapping to occlab, geometry and splits live: the readers
build their lookup tables from it. Manifests are looked up in $OCCLAB_MANIFESTS, else in the repository's
data_manifests/ folder, else in ./data_manifests.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import numpy as np
import yaml

from occlab.classes import CLASS_ID, CLASS_NAMES
from occlab.errors import OcclabError

MANIFEST_ENV = "OCCLAB_MANIFESTS"


def manifest_dir() -> Path:
    """The folder holding the <name>.yaml manifests."""
    env = os.environ.get(MANIFEST_ENV)
    candidates = ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2] / "data_manifests",
                                                 Path.cwd() / "data_manifests"]
    for c in candidates:
        if c.is_dir():
            return c
    raise OcclabError(f"no data_manifests folder found (looked in {', '.join(map(str, candidates))}); "
                      f"set {MANIFEST_ENV}=DIR")


def known_manifests() -> list[str]:
    """Names of the available manifests."""
    return sorted(p.stem for p in manifest_dir().glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _read_yaml(path: str, mtime_ns: int) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def load_manifest(name: str) -> dict:
    """The manifest of dataset `name` as a dict (a fresh copy)."""
    path = manifest_dir() / f"{name}.yaml"
    if not path.is_file():
        raise OcclabError(f"unknown dataset manifest {name!r}; known: {', '.join(known_manifests())}")
    try:
        return copy.deepcopy(_read_yaml(str(path), path.stat().st_mtime_ns))
    except yaml.YAMLError as e:
        raise OcclabError(f"{path}: not valid YAML ({e})") from None


def class_table(manifest: dict, classes: str | int = "occlab") -> tuple[np.ndarray, tuple[str, ...]]:
    """Lookup table raw id -> label (-1 = not in the class list) and the label names.

    classes="occlab" (or the number of occlab classes) maps to occlab classes; classes="raw" (or the number of
    raw semantic classes) keeps every raw class: 0 = free, then the non-free raw ids in increasing order from 1.
    """
    table = {int(k): v for k, v in manifest["classes"].items()}
    free = sorted(k for k, (_, target) in table.items() if target == "free")
    raw_ids = sorted(k for k in table if k not in free)
    lut = np.full(max(table) + 1, -1, np.int16)
    occlab_n = 1 + max(CLASS_ID.get(target, 0) for _, target in table.values())
    if classes in ("raw", len(raw_ids)):
        lut[free] = 0
        lut[raw_ids] = np.arange(1, len(raw_ids) + 1)
        return lut, ("free",) + tuple(str(table[k][0]) for k in raw_ids)
    if classes not in ("occlab", occlab_n):
        raise OcclabError(f"{manifest['name']}: classes must be 'occlab' ({occlab_n}) or 'raw' ({len(raw_ids)}), "
                          f"got {classes!r}")
    for k, (raw_name, target) in table.items():
        if target not in CLASS_ID:
            raise OcclabError(f"{manifest['name']} manifest: raw class {k} ({raw_name}) maps to {target!r}, "
                              f"not an occlab class ({', '.join(CLASS_NAMES)})")
        lut[k] = CLASS_ID[target]
    return lut, CLASS_NAMES[:occlab_n]
