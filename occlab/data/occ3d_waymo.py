"""Occ3D-Waymo reader (0.4 m, 200x200x16); layout, classes and the free id in data_manifests/occ3d_waymo.yaml."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from occlab.data.carlasc import read_poses
from occlab.data.readers import ManifestSource, Scene, check_array, read_npz
from occlab.errors import OcclabError

FRAME = re.compile(r"(\d+)_04\.npz")
NO_POSES = ("the Occ3D-Waymo layout carries no ego poses (they sit in the release's pickles): poses are identity; "
            "put a poses.txt (12 numbers per frame, CarlaSC format) beside a scene's frames to supply them")


class Occ3DWaymoSource(ManifestSource):
    """Occ3D-Waymo scenes: <split>/<seq:03d>/<frame:03d>_04.npz, frames 000..N-1 (a gap is a missing file).

    Options: classes="occlab" (12 labels) | "raw" or 15 (0 = free, 1..15 = Occ3D-Waymo 0..14);
    mask="camera" (infov & final_voxel_state, as Occ3D trains) | "lidar" (origin_voxel_state) | "fov" (infov) |
    "none". Poses come from an optional poses.txt per scene, else identity (a warning says so).
    """

    dataset = "occ3d_waymo"
    mask_modes = ("camera", "lidar", "fov", "none")
    MASK_KEYS = {"camera": ("infov", "final_voxel_state"), "lidar": ("origin_voxel_state",), "fov": ("infov",),
                 "none": ()}

    def scene_refs(self) -> list[Path]:
        return sorted(p for p in self.split_dir().iterdir() if p.is_dir())

    def index_scene(self, path: Path) -> Scene:
        ids = sorted(int(m.group(1)) for p in path.iterdir() if (m := FRAME.fullmatch(p.name)))
        if not ids:
            raise OcclabError(f"{path}: no <frame:03d>_04.npz files in this scene folder")
        frames = [path / f"{i:03d}_04.npz" for i in range(ids[-1] + 1)]
        if (path / "poses.txt").is_file():
            poses = read_poses(path / "poses.txt")
            if len(poses) != len(frames):
                raise OcclabError(f"{path / 'poses.txt'}: {len(poses)} poses for frames 000..{ids[-1]:03d}; "
                                  f"expected one pose per frame")
        else:
            poses = np.tile(np.eye(4), (len(frames), 1, 1))
            self.warn(NO_POSES)
        return Scene(path.name, frames, poses)

    def frame_files(self, frame: Path) -> list[tuple[Path, int | None]]:
        return [(frame, None)]

    def read_frame(self, frame: Path) -> tuple[np.ndarray, np.ndarray]:
        grid = self.geometry.grid
        keys = self.MASK_KEYS[self.mask_mode]
        data = read_npz(frame, ["voxel_label", *keys])
        labels = self.to_classes(check_array(data["voxel_label"], frame, "voxel_label", grid), frame)
        mask = np.ones(grid, bool)
        for k in keys:
            mask &= check_array(data[k], frame, k, grid) != 0
        return labels, mask
