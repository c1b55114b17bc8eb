"""SemanticKITTI SSC and SSCBench-KITTI-360 readers, their export, manifests, verify and describe.

Fixtures are written here byte by byte in the release formats (bit-packed MSB first, uint16 labels); the expected
class mappings are written from semantic-kitti.yaml, SSCBench's kitti360.yaml and DESIGN.md §2, independently of
the reader's tables and the manifests.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from occlab.classes import CLASS_ID, CLASS_NAMES, IGNORE
from occlab.cli import main as cli_main
from occlab.data import GEOMETRIES, Sequence, make_dataset, make_source
from occlab.data.export import export_semantickitti
from occlab.data.manifest import load_manifest
from occlab.data.semantickitti import (GRID, KITTI360_CLASSES, KITTI360_LEARNING_MAP, LABEL_BYTES, PACKED_BYTES,
                                       SEMANTICKITTI_CLASSES, SEMANTICKITTI_IDS, SemanticKITTISource,
                                       SSCBenchKITTI360Source, read_bits, write_bits)
from occlab.data.verify import describe, verify
from occlab.errors import OcclabError

V = int(np.prod(GRID))
# raw SemanticKITTI id -> (SSC class of semantic-kitti.yaml's learning map, occlab class of DESIGN.md §2);
# ids the map sends to 0 (except 0 itself) are ignored (255) in SSC, as evaluate_completion.py remaps them.
KNOWN = {0: (0, "free"), 1: (255, None), 10: (1, "vehicle"), 11: (2, "bicycle"), 13: (5, "vehicle"),
         15: (3, "bicycle"), 16: (5, "vehicle"), 18: (4, "vehicle"), 20: (5, "vehicle"), 30: (6, "pedestrian"),
         31: (7, "bicycle"), 32: (8, "bicycle"), 40: (9, "road"), 44: (10, "road"), 48: (11, "sidewalk"),
         49: (12, "ground"), 50: (13, "building"), 51: (14, "barrier"), 52: (255, None), 60: (9, "road"),
         70: (15, "vegetation"), 71: (16, "vegetation"), 72: (17, "ground"), 80: (18, "pole"), 81: (19, "pole"),
         99: (255, None), 252: (1, "vehicle"), 253: (7, "bicycle"), 254: (6, "pedestrian"), 255: (8, "bicycle"),
         256: (5, "vehicle"), 257: (5, "vehicle"), 258: (4, "vehicle"), 259: (5, "vehicle")}


def occlab_id(name: str | None) -> int:
    return IGNORE if name is None else CLASS_ID[name]


def api_unpack(compressed: np.ndarray) -> np.ndarray:
    """semantic-kitti-api's unpack, bit by bit (most significant bit first), written out independently."""
    out = np.zeros(compressed.size * 8, np.uint8)
    for b in range(8):
        out[b::8] = compressed >> (7 - b) & 1
    return out


def write_frame(voxels: Path, stem: str, raw: np.ndarray, invalid: np.ndarray | None = None,
                occluded: np.ndarray | None = None, scan: np.ndarray | None = None) -> None:
    """One SSC frame in the release format, written without occlab's writers."""
    voxels.mkdir(parents=True, exist_ok=True)
    raw.astype("<u2").reshape(-1).tofile(voxels / f"{stem}.label")
    for ext, bits in (("invalid", invalid), ("occluded", occluded), ("bin", scan)):
        bits = np.zeros(V, bool) if bits is None else bits.reshape(-1)
        # pack by hand, MSB first: byte = sum(bit_b << (7 - b))
        packed = sum(bits.reshape(-1, 8)[:, b].astype(np.uint8) << (7 - b) for b in range(8)).astype(np.uint8)
        packed.tofile(voxels / f"{stem}.{ext}")


