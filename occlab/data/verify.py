"""`occlab data verify` and `occlab data describe`: check a local dataset copy, summarise its contents."""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from occlab.classes import CLASS_NAMES
from occlab.data.geometry import get_geometry
from occlab.data.manifest import load_manifest
from occlab.data.readers import ManifestSource, require_root
from occlab.errors import OcclabError

DESCRIBE_CHUNK = 16  # frames read at a time by describe()


@dataclass
class VerifyReport:
    """What `occlab data verify` found: errors make a copy unusable, warnings do not."""

    name: str
    root: str | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True only when at least one split has frames and nothing is missing or wrong."""
        return not self.errors and any(info.get("frames", 1) > 0 for info in self.splits.values())

    def text(self) -> str:
        """The report as printed by `occlab data verify`."""
        where = f" --root {self.root}" if self.root else ""
        lines = [f"occlab data verify {self.name}{where}: {'OK, usable' if self.ok else 'NOT USABLE'}"]
        lines += [f"  {split}: " + ", ".join(f"{v} {k}" for k, v in info.items())
                  for split, info in self.splits.items()]
        lines += [f"  ERROR {e}" for e in self.errors] + [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _group(what: str, items: list[str], first: int = 3) -> str:
    """'what (N): a, b, c (and M more)'."""
    more = f" (and {len(items) - first} more)" if len(items) > first else ""
    return f"{what} ({len(items)}): {', '.join(items[:first])}{more}"


def _check_split(src: ManifestSource, spec: dict, report: VerifyReport) -> None:
    """Every frame file of one split: present, of the right size; the first frame of each scene read through."""
    split = src.split
    report.errors += [f"{split}: {p}" for p in src.problems]
    report.warnings += [f"{split}: {w}" for w in src.warnings]
    missing: list[str] = []
    wrong: list[str] = []
    for i, scene in enumerate(src.scenes):
        before = len(missing) + len(wrong)
        for frame in scene.frames:
            for path, size in src.frame_files(frame):
                if not path.is_file():
                    missing.append(str(path))
                elif size is not None and path.stat().st_size != size:
                    wrong.append(f"{path} ({path.stat().st_size} bytes, expected {size})")
        if len(missing) + len(wrong) == before and scene.frames:
            try:
                src.load(i, np.array([0]))
            except OcclabError as e:
                report.errors.append(f"{split}: {e}")
    if missing:
        report.errors.append(_group(f"{split}: missing frame files", missing))
    if wrong:
        report.errors.append(_group(f"{split}: files of the wrong size", wrong))
    report.splits[split] = {"scenes": len(src.scenes), "frames": sum(len(s.frames) for s in src.scenes)}
    expected = spec.get("scenes")
    if expected is not None and expected != len(src.scenes):
        note = " (unverified count)" if spec.get("unverified") else ""
        report.warnings.append(f"{split}: {len(src.scenes)} scenes; the full release has {expected}{note}")


def _check_checksums(manifest: dict, root: Path, report: VerifyReport) -> None:
    """sha256 of the sample files the manifest lists."""
    for entry in manifest.get("checksums") or []:
        path = root / entry["path"]
        if not path.is_file():
            report.errors.append(f"{path}: missing (listed in the manifest's checksums)")
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            report.errors.append(f"{path}: sha256 {digest} differs from the manifest's {entry['sha256']}")


def _verify_town(manifest: dict, root: Any, report: VerifyReport) -> None:
    """The town is generated: check that each split's first seed is deterministic and well formed."""
    if root is not None:
        report.errors.append("synthetic_town is generated, not read: run it without --root; check an exported copy "
                             "as the dataset whose layout it has, e.g. `occlab data verify carlasc --root DIR`")
        return
    try:
        from occlab.data.town import generate_sequence
    except ImportError as e:
        report.errors.append(f"the town generator occlab.data.town is not importable: {e}")
        return
    for split, spec in manifest["splits"].items():
        seed = spec["seeds"][0]
        for geometry in manifest["geometries"]:
            try:
                a, b = (generate_sequence(seed, geometry=geometry, frames=2) for _ in range(2))
            except Exception as e:  # report any generator failure instead of crashing the check
                report.errors.append(f"{split}: generate_sequence({seed}, geometry={geometry!r}) failed: {e!r}")
                continue
            grid = tuple(get_geometry(geometry).grid)
            if a.labels.shape[1:] != grid:
                report.errors.append(f"{split}: seed {seed} at {geometry} has shape {a.labels.shape}, grid {grid}")
            if not all(np.array_equal(x, y) for x, y in ((a.labels, b.labels), (a.mask, b.mask), (a.poses, b.poses))):
                report.errors.append(f"{split}: seed {seed} at {geometry} differs between two generations")
        report.splits[split] = {"seeds": f"{spec['seeds'][0]}..{spec['seeds'][1]}"}


