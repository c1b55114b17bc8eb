"""Write sequences in the real datasets' file layouts, so the real readers can be run end to end.

Each occlab class is written as one raw id (the manifest's `export` table). CarlaSC and Occ3D-nuScenes exports
read back identical; Occ3D-Waymo has no barrier or ground class, so those read back as other and sidewalk;
SemanticKITTI SSC has no `other` class, so it reads back as 255 (ignored).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from occlab.classes import CLASS_ID, CLASS_NAMES, IGNORE
from occlab.data.carlasc import params_json, write_poses
from occlab.data.geometry import get_geometry
from occlab.data.manifest import load_manifest
from occlab.data.occ3d_nuscenes import matrix_to_quat
from occlab.data.semantickitti import EXPORT_TR, write_bits, write_calib
from occlab.data.sequence import DENSITIES, Sequence
from occlab.errors import OcclabError


def _prepare(sequences: Sequence | Iterable[Sequence], dataset: str) -> tuple[list[Sequence], list[np.ndarray], dict]:
    """The sequences, their labels as the dataset's raw ids, and the manifest; errors for what cannot be written."""
    seqs = [sequences] if isinstance(sequences, Sequence) else list(sequences)
    manifest = load_manifest(dataset)
    geometry = get_geometry(manifest["geometry"]["name"])
    lut = np.full(256, -1, np.int64)
    for name, raw in manifest["export"].items():
        lut[CLASS_ID[name]] = raw
    raws = []
    for i, seq in enumerate(seqs):
        if seq.labels.shape[1:] != tuple(geometry.grid):
            raise OcclabError(f"{dataset} export: sequence {i} has labels {seq.labels.shape} ({seq.geometry}); "
                              f"{dataset} needs the {geometry.name} grid {geometry.grid}")
        raw = lut[seq.labels]
        if (raw < 0).any():
            bad = np.unique(seq.labels[raw < 0]).tolist()
            names = [CLASS_NAMES[b] if b < len(CLASS_NAMES) else ("ignore" if b == IGNORE else str(b)) for b in bad]
            raise OcclabError(f"{dataset} export: sequence {i} has {int((raw < 0).sum())} voxels of {names}, which "
                              f"{dataset} has no id for; relabel them first (e.g. bicycle -> vehicle)")
        raws.append(raw)
    return seqs, raws, manifest


@contextlib.contextmanager
def _writing(root: str | os.PathLike) -> Iterator[None]:
    """Turn OS errors while writing under `root` into one-line OcclabErrors."""
    try:
        yield
    except OSError as e:
        raise OcclabError(f"cannot write under {root}: {e}; choose a writable folder") from None


def export_carlasc(sequences: Sequence | Iterable[Sequence], root: str | os.PathLike, split: str = "train",
                   town: str = "Town10", density: str | None = None) -> list[Path]:
    """Write <Split>/<town>_<density>[_NNN]/cartesian/ scene folders (one per sequence); returns them.

    density=None names each folder after its sequence's own traffic density (Medium when unknown)."""
    seqs, raws, manifest = _prepare(sequences, "carlasc")
    geometry = get_geometry(manifest["geometry"]["name"])
    split_dir = Path(root) / manifest["splits"][split]["dir"]
    scenes = []
    with _writing(root):
        for i, (seq, raw) in enumerate(zip(seqs, raws)):
            dens = density or (DENSITIES[seq.density].title() if 0 <= seq.density < len(DENSITIES) else "Medium")
            scene = split_dir / (f"{town}_{dens}" if len(seqs) == 1 else f"{town}_{dens}_{i:03d}")
            ev = scene / "cartesian" / "evaluation"
            ev.mkdir(parents=True, exist_ok=True)
            for t in range(seq.frames):
                raw[t].astype("<u4").tofile(ev / f"{t:06d}.label")
                seq.mask[t].astype("<f4").tofile(ev / f"{t:06d}.bin")
            (ev / "params.json").write_text(json.dumps(params_json(geometry, 11)))
            write_poses(scene / "cartesian" / "poses.txt", seq.poses)
            np.savetxt(scene / "cartesian" / "times.txt", np.arange(seq.frames) / manifest["geometry"]["rate_hz"])
            scenes.append(scene)
    return scenes


