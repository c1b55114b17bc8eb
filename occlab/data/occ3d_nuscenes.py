"""Occ3D-nuScenes reader (200x200x16); layout and classes in data_manifests/occ3d_nuscenes.yaml."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from occlab.data.readers import ManifestSource, Scene, check_array, read_npz
from occlab.errors import OcclabError


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) -> 3x3 rotation matrix."""
    w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def matrix_to_quat(r: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix -> unit quaternion (w, x, y, z) with w >= 0 (Shepperd's method)."""
    r = np.asarray(r, np.float64)
    tr = np.trace(r)
    i = int(np.argmax([tr, r[0, 0], r[1, 1], r[2, 2]]))
    if i == 0:
        s = 2 * np.sqrt(1 + tr)
        q = [s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    else:
        a, b, c = [(0, 1, 2), (1, 2, 0), (2, 0, 1)][i - 1]
        s = 2 * np.sqrt(1 + r[a, a] - r[b, b] - r[c, c])
        q = [0.0] * 4
        q[0] = (r[c, b] - r[b, c]) / s
        q[1 + a], q[1 + b], q[1 + c] = s / 4, (r[a, b] + r[b, a]) / s, (r[a, c] + r[c, a]) / s
    q = np.array(q)
    return q if q[0] >= 0 else -q


def ego_pose_matrix(info: dict, where: str) -> np.ndarray:
    """scene_infos[scene][token] -> 4x4 ego -> world from ego_pose {translation, rotation [w, x, y, z]}."""
    try:
        t = np.asarray(info["ego_pose"]["translation"], np.float64).reshape(3)
        q = np.asarray(info["ego_pose"]["rotation"], np.float64).reshape(4)
        if not np.linalg.norm(q) > 0:
            raise ValueError("zero quaternion")
    except (KeyError, TypeError, ValueError) as e:
        raise OcclabError(f"{where}: expected ego_pose {{translation [x, y, z], rotation [w, x, y, z]}} "
                          f"({e!r})") from None
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = quat_to_matrix(q), t
    return pose


def read_annotations(path: Path) -> dict:
    """The release's annotations.json (splits, per-scene token order, ego poses); do not modify the result."""
    if not path.is_file():
        raise OcclabError(f"{path}: missing; Occ3D-nuScenes takes its frame order, splits and ego poses from it")
    stat = path.stat()
    return _parse_annotations(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _parse_annotations(path: str, mtime_ns: int, size: int) -> dict:
    """Parsed once per file version: the train and val sources of one release share it."""
    try:
        ann = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise OcclabError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(ann, dict) or not isinstance(ann.get("scene_infos"), dict):
        raise OcclabError(f"{path}: expected an object with train_split, val_split and scene_infos")
    return ann


class Occ3DNuScenesSource(ManifestSource):
    """Occ3D-nuScenes scenes in annotations.json order: gts/<scene>/<token>/labels.npz.

    Options: classes="occlab" (12 labels) | "raw" or 17 (0 = free, 1..17 = Occ3D 0..16; see class_names);
    mask="camera" (mask_camera, the Occ3D evaluation mask) | "lidar" (mask_lidar) | "none".
    """

    dataset = "occ3d_nuscenes"
    mask_modes = ("camera", "lidar", "none")
    MASK_KEYS = {"camera": "mask_camera", "lidar": "mask_lidar"}

    def scene_refs(self) -> list[tuple[str, Any]]:
        path = self.root / "annotations.json"
        ann = read_annotations(path)
        key = self.manifest["splits"][self.split]["annotations_key"]
        if not isinstance(ann.get(key), list):
            raise OcclabError(f"{path}: no {key!r} list of scene names")
        return [(str(name), ann["scene_infos"].get(name)) for name in ann[key]]

    def index_scene(self, ref: tuple[str, Any]) -> Scene:
        name, infos = ref
        ann = self.root / "annotations.json"
        if not isinstance(infos, dict) or not infos:
            raise OcclabError(f"{ann}: scene {name} is in the {self.split} split but has no frames in scene_infos")
        tokens = list(infos)
        poses = np.stack([ego_pose_matrix(infos[t], f"{ann}: scene_infos[{name}][{t}]") for t in tokens])
        return Scene(name, [self.root / "gts" / name / t / "labels.npz" for t in tokens], poses)

    def frame_files(self, frame: Path) -> list[tuple[Path, int | None]]:
        return [(frame, None)]

    def read_frame(self, frame: Path) -> tuple[np.ndarray, np.ndarray]:
        grid = self.geometry.grid
        key = self.MASK_KEYS.get(self.mask_mode)
        data = read_npz(frame, ["semantics"] + ([key] if key else []))
        labels = self.to_classes(check_array(data["semantics"], frame, "semantics", grid), frame)
        if key is None:
            return labels, np.ones(grid, bool)
        return labels, check_array(data[key], frame, key, grid) != 0