def pattern_sequence(t: int = 2) -> Sequence:
    """A fixed pattern over every occlab class, some 255, a mask and exact poses (its export is checksummed)."""
    x, y, z = np.indices(GRID)
    labels = np.stack([(x // 8 + y // 8 + z // 4 + f) % 12 for f in range(t)]).astype(np.uint8)
    labels[:, :4, :4, :] = IGNORE
    mask = np.stack([(x + 2 * y + z + f) % 3 != 0 for f in range(t)])
    poses = np.tile(np.eye(4), (t, 1, 1))
    for f in range(t):
        poses[f, :3, :3] = np.linalg.matrix_power(np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]), f)
        poses[f, :3, 3] = [1.5 * f, -2.0 * f, 0.25]
    return Sequence(labels, mask, poses, geometry="semantickitti")


@pytest.fixture(scope="module")
def town_seq() -> Sequence:
    town = pytest.importorskip("occlab.data.town")
    return town.generate_sequence(3, geometry="semantickitti", frames=3)


# ------------------------------------------------------------------------------------------------ bit packing
def test_bits_msb_first_against_a_hand_made_file(tmp_path: Path) -> None:
    data = np.zeros(PACKED_BYTES, np.uint8)
    data[:3] = [0b10000000, 0b00000001, 0b10100000]  # voxels 0, 15, 16, 18
    data[-1] = 0b00000011  # the last two voxels
    data.tofile(tmp_path / "a.invalid")
    bits = read_bits(tmp_path / "a.invalid")
    assert bits.dtype == bool and bits.shape == (V,)
    assert np.flatnonzero(bits).tolist() == [0, 15, 16, 18, V - 2, V - 1]
    np.testing.assert_array_equal(bits, api_unpack(data).astype(bool))
    grid = bits.reshape(GRID)  # C order, z fastest: voxel 15 is (0, 0, 15), voxel 18 is (0, 0, 18)
    assert grid[0, 0, 0] and grid[0, 0, 15] and grid[0, 0, 16] and grid[0, 0, 18] and not grid[0, 0, 1]
    assert grid[255, 255, 30] and grid[255, 255, 31]
    write_bits(tmp_path / "b.invalid", grid)
    assert (tmp_path / "b.invalid").read_bytes() == (tmp_path / "a.invalid").read_bytes()
    rng = np.random.default_rng(0)
    random = rng.random(V) < 0.3
    write_bits(tmp_path / "c.bin", random)
    np.testing.assert_array_equal(read_bits(tmp_path / "c.bin"), random)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "c.bin", np.uint8), np.packbits(random))


# ------------------------------------------------------------------------------------------------ classes
def test_learning_map_known_values_in_both_modes(tmp_path: Path) -> None:
    ids = np.array(sorted(KNOWN))
    raw = np.zeros(GRID, np.uint16)
    raw[0, : len(ids), 0] = ids  # every raw id once, along y
    raw[1:, :, :2] = 40  # road
    raw[5, 5, 5] = 10  # one car voxel
    invalid = np.zeros(GRID, bool)
    invalid[100:, :, 20:] = True
    write_frame(tmp_path / "sequences" / "00" / "voxels", "000000", raw, invalid)
    occ = make_source("semantickitti", tmp_path, "train")
    ssc = make_source("semantickitti", tmp_path, "train", classes=19)
    assert (occ.num_classes, occ.class_names) == (12, CLASS_NAMES)
    assert ssc.num_classes == 20 and ssc.class_names[1:] == SEMANTICKITTI_CLASSES[1:] and ssc.class_names[0] == "free"
    a, b = occ.load(0, [0]), ssc.load(0, [0])
    np.testing.assert_array_equal(a.labels[0, 0, : len(ids), 0], [occlab_id(KNOWN[i][1]) for i in ids])
    np.testing.assert_array_equal(b.labels[0, 0, : len(ids), 0], [KNOWN[i][0] for i in ids])
    # raw 10 car -> SSC 1 car -> occlab vehicle
    assert b.labels[0, 5, 5, 5] == 1 and a.labels[0, 5, 5, 5] == CLASS_ID["vehicle"] == 10
    assert a.labels[0, 7, 7, 1] == CLASS_ID["road"] and b.labels[0, 7, 7, 1] == 9
    # invalid -> 255 in both modes; the default mask is "not invalid"
    assert (a.labels[0][invalid] == IGNORE).all() and (b.labels[0][invalid] == IGNORE).all()
    np.testing.assert_array_equal(a.mask[0], ~invalid)
    assert a.geometry == "semantickitti" and a.labels.shape == (1, *GRID)