def export_occ3d_nuscenes(sequences: Sequence | Iterable[Sequence], root: str | os.PathLike, split: str = "train",
                          prefix: str = "synth", rate_hz: float = 10.0) -> list[Path]:
    """Write gts/<scene>/<token>/labels.npz and add the scenes to annotations.json (created or extended)."""
    seqs, raws, manifest = _prepare(sequences, "occ3d_nuscenes")
    root = Path(root)
    ann_path = root / "annotations.json"
    key = manifest["splits"][split]["annotations_key"]
    scenes = []
    with _writing(root):
        root.mkdir(parents=True, exist_ok=True)
        ann = json.loads(ann_path.read_text()) if ann_path.is_file() else {}
        for k in ("train_split", "val_split"):
            ann.setdefault(k, [])
        ann.setdefault("scene_infos", {})
        for i, (seq, raw) in enumerate(zip(seqs, raws)):
            name = f"{prefix}-{split}-{i:04d}"
            tokens = [hashlib.md5(f"{name}/{t}".encode()).hexdigest() for t in range(seq.frames)]
            infos = {}
            for t, token in enumerate(tokens):
                folder = root / "gts" / name / token
                folder.mkdir(parents=True, exist_ok=True)
                m = seq.mask[t].astype(np.uint8)
                np.savez_compressed(folder / "labels.npz", semantics=raw[t].astype(np.uint8), mask_lidar=m,
                                    mask_camera=m)
                infos[token] = {
                    "timestamp": int(round(t * 1e6 / rate_hz)),
                    "ego_pose": {"translation": seq.poses[t, :3, 3].tolist(),
                                 "rotation": matrix_to_quat(seq.poses[t, :3, :3]).tolist()},
                    "gt_path": f"gts/{name}/{token}/labels.npz",
                    "prev": tokens[t - 1] if t else "", "next": tokens[t + 1] if t + 1 < len(tokens) else "",
                    "camera_sensor": {}}
            ann["scene_infos"][name] = infos
            if name not in ann[key]:
                ann[key].append(name)
            scenes.append(root / "gts" / name)
        ann_path.write_text(json.dumps(ann))
    return scenes


def export_occ3d_waymo(sequences: Sequence | Iterable[Sequence], root: str | os.PathLike,
                       split: str = "train") -> list[Path]:
    """Write <split>/<seq:03d>/<frame:03d>_04.npz + poses.txt; lossy: barrier -> other, ground -> sidewalk."""
    seqs, raws, manifest = _prepare(sequences, "occ3d_waymo")
    split_dir = Path(root) / manifest["splits"][split]["dir"]
    scenes = []
    with _writing(root):
        for i, (seq, raw) in enumerate(zip(seqs, raws)):
            scene = split_dir / f"{i:03d}"
            scene.mkdir(parents=True, exist_ok=True)
            for t in range(seq.frames):
                m = seq.mask[t].astype(np.uint8)
                np.savez_compressed(scene / f"{t:03d}_04.npz", voxel_label=raw[t].astype(np.uint8),
                                    origin_voxel_state=m, final_voxel_state=m, infov=np.ones_like(m))
            write_poses(scene / "poses.txt", seq.poses)
            scenes.append(scene)
    return scenes


def export_semantickitti(sequences: Sequence | Iterable[Sequence], root: str | os.PathLike, split: str = "train",
                         frame_step: int = 5) -> list[Path]:
    """Write sequences/<NN>/ folders (voxels/, poses.txt, calib.txt), one per sequence, named after the split's
    sequences in order (train: 00, 01, ...; val: 08); returns them.

    Frame t is scan t * frame_step (every 5th scan, as the release); poses.txt has a row per scan (rows between
    frames repeat the previous frame's pose). Labels go through the manifest's `export` table (other -> 99,
    which reads back as 255); voxels labelled 255 are written empty and marked in .invalid; .occluded is the
    complement of the mask; .bin (the scan input) the visible non-free voxels."""
    seqs = [sequences] if isinstance(sequences, Sequence) else list(sequences)
    invalid = [s.labels == IGNORE for s in seqs]
    cleaned = [dataclasses.replace(s, labels=np.where(inv, 0, s.labels).astype(np.uint8))
               for s, inv in zip(seqs, invalid)]
    seqs, raws, manifest = _prepare(cleaned, "semantickitti")
    names = [str(n) for n in manifest["splits"][split]["sequences"]]
    if len(seqs) > len(names):
        raise OcclabError(f"semantickitti export: {len(seqs)} sequences, but the {split} split has only "
                          f"{len(names)} ({', '.join(names)}); export at most {len(names)}")
    if frame_step < 1:
        raise OcclabError(f"semantickitti export: frame_step must be >= 1, got {frame_step}")
    tr = EXPORT_TR
    folders = []
    with _writing(root):
        for name, seq, raw, inv in zip(names, seqs, raws, invalid):
            folder = Path(root) / manifest["layout"]["sequence_dir"].format(seq=name)
            voxels = folder / "voxels"
            voxels.mkdir(parents=True, exist_ok=True)
            for t in range(seq.frames):
                stem = voxels / f"{t * frame_step:06d}"
                raw[t].astype("<u2").tofile(stem.with_suffix(".label"))
                write_bits(stem.with_suffix(".invalid"), inv[t])
                write_bits(stem.with_suffix(".occluded"), ~seq.mask[t])
                write_bits(stem.with_suffix(".bin"), seq.mask[t] & (seq.labels[t] != 0) & ~inv[t])
            scans = np.repeat(np.arange(seq.frames), frame_step)[: (seq.frames - 1) * frame_step + 1]
            write_poses(folder / "poses.txt", tr @ seq.poses[scans] @ np.linalg.inv(tr))
            write_calib(folder / "calib.txt", tr)
            folders.append(folder)
    return folders
