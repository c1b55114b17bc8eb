"""SemanticKITTI semantic scene completion reader (256x256x32, 0.2 m), and SSCBench-KITTI-360 (same voxel files).

Layout, splits and the class mapping to occlab: data_manifests/semantickitti.yaml and sscbench_kitti360.yaml.
Each sequence folder holds `voxels/NNNNNN.{bin,label,invalid,occluded}`, one frame every 5th lidar scan:

- `.label`: one little-endian uint16 raw SemanticKITTI id per voxel (0 = empty), 256*256*32 values, C order with
  x (ahead) slowest and z (up) fastest; the learning map below turns them into the SSC classes.
- `.invalid`, `.occluded`, `.bin`: one bit per voxel, packed eight to a byte, most significant bit first
  (`np.unpackbits` / `np.packbits` with their default bit order). `.invalid` marks voxels no scan of the sequence
  observed (ignored in evaluation: label 255), `.occluded` those hidden from the current scan, `.bin` the voxels
  the current scan hits (the SSC input; read by `load_input`).

Poses: `sequences/NN/poses.txt` holds one camera-0 pose per lidar scan (12 numbers, 3x4 row-major) and
`calib.txt` the lidar -> camera transform `Tr`; the lidar (voxel-frame) pose of scan i is inv(Tr) @ P_i @ Tr, as
semantic-kitti-api's generate_sequential.py composes it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from occlab.classes import IGNORE
from occlab.data.carlasc import read_poses
from occlab.data.readers import ManifestSource, Scene
from occlab.errors import OcclabError

GRID = (256, 256, 32)
VOXELS = GRID[0] * GRID[1] * GRID[2]
LABEL_BYTES = 2 * VOXELS  # uint16 per voxel
PACKED_BYTES = VOXELS // 8  # one bit per voxel
HELP = ("a SemanticKITTI SSC voxel file holds 256x256x32 voxels: .label 4194304 bytes (a uint16 each), .bin, "
        ".invalid and .occluded 262144 bytes (a bit each); re-extract it from the release archive")

# Raw SemanticKITTI ids -> (name, SSC class 0..19): the `labels` and `learning_map` tables of semantic-kitti.yaml
# (PRBonn/semantic-kitti-api, config/semantic-kitti.yaml). SSC class 0 is "unlabeled" in the yaml; for voxels only
# raw 0 is empty: every other id the map sends to 0 is ignored (255), as the benchmark's evaluate_completion.py
# builds its lookup table ("remap_lut[remap_lut == 0] = 255; remap_lut[0] = 0").
SEMANTICKITTI_IDS: dict[int, tuple[str, int]] = {
    0: ("unlabeled", 0), 1: ("outlier", 0), 10: ("car", 1), 11: ("bicycle", 2), 13: ("bus", 5),
    15: ("motorcycle", 3), 16: ("on-rails", 5), 18: ("truck", 4), 20: ("other-vehicle", 5), 30: ("person", 6),
    31: ("bicyclist", 7), 32: ("motorcyclist", 8), 40: ("road", 9), 44: ("parking", 10), 48: ("sidewalk", 11),
    49: ("other-ground", 12), 50: ("building", 13), 51: ("fence", 14), 52: ("other-structure", 0),
    60: ("lane-marking", 9), 70: ("vegetation", 15), 71: ("trunk", 16), 72: ("terrain", 17), 80: ("pole", 18),
    81: ("traffic-sign", 19), 99: ("other-object", 0), 252: ("moving-car", 1), 253: ("moving-bicyclist", 7),
    254: ("moving-person", 6), 255: ("moving-motorcyclist", 8), 256: ("moving-on-rails", 5), 257: ("moving-bus", 5),
    258: ("moving-truck", 4), 259: ("moving-other-vehicle", 5),
}
# The 19 SSC classes (learning_map_inv order); 0 = empty.
SEMANTICKITTI_CLASSES = ("empty", "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
                         "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
                         "vegetation", "trunk", "terrain", "pole", "traffic-sign")

# SSCBench-KITTI-360: the same raw ids, its own learning map (ai4ce/SSCBench, dataset/configs/kitti360.yaml):
# 18 classes; bicyclist, motorcyclist and trunk are dropped, other-structure and other-object kept.
KITTI360_LEARNING_MAP: dict[int, int] = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 0, 32: 0, 40: 7, 44: 8, 48: 9, 49: 10,
    50: 11, 51: 12, 52: 17, 60: 7, 70: 13, 71: 0, 72: 14, 80: 15, 81: 16, 99: 18, 252: 1, 253: 0, 254: 6, 255: 0,
    256: 5, 257: 5, 258: 4, 259: 5,
}
KITTI360_CLASSES = ("empty", "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "road", "parking",
                    "sidewalk", "other-ground", "building", "fence", "vegetation", "terrain", "pole", "traffic-sign",
                    "other-structure", "other-object")


def completion_lut(learning_map: dict[int, int]) -> np.ndarray:
    """Raw id -> SSC class (int16; 255 = ignored, -1 = not a SemanticKITTI id) as the SSC evaluation reads labels."""
    lut = np.full(max(learning_map) + 1, -1, np.int16)
    for raw, cls in learning_map.items():
        lut[raw] = cls if (cls or raw == 0) else IGNORE
    return lut


LEARNING_MAP: dict[int, int] = {raw: cls for raw, (_, cls) in SEMANTICKITTI_IDS.items()}


# ------------------------------------------------------------------------------------------------ files
def _check_size(path: Path, expected: tuple[int, ...]) -> int:
    if not path.is_file():
        raise OcclabError(f"{path}: missing frame file (every frame in voxels/ needs its .label and .invalid, and "
                          f".occluded for mask='visible'); re-extract the sequence from the release archive")
    size = path.stat().st_size
    if size not in expected:
        raise OcclabError(f"{path}: {size} bytes; expected {' or '.join(map(str, expected))}: {HELP}")
    return size


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A .label file: the flat (256*256*32,) uint16 raw ids; an error naming the file when missing or mis-sized."""
    path = Path(path)
    _check_size(path, (LABEL_BYTES,))
    return np.fromfile(path, dtype="<u2")