def test_tables_agree_with_the_manifests_and_the_geometry() -> None:
    m = load_manifest("semantickitti")
    assert {int(k): tuple(v) for k, v in m["learning_map"].items()} == SEMANTICKITTI_IDS
    assert {k: v[1] for k, v in SEMANTICKITTI_IDS.items()} == {k: KNOWN[k][0] % 255 for k in KNOWN}
    assert [m["classes"][i][0] for i in range(1, 20)] == list(SEMANTICKITTI_CLASSES[1:])
    k360 = load_manifest("sscbench_kitti360")
    assert {int(k): v[1] for k, v in k360["learning_map"].items()} == KITTI360_LEARNING_MAP
    assert {int(k): v[0] for k, v in k360["learning_map"].items()} == {k: v[0] for k, v in SEMANTICKITTI_IDS.items()}
    assert [k360["classes"][i][0] for i in range(1, 19)] == list(KITTI360_CLASSES[1:])
    g = GEOMETRIES["semantickitti"]
    for man in (m, k360):
        assert man["geometry"]["name"] == "semantickitti" and man["checksums"] == []
        assert tuple(man["geometry"]["grid"]) == g.grid == GRID
        assert np.allclose(man["geometry"]["voxel_size"], g.voxel_size)
        assert np.allclose(man["geometry"]["min_bound"], g.min_bound)
        assert np.allclose(man["geometry"]["max_bound"], g.max_bound)
    assert g.max_bound == pytest.approx((51.2, 25.6, 4.4))
    assert m["splits"]["train"]["sequences"] == ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"]
    assert m["splits"]["val"]["sequences"] == ["08"]