def verify(name: str, root: str | os.PathLike | None = None) -> VerifyReport:
    """Check a local copy of dataset `name` against its manifest (synthetic_town: check the generator)."""
    from occlab.data import SOURCES, make_source

    manifest = load_manifest(name)
    report = VerifyReport(name, None if root is None else str(root))
    if name == "synthetic_town":
        _verify_town(manifest, root, report)
        return report
    if name not in SOURCES:
        report.errors.append(f"{name}: no reader for this manifest; readers exist for {', '.join(SOURCES)}")
        return report
    try:
        root = require_root(name, root)
    except OcclabError as e:
        report.errors.append(str(e))
        return report
    absent: dict[str, list[str]] = {}  # message -> the splits it concerns
    for split, spec in manifest["splits"].items():
        try:
            src = make_source(name, root, split, strict=False)
        except OcclabError as e:
            absent.setdefault(str(e), []).append(split)
            continue
        _check_split(src, spec, report)
    # a missing split is an error only when no split is there at all
    (report.warnings if report.splits else report.errors).extend(
        f"{', '.join(splits)}: {message}" for message, splits in absent.items())
    _check_checksums(manifest, root, report)
    return report


def verify_main(name: str, root: str | os.PathLike | None = None) -> int:
    """`occlab data verify NAME --root DIR`: print the report; 0 when the copy is usable, else 1."""
    try:
        report = verify(name, root)
    except OcclabError as e:
        print(f"occlab data verify {name}: {e}", file=sys.stderr)
        return 1
    print(report.text())
    return 0 if report.ok else 1


def _describe_source(src: Any, frames: int | None, stride: int, skip: int, max_frames: int | None) -> dict:
    """Scenes, frames, windows and per-class voxel counts of one split."""
    lengths = [src.length(i) for i in range(len(src))]
    out: dict[str, Any] = {"scenes": len(lengths), "frames": int(sum(lengths))}
    if frames:
        span = (frames - 1) * skip + 1
        out["windows"] = int(sum(len(range(0, n - span + 1, stride)) for n in lengths))
    counts = np.zeros(256, np.int64)
    seen = np.zeros(256, np.int64)
    budget = sum(lengths) if max_frames is None else max_frames
    counted = 0
    for i, n in enumerate(lengths):
        for start in range(0, n, DESCRIBE_CHUNK):
            take = min(DESCRIBE_CHUNK, n - start, budget - counted)
            if take <= 0:
                break
            seq = src.load(i, np.arange(start, start + take))
            counts += np.bincount(seq.labels.ravel(), minlength=256)
            seen += np.bincount(seq.labels[seq.mask], minlength=256)
            counted += take
    names = list(getattr(src, "class_names", CLASS_NAMES[: src.num_classes]))
    total = int(counts.sum())
    out["frames_counted"] = counted
    out["class_voxels"] = {c: int(counts[k]) for k, c in enumerate(names)}
    out["class_voxels_visible"] = {c: int(seen[k]) for k, c in enumerate(names)}
    if counts[255]:
        out["class_voxels"]["ignore"] = int(counts[255])
    out["visible_share"] = float(seen.sum() / total) if total else 0.0
    if getattr(src, "warnings", None):
        out["warnings"] = list(src.warnings)
    return out


def describe(name: str, root: str | os.PathLike | None = None, frames: int | None = None, stride: int = 1,
             skip: int = 1, max_frames: int | None = None, **options: Any) -> dict:
    """JSON-able summary per split: scenes, frames, windows of `frames` frames, class voxel counts, visible share.

    Counts cover every frame unless max_frames caps them per split. synthetic_town takes no root and describes
    `num_sequences` (default 2) generated sequences per split.
    """
    from occlab.data import make_source

    manifest = load_manifest(name)
    if name == "synthetic_town":
        if root is not None:
            raise OcclabError("synthetic_town is generated, not read: describe it without --root; describe an "
                              "exported copy as the dataset whose layout it has (e.g. carlasc)")
        options.setdefault("num_sequences", 2)
    else:
        root = require_root(name, root)
    out: dict[str, Any] = {"dataset": name, "root": None if root is None else str(root), "window_frames": frames,
                           "stride": stride, "skip": skip, "splits": {}}
    for split in manifest["splits"]:
        try:
            src = make_source(name, root, split, **options)
        except OcclabError as e:
            out["splits"][split] = {"error": str(e)}
            continue
        out["splits"][split] = _describe_source(src, frames, stride, skip, max_frames)
        out["class_names"] = list(getattr(src, "class_names", CLASS_NAMES[: src.num_classes]))
        out["geometry"] = src.geometry.name
    return out