def read_bits(path: str | os.PathLike, unpacked_ok: bool = False) -> np.ndarray:
    """A bit-packed .bin/.invalid/.occluded file (MSB first) as a flat bool array of 256*256*32 voxels.

    unpacked_ok also accepts one byte per voxel (SSCBench-KITTI-360's .invalid files are stored so)."""
    path = Path(path)
    size = _check_size(path, (PACKED_BYTES, VOXELS) if unpacked_ok else (PACKED_BYTES,))
    data = np.fromfile(path, dtype=np.uint8)
    if size == VOXELS:
        return data != 0
    return np.unpackbits(data).astype(bool)


def write_bits(path: str | os.PathLike, bits: np.ndarray) -> None:
    """Write a bool voxel grid as a bit-packed file, MSB first (the inverse of read_bits)."""
    np.packbits(np.asarray(bits, bool).reshape(-1)).tofile(path)


def read_calib(path: Path) -> dict[str, np.ndarray]:
    """A KITTI calib.txt ("KEY: 12 numbers" a line) -> {KEY: 4x4}; it must hold Tr (lidar -> camera 0)."""
    if not path.is_file():
        raise OcclabError(f"{path}: missing")
    out: dict[str, np.ndarray] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, values = line.partition(":")
        try:
            numbers = np.array(values.split(), np.float64)
        except ValueError:
            raise OcclabError(f"{path}, line {n}: expected 'KEY: 12 numbers', got {line[:60]!r}") from None
        if numbers.size != 12:
            raise OcclabError(f"{path}, line {n}: {key.strip()} has {numbers.size} numbers; expected 12 (3x4)")
        out[key.strip()] = np.vstack([numbers.reshape(3, 4), [0, 0, 0, 1]])
    if "Tr" not in out:
        raise OcclabError(f"{path}: no 'Tr:' line (the lidar -> camera 0 transform); it has {', '.join(out) or 'none'}")
    return out


def write_calib(path: Path, tr: np.ndarray) -> None:
    """A calib.txt with placeholder projections P0..P3 and the given Tr (4x4, lidar -> camera 0)."""
    p = np.array([[718.856, 0, 607.1928, 0], [0, 718.856, 185.2157, 0], [0, 0, 1, 0]])
    rows = [("P0", p), ("P1", p), ("P2", p), ("P3", p), ("Tr", np.asarray(tr)[:3])]
    path.write_text("".join(f"{k}: {' '.join(f'{v:.17g}' for v in m.reshape(-1))}\n" for k, m in rows))


# A lidar -> camera-0 transform of KITTI's kind (x ahead, y left, z up -> x right, y down, z ahead); exports use it.
EXPORT_TR = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -0.08], [1.0, 0.0, 0.0, -0.27], [0.0, 0.0, 0.0, 1.0]])


