"""One 4D occupancy sequence and its occlab npz file format."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from occlab.classes import CLASS_NAMES, IGNORE
from occlab.errors import OcclabError

# Columns of the `boxes` array: one row per object per frame, in the ego frame of that frame.
BOX_FIELDS = ("frame", "cls", "cx", "cy", "cz", "l", "w", "h", "yaw", "track")
COMMANDS = ("static", "forward", "left", "right")
DENSITIES = ("light", "medium", "heavy")  # traffic density of a scene (-1 when unknown)


@dataclass
class Sequence:
    """T frames of labels (T,X,Y,Z) with visibility, ego poses and the conditions generators use."""

    labels: np.ndarray  # (T, X, Y, Z) uint8, occlab classes, 255 = ignore
    mask: np.ndarray  # (T, X, Y, Z) bool, True where the voxel was observed
    poses: np.ndarray  # (T, 4, 4) float64, ego -> world
    command: int = 1  # index into COMMANDS
    trajectory: np.ndarray | None = None  # (T, 3) float32: dx, dy, dyaw of the ego in the previous ego frame
    layout: np.ndarray | None = None  # (T, X, Y) uint8: top-down semantic map
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, len(BOX_FIELDS)), np.float32))
    geometry: str = "carlasc"
    seed: int = -1
    density: int = -1  # index into DENSITIES
    num_classes: int = len(CLASS_NAMES)  # labels lie in 0..num_classes-1 (raw reader modes have more)

    def __post_init__(self) -> None:
        validate_labels(self.labels, "labels", self.num_classes)
        if self.mask.shape != self.labels.shape:
            raise OcclabError(f"mask shape {self.mask.shape} differs from labels shape {self.labels.shape}")
        if self.trajectory is None:
            self.trajectory = trajectory_from_poses(self.poses)
        if self.layout is None:
            self.layout = bev_layout(self.labels)

    @property
    def frames(self) -> int:
        return self.labels.shape[0]

    def slice(self, frames: slice | np.ndarray) -> "Sequence":
        """A sub-sequence (e.g. a window); boxes are re-indexed to the new frame numbers."""
        index = np.arange(self.frames)[frames]
        remap = np.full(self.frames, -1)
        remap[index] = np.arange(len(index))
        boxes = self.boxes[np.isin(self.boxes[:, 0].astype(int), index)].copy()
        boxes[:, 0] = remap[boxes[:, 0].astype(int)]
        return Sequence(self.labels[index], self.mask[index], self.poses[index], self.command,
                        trajectory_from_poses(self.poses[index]), self.layout[index], boxes,
                        self.geometry, self.seed, self.density, self.num_classes)

    def crop(self, size: tuple[int, int, int], offset: tuple[int, int] | None = None) -> "Sequence":
        """An (X, Y, Z) crop: centred on the ego in x and y unless `offset` (its corner) is given, bottom layers
        in z (see Geometry.crop); boxes stay in ego metres."""
        if any(c > n for c, n in zip(size, self.labels.shape[1:])):
            raise OcclabError(f"crop {tuple(size)} is larger than the grid {self.labels.shape[1:]}")
        (cx, cy, cz), (nx, ny, _) = size, self.labels.shape[1:]
        ox, oy = offset if offset is not None else ((nx - cx) // 2, (ny - cy) // 2)
        sl = (slice(ox, ox + cx), slice(oy, oy + cy), slice(0, cz))
        labels, mask = self.labels[(slice(None), *sl)], self.mask[(slice(None), *sl)]
        return Sequence(np.ascontiguousarray(labels), np.ascontiguousarray(mask), self.poses, self.command,
                        self.trajectory, np.ascontiguousarray(self.layout[(slice(None), *sl[:2])]),
                        self.boxes, self.geometry, self.seed, self.density, self.num_classes)

    def save(self, path: str | os.PathLike) -> Path:
        """Write an occlab npz (compressed); the parent folder must be writable."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                np.savez_compressed(
                    f, labels=self.labels, mask=self.mask, poses=self.poses, command=np.int64(self.command),
                    trajectory=self.trajectory, layout=self.layout, boxes=self.boxes,
                    geometry=np.str_(self.geometry), seed=np.int64(self.seed),
                    density=np.int64(self.density), num_classes=np.int64(self.num_classes))
        except OSError as e:
            raise OcclabError(f"cannot write {path}: {e.strerror or e}; choose a writable output path") from None
        return path


def validate_labels(labels: np.ndarray, what: str, num_classes: int = len(CLASS_NAMES)) -> None:
    """Labels must be uint8 of 3 or 4 dimensions with values in 0..num_classes-1 or 255."""
    if labels.dtype != np.uint8:
        raise OcclabError(f"{what}: expected uint8 labels, got {labels.dtype}")
    if labels.ndim not in (3, 4):
        raise OcclabError(f"{what}: expected shape (T,X,Y,Z) or (X,Y,Z), got {labels.shape}")
    if labels.size == 0 or labels.max() < num_classes:
        return
    bad = (labels >= num_classes) & (labels != IGNORE)
    if bad.any():
        raise OcclabError(f"{what}: label values {sorted(set(np.unique(labels[bad]).tolist()))} are outside "
                          f"0..{num_classes - 1} (and 255 = ignore)")


def trajectory_from_poses(poses: np.ndarray) -> np.ndarray:
    """Per-frame ego motion (dx, dy, dyaw) expressed in the previous ego frame; zeros for frame 0."""
    traj = np.zeros((len(poses), 3), np.float32)
    if len(poses) > 1:
        rel = np.linalg.inv(poses[:-1]) @ poses[1:]
        traj[1:, 0] = rel[:, 0, 3]
        traj[1:, 1] = rel[:, 1, 3]
        traj[1:, 2] = np.arctan2(rel[:, 1, 0], rel[:, 0, 0])
    return traj


def bev_layout(labels: np.ndarray) -> np.ndarray:
    """Top-down semantic map: the highest non-free, non-ignored class of each column ((..., X, Y))."""
    occupied = (labels != 0) & (labels != IGNORE)
    z = labels.shape[-1]
    top = z - 1 - np.argmax(occupied[..., ::-1], axis=-1)
    layout = np.take_along_axis(labels, top[..., None], axis=-1)[..., 0]
    return np.where(occupied.any(-1), layout, 0).astype(np.uint8)


def load_sequence(path: str | os.PathLike) -> Sequence:
    """Read an occlab npz, with errors that name the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise OcclabError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise OcclabError(f"{path}: not a readable npz file ({e}); expected an occlab npz "
                          f"written by `occlab data sample`") from None
    if "labels" not in data:
        raise OcclabError(f"{path}: not an occlab npz: it has keys {sorted(data)}, expected at least 'labels'")
    labels = data["labels"]
    num_classes = int(data.get("num_classes", len(CLASS_NAMES)))
    validate_labels(labels, str(path), num_classes)
    if labels.ndim == 3:
        labels = labels[None]
    mask = data.get("mask", np.ones(labels.shape, bool)).astype(bool).reshape(labels.shape)
    t = labels.shape[0]
    poses = data.get("poses", np.tile(np.eye(4), (t, 1, 1)))
    return Sequence(labels, mask, poses, int(data.get("command", 1)), data.get("trajectory"), data.get("layout"),
                    data.get("boxes", np.zeros((0, len(BOX_FIELDS)), np.float32)),
                    str(data.get("geometry", "carlasc")), int(data.get("seed", -1)), int(data.get("density", -1)),
                    num_classes)
