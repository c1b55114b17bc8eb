"""Sliding windows of T frames over any sequence source, as a torch Dataset."""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from occlab.data.geometry import Geometry
from occlab.data.sequence import BOX_FIELDS, Sequence
from occlab.errors import OcclabError

MAX_BOXES = 64  # boxes per frame in a batched item; padded rows have cls = -1


class SequenceSource(Protocol):
    """What a dataset reader provides: scenes of frames on one geometry."""

    name: str
    geometry: Geometry
    num_classes: int

    def __len__(self) -> int:
        """Number of scenes."""

    def length(self, scene: int) -> int:
        """Number of frames of a scene."""

    def load(self, scene: int, frames: np.ndarray) -> Sequence:
        """The given frame indices of a scene as one Sequence."""


class WindowDataset(Dataset):
    """Every window of `frames` frames, `skip` apart, starting every `stride` frames of every scene.

    `crop` (X, Y, Z) keeps a smaller grid (the study presets'): centred on the ego (`crop_mode="center"`), or at
    a fixed window-specific place anywhere in the grid (`"spread"`), so that small crops still see buildings,
    vehicles and the rest of the town rather than mostly the road under the ego.
    """

    def __init__(self, source: SequenceSource, frames: int, stride: int = 1, skip: int = 1,
                 crop: tuple[int, int, int] | None = None, crop_mode: str = "center"):
        if frames < 1 or stride < 1 or skip < 1:
            raise OcclabError(f"frames, stride and skip must be >= 1, got {frames}, {stride}, {skip}")
        self.source, self.frames, self.stride, self.skip = source, frames, stride, skip
        if crop_mode not in ("center", "spread"):
            raise OcclabError(f"crop_mode must be 'center' or 'spread', got {crop_mode!r}")
        self.crop, self.crop_mode = (tuple(crop) if crop is not None else None), crop_mode
        span = (frames - 1) * skip + 1
        self.index = [(s, start) for s in range(len(source))
                      for start in range(0, source.length(s) - span + 1, stride)]
        if not self.index:
            longest = max((source.length(s) for s in range(len(source))), default=0)
            raise OcclabError(f"{source.name}: no window of {frames} frames (skip {skip}) fits; the longest "
                              f"scene has {longest} frames; ask for fewer frames")

    def __len__(self) -> int:
        return len(self.index)

    def window(self, i: int) -> Sequence:
        """Window i as a Sequence (numpy, with boxes)."""
        scene, start = self.index[i]
        seq = self.source.load(scene, start + self.skip * np.arange(self.frames))
        if not self.crop:
            return seq
        offset = None
        if self.crop_mode == "spread":  # a fixed, window-specific place anywhere in the grid
            rng = np.random.default_rng([scene, start, 7])
            offset = tuple(int(rng.integers(0, n - c + 1)) for n, c in zip(seq.labels.shape[1:3], self.crop[:2]))
        return seq.crop(self.crop, offset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return to_item(self.window(i))


def to_item(seq: Sequence) -> dict[str, torch.Tensor]:
    """Fixed-shape tensors for batching: labels, mask, poses, command, trajectory, layout, boxes."""
    boxes = np.zeros((seq.frames, MAX_BOXES, len(BOX_FIELDS)), np.float32)
    boxes[..., 1] = -1
    for t in range(seq.frames):
        rows = seq.boxes[seq.boxes[:, 0] == t][:MAX_BOXES]
        boxes[t, : len(rows)] = rows
    return {
        "labels": torch.from_numpy(np.ascontiguousarray(seq.labels)),
        "mask": torch.from_numpy(np.ascontiguousarray(seq.mask)),
        "poses": torch.from_numpy(seq.poses.astype(np.float32)),
        "command": torch.tensor(seq.command, dtype=torch.long),
        "trajectory": torch.from_numpy(seq.trajectory.astype(np.float32)),
        "layout": torch.from_numpy(np.ascontiguousarray(seq.layout)),
        "boxes": torch.from_numpy(boxes),
    }