# ------------------------------------------------------------------------------------------------ reader
class SemanticKITTISource(ManifestSource):
    """SemanticKITTI SSC sequences: sequences/<NN>/voxels/<NNNNNN>.{label,invalid,occluded,bin}, frames in order.

    Options: classes="occlab" (12 labels, DESIGN.md §2) | "raw" or 19 (0 = empty, 1..19 = the SSC classes of
    semantic-kitti.yaml; see class_names); mask="valid" (not .invalid: what the SSC benchmark scores) | "visible"
    (also not .occluded: what the current scan sees) | "none". Invalid voxels are labelled 255 in every mode.
    sequences=[...] overrides the split's sequence list. The frames of a scene are the voxel frames in order (every
    5th lidar scan in the release: 0.5 s apart); a gap in their numbering is a missing frame (reported, never
    skipped). Poses from poses.txt + calib.txt; identity, with a warning, when the sequence has none.
    """

    dataset = "semantickitti"
    mask_modes = ("valid", "visible", "none")
    learning_map: dict[int, int] = LEARNING_MAP
    unpacked_invalid = False  # SSCBench-KITTI-360 stores .invalid as one byte per voxel

    def __init__(self, data_root: str | os.PathLike | None, split: str = "train", classes: str | int = "occlab",
                 mask: str | None = None, strict: bool = True, sequences: list[str] | None = None):
        self._sequences = None if sequences is None else [str(s) for s in sequences]
        super().__init__(data_root, split, classes, mask, strict)
        self.ssc_lut = self.lut  # SSC class -> label (identity in raw mode), from the manifest's class table
        ssc = completion_lut(self.learning_map)
        lut = np.where(ssc == IGNORE, IGNORE, -1).astype(np.int16)
        kept = (ssc >= 0) & (ssc != IGNORE)
        lut[kept] = self.ssc_lut[ssc[kept]]
        self.lut = lut  # raw id -> label (255 = ignored, -1 = not a SemanticKITTI id)

    # -- layout
    def sequence_dir(self, name: str) -> Path:
        return self.root / self.manifest["layout"]["sequence_dir"].format(seq=name)

    def scene_refs(self) -> list[str]:
        names = self._sequences or [str(s) for s in self.manifest["splits"][self.split]["sequences"]]
        present = [n for n in names if (self.sequence_dir(n) / "voxels").is_dir()]
        absent = [n for n in names if n not in present]
        if not present:
            where = str(self.sequence_dir(names[0]) / "voxels") + (", ..." if len(names) > 1 else "")
            raise OcclabError(f"{self.dataset} {self.split}: no voxels/ folder of sequences {', '.join(names)} "
                              f"(looked for {where}); the data root must hold "
                              f"{self.manifest['layout']['sequence_dir'].format(seq='<NN>')}/voxels/")
        if absent:
            self.warn(f"sequences {', '.join(absent)} of the {self.split} split are absent (no "
                      f"{self.sequence_dir(absent[0]) / 'voxels'}); reading {', '.join(present)}")
        return present

    def index_scene(self, name: str) -> Scene:
        folder = self.sequence_dir(name)
        voxels = folder / "voxels"
        stems = {p.stem for p in voxels.glob("*.label")} | {p.stem for p in voxels.glob("*.invalid")}
        bad = sorted(s for s in stems if not s.isdigit())
        if bad:
            raise OcclabError(f"{voxels / (bad[0] + '.label')}: frame files are named NNNNNN (the scan number)")
        ids = sorted(int(s) for s in stems)
        if not ids:
            raise OcclabError(f"{voxels}: no NNNNNN.label / .invalid frame files in this sequence")
        # the step between frames: the gcd of the numbers, or the release's step (every 5th scan) where that fits,
        # so that 000000, 000010 is a gap at 000005 rather than a sequence of step 10
        nominal = int(self.manifest["layout"].get("frame_step", 1))
        step = math.gcd(*[i - ids[0] for i in ids[1:]]) or nominal
        step = nominal if step % nominal == 0 else step
        width = max(len(s) for s in stems)
        frames = [voxels / f"{i:0{width}d}" for i in range(ids[0], ids[-1] + 1, step)]
        return Scene(name, frames, self.scene_poses(folder, [int(f.name) for f in frames]))

    def scene_poses(self, folder: Path, scans: list[int]) -> np.ndarray:
        """Lidar -> world pose of each frame (scan numbers `scans`): inv(Tr) @ P_scan @ Tr."""
        poses_path, calib_path = folder / "poses.txt", folder / "calib.txt"
        if not poses_path.is_file():
            self.warn(f"{poses_path}: missing, poses are identity; poses.txt comes with the SemanticKITTI labels "
                      f"and calib.txt with the KITTI odometry calibration")
            return np.tile(np.eye(4), (len(scans), 1, 1))
        if not calib_path.is_file():
            self.warn(f"{calib_path}: missing, so poses are identity (poses.txt holds camera poses; calib.txt's Tr "
                      f"turns them into lidar poses); get it from the KITTI odometry calibration archive")
            return np.tile(np.eye(4), (len(scans), 1, 1))
        cam = read_poses(poses_path)
        if scans[-1] >= len(cam):
            raise OcclabError(f"{poses_path}: {len(cam)} poses, but the voxel frames reach scan {scans[-1]}; "
                              f"expected one pose per lidar scan of the sequence")
        tr = read_calib(calib_path)["Tr"]
        return np.linalg.inv(tr) @ cam[scans] @ tr

    def frame_files(self, frame: Path) -> list[tuple[Path, int | None]]:
        invalid = None if self.unpacked_invalid else PACKED_BYTES
        files = [(frame.with_suffix(".label"), LABEL_BYTES), (frame.with_suffix(".invalid"), invalid)]
        if self.mask_mode == "visible":
            files.append((frame.with_suffix(".occluded"), PACKED_BYTES))
        return files

    # -- reading
    def to_classes(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw ids -> labels; an id outside the learning map is an error naming the file."""
        lut = self.lut
        if raw.size and int(raw.max()) < len(lut):
            out = lut[raw]
            bad = out < 0
            if not bad.any():
                return out.astype(np.uint8)
        else:
            bad = (raw >= len(lut)) | (lut[np.minimum(raw, len(lut) - 1)] < 0)
        values = np.unique(raw[bad])[:10].tolist()
        raise OcclabError(f"{path}: label values {values} are not SemanticKITTI ids (the learning map knows "
                          f"{sorted(self.learning_map)}); the file is corrupt or not an SSC voxel .label")

    def read_frame(self, frame: Path) -> tuple[np.ndarray, np.ndarray]:
        label = frame.with_suffix(".label")
        raw = read_label(label)
        labels = self.to_classes(raw, label)
        invalid = read_bits(frame.with_suffix(".invalid"), self.unpacked_invalid)
        invalid = self.adjust_invalid(invalid, raw)
        labels[invalid] = IGNORE
        if self.mask_mode == "none":
            mask = np.ones(VOXELS, bool)
        else:
            mask = ~invalid
            if self.mask_mode == "visible":
                mask &= ~read_bits(frame.with_suffix(".occluded"))
        return labels.reshape(GRID), mask.reshape(GRID)

    def adjust_invalid(self, invalid: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """The invalid voxels used (SemanticKITTI: the file as it is)."""
        return invalid

    def load_input(self, scene: int, frames: np.ndarray) -> np.ndarray:
        """The SSC input of the given frames: (T, 256, 256, 32) bool, the voxels the frame's own scan hits (.bin)."""
        sc = self.scenes[scene]
        return np.stack([read_bits(sc.frames[f].with_suffix(".bin"), self.unpacked_invalid).reshape(GRID)
                         for f in np.asarray(frames, np.int64).reshape(-1)])


class SSCBenchKITTI360Source(SemanticKITTISource):
    """SSCBench-KITTI-360: data_2d_raw/2013_05_28_drive_<NNNN>_sync/voxels/<NNNNNN>.{label,invalid,bin}.

    As SemanticKITTISource, with SSCBench's learning map (classes="raw" or 18), no .occluded files (mask="valid" |
    "none"), .invalid read bit-packed or one byte per voxel, and labelled voxels never invalid (as SSCBench's
    preprocess.py clears them). Poses: the release's pose files are not read; a poses.txt beside voxels/ (CarlaSC
    format, one lidar -> world 3x4 pose per voxel frame) is, else poses are identity with a warning.
    """

    dataset = "sscbench_kitti360"
    mask_modes = ("valid", "none")
    learning_map = KITTI360_LEARNING_MAP
    unpacked_invalid = True

    def scene_poses(self, folder: Path, scans: list[int]) -> np.ndarray:
        path = folder / "poses.txt"
        if not path.is_file():
            self.warn(f"{self.dataset}: poses are identity (occlab does not read SSCBench's pose.txt / "
                      f"cam0_to_world.txt); put a poses.txt (12 numbers per voxel frame, CarlaSC format) beside a "
                      f"sequence's voxels/ to supply them")
            return np.tile(np.eye(4), (len(scans), 1, 1))
        poses = read_poses(path)
        if len(poses) != len(scans):
            raise OcclabError(f"{path}: {len(poses)} poses for {len(scans)} voxel frames; expected one per frame")
        return poses

    def adjust_invalid(self, invalid: np.ndarray, raw: np.ndarray) -> np.ndarray:
        return invalid & (raw == 0)
