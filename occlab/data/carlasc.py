"""CarlaSC / MotionSC reader (cartesian, 128x128x8); layout and classes in data_manifests/carlasc.yaml."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from occlab.data.geometry import Geometry
from occlab.data.readers import ManifestSource, Scene
from occlab.data.sequence import DENSITIES
from occlab.errors import OcclabError


def scene_density(name: str) -> int:
    """Traffic density index from a scene folder name (Town01_Light -> 0; -1 when the name has none)."""
    parts = [p.lower() for p in name.split("_")]
    return next((DENSITIES.index(p) for p in parts if p in DENSITIES), -1)


def read_poses(path: Path) -> np.ndarray:
    """poses.txt (one 3x4 row-major pose a line, 12 numbers) -> (N, 4, 4) float64."""
    if not path.is_file():
        raise OcclabError(f"{path}: missing poses file (one 3x4 row-major pose per frame, 12 numbers a line)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file is reported below, not warned about
            rows = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise OcclabError(f"{path}: not a table of numbers ({e})") from None
    if rows.shape[1:] != (12,) or len(rows) == 0:
        raise OcclabError(f"{path}: shape {rows.shape}; expected one line of 12 numbers (a 3x4 pose) per frame")
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    poses[:, :3, :] = rows.reshape(-1, 3, 4)
    return poses


def write_poses(path: Path, poses: np.ndarray) -> None:
    """(N, 4, 4) poses -> poses.txt, exact to float64 precision."""
    np.savetxt(path, np.asarray(poses)[:, :3, :].reshape(-1, 12), fmt="%.17g")


def params_json(geometry: Geometry, num_channels: int) -> dict:
    """The evaluation/params.json of a CarlaSC scene at `geometry`."""
    return {"grid_size": list(geometry.grid), "min_bound": list(geometry.min_bound),
            "max_bound": [round(b, 6) for b in geometry.max_bound], "num_channels": num_channels}


def check_params(path: Path, geometry: Geometry) -> None:
    """params.json must describe `geometry` (grid_size, min_bound, max_bound)."""
    try:
        params = json.loads(path.read_text())
        grid, lo, hi = (params[k] for k in ("grid_size", "min_bound", "max_bound"))
    except FileNotFoundError:
        raise OcclabError(f"{path}: missing (grid_size, min_bound, max_bound, num_channels)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise OcclabError(f"{path}: expected JSON with grid_size, min_bound, max_bound ({e!r})") from None
    if (list(map(int, grid)) != list(geometry.grid) or not np.allclose(lo, geometry.min_bound, atol=1e-3)
            or not np.allclose(hi, geometry.max_bound, atol=1e-3)):
        raise OcclabError(f"{path}: grid {grid} from {lo} to {hi}; occlab reads the {geometry.name} grid "
                          f"{list(geometry.grid)} from {list(geometry.min_bound)} to {list(geometry.max_bound)}")


def read_raw(path: Path, dtype: str, count: int) -> np.ndarray:
    """A flat binary file of exactly `count` values of `dtype` (e.g. "<u4", little-endian as released)."""
    if not path.is_file():
        raise OcclabError(f"{path}: missing frame file")
    size, expected = path.stat().st_size, count * np.dtype(dtype).itemsize
    if size != expected:
        raise OcclabError(f"{path}: {size} bytes; expected {count} {np.dtype(dtype).name} values ({expected} bytes)")
    return np.fromfile(path, dtype=dtype)


class CarlaSCSource(ManifestSource):
    """CarlaSC scenes: <Split>/<Town>_<density>/cartesian/{evaluation/NNNNNN.label|.bin, poses.txt}.

    Options: classes="occlab" (11 labels) | "raw" (the 23 CarlaSC ids); mask="counts" (visible where the point
    count is > 0) | "none".
    """

    dataset = "carlasc"
    mask_modes = ("counts", "none")

    def scene_refs(self) -> list[Path]:
        return sorted(p for p in self.split_dir().iterdir() if p.is_dir())

    def index_scene(self, path: Path) -> Scene:
        cart = path / "cartesian"
        ev = cart / "evaluation"
        if not ev.is_dir():
            raise OcclabError(f"{ev}: missing folder; a CarlaSC scene is "
                              f"<Split>/<Town>_<density>/cartesian/evaluation/")
        check_params(ev / "params.json", self.geometry)
        stems = sorted({p.stem for p in ev.glob("*.label")} | {p.stem for p in ev.glob("*.bin")})
        poses = read_poses(cart / "poses.txt")
        if len(poses) != len(stems):
            raise OcclabError(_count_mismatch(cart / "poses.txt", len(poses), ev, stems))
        return Scene(path.name, [ev / s for s in stems], poses, {"density": scene_density(path.name)})

    def frame_files(self, frame: Path) -> list[tuple[Path, int | None]]:
        n = 4 * int(np.prod(self.geometry.grid))
        return [(frame.with_suffix(".label"), n), (frame.with_suffix(".bin"), n)]

    def read_frame(self, frame: Path) -> tuple[np.ndarray, np.ndarray]:
        grid = self.geometry.grid
        label = frame.with_suffix(".label")
        labels = self.to_classes(read_raw(label, "<u4", int(np.prod(grid))).reshape(grid), label)
        if self.mask_mode == "none":
            return labels, np.ones(grid, bool)
        return labels, read_raw(frame.with_suffix(".bin"), "<f4", int(np.prod(grid))).reshape(grid) > 0


def _count_mismatch(poses_path: Path, n_poses: int, ev: Path, stems: list[str]) -> str:
    """Pose/frame count mismatch message, naming the missing frames when the ids are a contiguous run."""
    msg = f"{poses_path}: {n_poses} poses but {len(stems)} frames in {ev}; expected one pose per frame"
    if stems and all(s.isdigit() for s in stems) and n_poses > len(stems):
        ids, width = [int(s) for s in stems], len(stems[0])
        gone = sorted(set(range(ids[0], ids[0] + n_poses)) - set(ids))
        if len(gone) == n_poses - len(stems):
            msg += "; missing frames: " + ", ".join(str(ev / f"{i:0{width}d}.label") for i in gone[:3])
    return msg