# ------------------------------------------------------------------------------------------------ masks, poses
def test_masks_invalid_occluded_and_poses(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "sequences" / "08"
    frames = []
    for scan in (0, 5, 10):
        raw = rng.choice([0, 40, 50, 70], size=GRID).astype(np.uint16)
        invalid, occluded = rng.random(GRID) < 0.2, rng.random(GRID) < 0.3
        write_frame(folder / "voxels", f"{scan:06d}", raw, invalid, occluded, scan=raw > 0)
        frames.append((raw, invalid, occluded))
    # camera poses for 11 scans and a general lidar -> camera Tr
    angle = 0.3
    tr = np.eye(4)
    tr[:3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    tr[:3, 3] = [0.1, -0.2, 0.3]
    cam = np.tile(np.eye(4), (11, 1, 1))
    cam[:, :3, 3] = rng.normal(size=(11, 3))
    cam[:, 0, 0] = cam[:, 1, 1] = np.cos(np.arange(11) * 0.1)
    cam[:, 0, 1] = -np.sin(np.arange(11) * 0.1)
    cam[:, 1, 0] = np.sin(np.arange(11) * 0.1)
    np.savetxt(folder / "poses.txt", cam[:, :3].reshape(11, 12), fmt="%.17g")
    (folder / "calib.txt").write_text("P0: " + " ".join(["0"] * 12) + "\nTr: "
                                      + " ".join(f"{v:.17g}" for v in tr[:3].reshape(-1)) + "\n")
    valid = make_source("semantickitti", tmp_path, "val")
    visible = make_source("semantickitti", tmp_path, "val", mask="visible")
    none = make_source("semantickitti", tmp_path, "val", mask="none")
    assert valid.length(0) == 3 and not valid.warnings
    a, b, c = (s.load(0, np.arange(3)) for s in (valid, visible, none))
    for t, (raw, invalid, occluded) in enumerate(frames):
        assert (a.labels[t][invalid] == IGNORE).all() and (c.labels[t][invalid] == IGNORE).all()
        np.testing.assert_array_equal(a.mask[t], ~invalid)
        np.testing.assert_array_equal(b.mask[t], ~invalid & ~occluded)
        assert c.mask[t].all()
        np.testing.assert_array_equal(valid.load_input(0, [t])[0], raw > 0)
    expected = np.linalg.inv(tr) @ cam[[0, 5, 10]] @ tr
    np.testing.assert_allclose(a.poses, expected, atol=1e-12)
    # without calib.txt (or poses.txt) poses are identity and a warning says so
    (folder / "calib.txt").unlink()
    src = make_source("semantickitti", tmp_path, "val")
    np.testing.assert_array_equal(src.scenes[0].poses, np.tile(np.eye(4), (3, 1, 1)))
    assert any("calib.txt" in w for w in src.warnings)
    # too few poses: an error naming poses.txt
    (folder / "calib.txt").write_text("Tr: 1 0 0 0 0 1 0 0 0 0 1 0\n")
    np.savetxt(folder / "poses.txt", cam[:8, :3].reshape(8, 12))
    with pytest.raises(OcclabError, match="poses.txt: 8 poses") as e:
        make_source("semantickitti", tmp_path, "val")
    assert str(folder / "poses.txt") in str(e.value)


# ------------------------------------------------------------------------------------------------ export
def test_town_export_read_round_trip(tmp_path: Path, town_seq: Sequence) -> None:
    (folder,) = export_semantickitti(town_seq, tmp_path)
    assert folder == tmp_path / "sequences" / "00"
    assert sorted(p.name for p in (folder / "voxels").iterdir())[:4] == [
        "000000.bin", "000000.invalid", "000000.label", "000000.occluded"]
    assert (folder / "voxels" / "000010.label").stat().st_size == LABEL_BYTES
    src = SemanticKITTISource(tmp_path, "train", mask="visible")
    back = src.load(0, np.arange(3))
    expected = town_seq.labels.copy()
    expected[expected == CLASS_ID["other"]] = IGNORE  # SemanticKITTI SSC has no `other`: written 99, read 255
    np.testing.assert_array_equal(back.labels, expected)
    np.testing.assert_array_equal(back.mask, town_seq.mask)
    np.testing.assert_allclose(back.poses, town_seq.poses, atol=1e-9)
    # the raw (19-class) view of the same files: the export's raw ids through the learning map
    ssc = make_source("semantickitti", tmp_path, classes="raw").load(0, [1]).labels[0]
    to_ssc = {"free": 0, "building": 13, "barrier": 14, "other": 255, "pedestrian": 6, "pole": 18, "road": 9,
              "ground": 17, "sidewalk": 11, "vegetation": 15, "vehicle": 1}
    lut = np.zeros(256, np.uint8)
    for name, value in to_ssc.items():
        lut[CLASS_ID[name]] = value
    np.testing.assert_array_equal(ssc, lut[town_seq.labels[1]])
    # sliding windows and single frames through the window machinery
    ds = make_dataset("semantickitti", tmp_path, frames=2, mask="visible")
    assert len(ds) == 2 and ds[1]["labels"].shape == (2, *GRID)
    np.testing.assert_array_equal(ds.window(1).labels, expected[1:])
    assert len(make_dataset("semantickitti", tmp_path, frames=1)) == 3


def test_export_keeps_ignore_and_bicycle_and_pins_the_bytes(tmp_path: Path) -> None:
    seq = pattern_sequence()
    export_semantickitti(seq, tmp_path, frame_step=5)
    back = make_source("semantickitti", tmp_path, mask="visible").load(0, [0, 1])
    expected = seq.labels.copy()
    expected[expected == CLASS_ID["other"]] = IGNORE
    np.testing.assert_array_equal(back.labels, expected)
    assert (back.labels == CLASS_ID["bicycle"]).any() and (back.labels[:, :4, :4] == IGNORE).all()
    np.testing.assert_array_equal(back.mask, seq.mask & (seq.labels != IGNORE))
    np.testing.assert_allclose(back.poses, seq.poses, atol=1e-12)
    assert len((tmp_path / "sequences" / "00" / "poses.txt").read_text().splitlines()) == 6  # scans 0..5
    for entry in load_manifest("semantickitti")["export_checksums"]:
        digest = hashlib.sha256((tmp_path / entry["path"]).read_bytes()).hexdigest()
        assert digest == entry["sha256"], entry["path"]
    with pytest.raises(OcclabError, match="only 1"):
        export_semantickitti([seq, seq], tmp_path, split="val")
    with pytest.raises(OcclabError, match="grid"):
        export_semantickitti(Sequence(np.zeros((1, 8, 8, 8), np.uint8), np.ones((1, 8, 8, 8), bool),
                                      np.eye(4)[None]), tmp_path)


def test_cli_export_verify_describe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("occlab.data.town")
    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "kitti"
    assert cli_main(["data", "export", "semantickitti", "--out", str(out), "--n", "1", "--frames", "2",
                     "--split", "val"]) == 0
    assert (out / "sequences" / "08" / "voxels" / "000005.label").is_file()
    capsys.readouterr()
    assert cli_main(["data", "verify", "semantickitti", "--root", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OK, usable" in text and "val: 1 scenes, 2 frames" in text
    d = describe("semantickitti", out, frames=2)
    val = d["splits"]["val"]
    assert (val["scenes"], val["frames"], val["windows"]) == (1, 2, 1)
    assert sum(val["class_voxels"].values()) == 2 * int(np.prod(GRID)) and d["geometry"] == "semantickitti"
    assert "error" in d["splits"]["train"]


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_and_mis_sized_files_are_named(tmp_path: Path) -> None:
    export_semantickitti(pattern_sequence(3), tmp_path)
    voxels = tmp_path / "sequences" / "00" / "voxels"
    src = make_source("semantickitti", tmp_path)
    assert verify("semantickitti", tmp_path).ok
    # a missing .label: the frame stays (its .invalid is there); reading and verify name the file
    (voxels / "000005.label").unlink()
    with pytest.raises(OcclabError, match="missing frame file") as e:
        src.load(0, [1])
    assert str(voxels / "000005.label") in str(e.value)
    report = verify("semantickitti", tmp_path)
    assert not report.ok and str(voxels / "000005.label") in report.text()
    # a whole frame gone: the gap in 000000, 000005, 000010 is kept and reported, never skipped
    (voxels / "000005.invalid").unlink()
    assert make_source("semantickitti", tmp_path).length(0) == 3
    assert str(voxels / "000005.label") in verify("semantickitti", tmp_path).text()
    # wrong byte counts
    np.zeros(100, np.uint16).tofile(voxels / "000000.label")
    with pytest.raises(OcclabError, match="200 bytes; expected 4194304") as e:
        src.load(0, [0])
    assert str(voxels / "000000.label") in str(e.value) and "re-extract" in str(e.value)
    (voxels / "000010.invalid").write_bytes(b"\0" * V)  # unpacked: not SemanticKITTI's format
    with pytest.raises(OcclabError, match="expected 262144") as e:
        src.load(0, [2])
    assert str(voxels / "000010.invalid") in str(e.value)
    report = verify("semantickitti", tmp_path)
    assert "files of the wrong size" in report.text() and str(voxels / "000000.label") in report.text()
    # an id outside the learning map: a corrupt file, named
    raw = np.zeros(GRID, np.uint16)
    raw[1, 2, 3], raw[4, 5, 6] = 5, 4000
    raw.tofile(voxels / "000010.label")
    write_bits(voxels / "000010.invalid", np.zeros(GRID, bool))
    with pytest.raises(OcclabError, match=r"\[5, 4000\]") as e:
        src.load(0, [2])
    assert str(voxels / "000010.label") in str(e.value)


def test_missing_root_split_and_options(tmp_path: Path) -> None:
    for name in ("semantickitti", "sscbench_kitti360"):
        with pytest.raises(OcclabError) as e:
            make_source(name, tmp_path / "nowhere")
        msg = str(e.value)
        assert name in msg and str(tmp_path / "nowhere") in msg
        assert f"occlab data verify {name} --root DIR" in msg and f"data_manifests/{name}.yaml" in msg
    with pytest.raises(OcclabError, match=str(tmp_path / "sequences" / "08" / "voxels")):
        make_source("semantickitti", tmp_path, "val")
    with pytest.raises(OcclabError, match="unknown split"):
        make_source("semantickitti", tmp_path, "test")
    with pytest.raises(OcclabError, match="mask must be one of"):
        make_source("sscbench_kitti360", tmp_path, mask="visible")
    write_frame(tmp_path / "sequences" / "03" / "voxels", "000000", np.zeros(GRID, np.uint16))
    src = make_source("semantickitti", tmp_path, sequences=["03"])
    assert [s.name for s in src.scenes] == ["03"] and any("poses are identity" in w for w in src.warnings)
    with pytest.raises(OcclabError, match="classes must be"):
        make_source("semantickitti", tmp_path, classes=17)
    report = verify("semantickitti", tmp_path)
    assert report.ok and any("absent" in w for w in report.warnings)


# ------------------------------------------------------------------------------------------------ KITTI-360
def test_sscbench_kitti360_layout_map_and_unpacked_invalid(tmp_path: Path) -> None:
    voxels = tmp_path / "data_2d_raw" / "2013_05_28_drive_0006_sync" / "voxels"
    raw = np.zeros(GRID, np.uint16)
    raw[0, 0, :8] = [10, 71, 52, 99, 31, 40, 44, 81]  # car, trunk, other-structure, other-object, bicyclist, ...
    raw[1:, :, 0] = 40
    invalid = np.zeros(GRID, np.uint8)
    invalid[0, 0, :3] = 1  # labelled voxels are never invalid (SSCBench preprocess.py)
    invalid[200:, :, 10:] = 1
    write_frame(voxels, "000000", raw)
    invalid.tofile(voxels / "000000.invalid")  # one byte per voxel, as SSCBench stores it
    write_frame(voxels.parent.parent / "x" / "voxels", "000000", raw)  # not a sequence of any split: ignored
    src = SSCBenchKITTI360Source(tmp_path, "val")
    ssc = SSCBenchKITTI360Source(tmp_path, "val", classes=18)
    assert src.num_classes == 12 and ssc.num_classes == 19 and ssc.class_names[17] == "other-structure"
    a, b = src.load(0, [0]).labels[0], ssc.load(0, [0]).labels[0]
    names = ["vehicle", None, "other", "other", None, "road", "road", "pole"]
    np.testing.assert_array_equal(a[0, 0, :8], [occlab_id(n) for n in names])
    np.testing.assert_array_equal(b[0, 0, :8], [1, 255, 17, 18, 255, 7, 8, 16])
    assert (a[200:, :, 10:] == IGNORE).all() and a[1, 1, 0] == CLASS_ID["road"]
    assert any("identity" in w for w in src.warnings)
    report = verify("sscbench_kitti360", tmp_path)
    assert report.ok, report.text()
    assert report.splits["val"] == {"scenes": 1, "frames": 1}
    (voxels / "000000.invalid").write_bytes(b"\0" * 1000)
    with pytest.raises(OcclabError, match="1000 bytes; expected 262144 or 2097152"):
        src.load(0, [0])
