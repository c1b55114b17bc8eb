"""The base of the real-dataset readers: manifest-driven class tables, file checks that name the file."""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from occlab.data.geometry import Geometry, get_geometry
from occlab.data.manifest import class_table, load_manifest
from occlab.data.sequence import Sequence
from occlab.errors import OcclabError


def require_root(dataset: str, data_root: str | os.PathLike | None) -> Path:
    """The data root as a Path, or an error naming the dataset, the path and where to get the data."""
    if data_root is not None and Path(data_root).is_dir():
        return Path(data_root)
    what = "no data root given" if data_root is None else f"data root {data_root} does not exist or is not a folder"
    project = load_manifest(dataset).get("source", {}).get("project", dataset)
    raise OcclabError(f"{dataset}: {what}. Check a copy with `occlab data verify {dataset} --root DIR`; "
                      f"to get the data ({project}) see how_to_get in data_manifests/{dataset}.yaml")


def read_npz(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """The given arrays of an npz frame file, with errors that name the file."""
    if not path.is_file():
        raise OcclabError(f"{path}: missing frame file")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise OcclabError(f"{path}: a single .npy array, not an npz archive with {', '.join(keys)}")
        with archive as z:
            files = list(z.files)
            data = {k: z[k] for k in keys if k in files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as e:
        raise OcclabError(f"{path}: corrupt or unreadable npz ({e})") from None
    absent = [k for k in keys if k not in data]
    if absent:
        raise OcclabError(f"{path}: no {', '.join(absent)} in this npz (it has {', '.join(files) or 'nothing'})")
    return data


def check_array(a: np.ndarray, path: Path, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """`a` unchanged if it has `shape` and an integer or bool dtype, else an error naming the file and key."""
    if a.shape != tuple(shape) or a.dtype.kind not in "iub":
        raise OcclabError(f"{path}: {key} has shape {a.shape} and dtype {a.dtype}; expected shape {tuple(shape)} "
                          f"with an integer or bool dtype")
    return a


def build_sequence(labels: np.ndarray, mask: np.ndarray, poses: np.ndarray, geometry: str, num_classes: int,
                   **extra: Any) -> Sequence:
    """A Sequence with the reader's class count (raw modes have more than occlab's 12)."""
    return Sequence(labels, mask, poses, geometry=geometry, num_classes=num_classes, **extra)


@dataclass
class Scene:
    """One indexed scene: per-frame records (what read_frame takes), ego -> world poses, Sequence extras."""

    name: str
    frames: list[Any]
    poses: np.ndarray  # (N, 4, 4)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"density": 1}, given to every loaded Sequence


class ManifestSource:
    """Base of the real readers: one split's scenes indexed from disk, labels mapped with the manifest's table.

    Subclasses set `dataset` and `mask_modes` (the first is the default) and implement scene_refs, index_scene,
    frame_files and read_frame. With strict=False a scene that cannot be indexed is recorded in `problems`
    instead of raising (verify uses this); the default raises.
    """

    dataset: str = ""
    mask_modes: tuple[str, ...] = ("none",)

    def __init__(self, data_root: str | os.PathLike | None, split: str = "train", classes: str | int = "occlab",
                 mask: str | None = None, strict: bool = True):
        self.name = self.dataset
        self.manifest = load_manifest(self.dataset)
        self.root = require_root(self.dataset, data_root)
        if split not in self.manifest["splits"]:
            raise OcclabError(f"{self.dataset}: unknown split {split!r}; expected one of "
                              f"{', '.join(self.manifest['splits'])}")
        self.split = split
        self.lut, self.class_names = class_table(self.manifest, classes)
        self.num_classes = len(self.class_names)
        self.geometry: Geometry = get_geometry(self.manifest["geometry"]["name"])
        self.mask_mode = mask or self.mask_modes[0]
        if self.mask_mode not in self.mask_modes:
            raise OcclabError(f"{self.dataset}: mask must be one of {', '.join(self.mask_modes)}, got {mask!r}")
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.scenes: list[Scene] = []
        for ref in self.scene_refs():
            try:
                self.scenes.append(self.index_scene(ref))
            except OcclabError as e:
                if strict:
                    raise
                self.problems.append(str(e))

    # -- subclass hooks
    def scene_refs(self) -> list[Any]:
        """What index_scene takes, one per scene, in order."""
        raise NotImplementedError

    def index_scene(self, ref: Any) -> Scene:
        """The frames and poses of one scene (raises OcclabError naming the file when it cannot)."""
        raise NotImplementedError

    def frame_files(self, frame: Any) -> list[tuple[Path, int | None]]:
        """The files a frame needs, each with its expected size in bytes (None = not fixed)."""
        raise NotImplementedError

    def read_frame(self, frame: Any) -> tuple[np.ndarray, np.ndarray]:
        """Labels (uint8, mapped) and visibility mask (bool) of one frame."""
        raise NotImplementedError

    # -- shared machinery
    def split_dir(self) -> Path:
        """root/<the split's folder>, which must exist."""
        folder = self.manifest["splits"][self.split]["dir"]
        path = self.root / folder
        if not path.is_dir():
            raise OcclabError(f"{path}: missing folder of the {self.split} split ({self.dataset} keeps it in "
                              f"{folder}/ under the data root)")
        return path

    def warn(self, message: str) -> None:
        """Record a warning once (verify and describe print them)."""
        if message not in self.warnings:
            self.warnings.append(message)

    def to_classes(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw ids -> labels through the lookup table; ids outside the class list are an error naming the file."""
        lut = self.lut
        if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
            bad = (raw < 0) | (raw >= len(lut))
        else:
            out = lut[raw]
            bad = out < 0
            if not bad.any():
                return out.astype(np.uint8)
        values = np.unique(raw[bad])[:10].tolist()
        known = sorted(int(k) for k in self.manifest["classes"])
        raise OcclabError(f"{path}: label values {values} are not in the {self.dataset} class list "
                          f"(ids {known}, data_manifests/{self.dataset}.yaml)")

    def __len__(self) -> int:
        return len(self.scenes)

    def length(self, scene: int) -> int:
        return len(self.scenes[scene].frames)

    def load(self, scene: int, frames: np.ndarray) -> Sequence:
        """The given frames of a scene; any missing or malformed frame file is an error naming it."""
        sc = self.scenes[scene]
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        if frames.size == 0 or frames.min() < 0 or frames.max() >= len(sc.frames):
            raise OcclabError(f"{self.dataset} {self.split} scene {sc.name}: frames {frames.tolist()} outside "
                              f"0..{len(sc.frames) - 1}")
        labels = np.empty((len(frames), *self.geometry.grid), np.uint8)
        mask = np.empty(labels.shape, bool)
        for i, f in enumerate(frames):
            labels[i], mask[i] = self.read_frame(sc.frames[f])
        return build_sequence(labels, mask, sc.poses[frames], self.geometry.name, self.num_classes, **sc.extra)
