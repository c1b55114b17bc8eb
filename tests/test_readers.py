"""Real-dataset readers, exports, manifests, verify and describe (occlab.data.{carlasc,occ3d_*,export,manifest}).

Fixtures are written here in the exact release formats; the one real Occ3D-nuScenes frame is in
tests/fixtures/occ3d_nuscenes/ (licence note beside it).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from occlab.classes import CLASS_ID, CLASS_NAMES
from occlab.data import GEOMETRIES, Sequence, WindowDataset, make_dataset, make_source
from occlab.data.carlasc import CarlaSCSource
from occlab.data.export import export_carlasc, export_occ3d_nuscenes, export_occ3d_waymo
from occlab.data.manifest import known_manifests, load_manifest
from occlab.data.verify import describe, verify, verify_main
from occlab.data.occ3d_nuscenes import Occ3DNuScenesSource, matrix_to_quat, quat_to_matrix
from occlab.data.occ3d_waymo import Occ3DWaymoSource
from occlab.errors import OcclabError

FIXTURE = Path(__file__).parent / "fixtures" / "occ3d_nuscenes" / "labels.npz"
TOKEN = "29796060110c4163b07f06eff4af0753"
# Written from DESIGN.md §2 independently of the manifests: raw id -> occlab label.
CARLA = np.array([0, 1, 2, 3, 4, 5, 6, 6, 8, 9, 10, 2, 5, 3, 7, 3, 3, 2, 5, 3, 3, 3, 7])
NUSC = np.array([3, 2, 11, 10, 10, 10, 11, 4, 5, 10, 10, 6, 7, 8, 7, 1, 9, 0])
WAYMO = {0: 3, 1: 10, 2: 4, 3: 5, 4: 11, 5: 5, 6: 5, 7: 5, 8: 11, 9: 11, 10: 1, 11: 9, 12: 9, 13: 6, 14: 8,
         15: 0, 23: 0}
CARLA_GRID, OCC_GRID = GEOMETRIES["carlasc"].grid, GEOMETRIES["occ3d"].grid


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: rotation by `angle` about `axis`."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def poses(t: int, seed: int = 0) -> np.ndarray:
    """T ego -> world poses with general rotations (angles up to pi, to exercise every quaternion branch)."""
    rng = np.random.default_rng(seed)
    out = np.tile(np.eye(4), (t, 1, 1))
    for i in range(t):
        out[i, :3, :3] = rotation(rng.normal(size=3), rng.uniform(0, np.pi) if i else np.pi - 1e-3)
        out[i, :3, 3] = rng.normal(scale=100, size=3)
    return out


def blocky(rng: np.random.Generator, shape: tuple, values: list[int], block: int = 4) -> np.ndarray:
    """Random labels constant over block x block x 2 voxels (compresses fast, like real scenes)."""
    t, x, y, z = shape
    small = rng.choice(values, size=(t, x // block, y // block, z // 2))
    return np.repeat(np.repeat(np.repeat(small, block, 1), block, 2), 2, 3).astype(np.uint8)


def make_seq(t: int = 3, geometry: str = "carlasc", classes: int = 11, seed: int = 0) -> Sequence:
    """A hand-made sequence with every class of the geometry, a random mask and general poses."""
    rng = np.random.default_rng(seed)
    grid = GEOMETRIES[geometry].grid
    labels = blocky(rng, (t, *grid), list(range(classes)))
    labels[:, 0, :classes, 0] = np.arange(classes)  # every class present
    mask = blocky(rng, (t, *grid), [0, 1, 1]).astype(bool)
    return Sequence(labels, mask, poses(t, seed), geometry=geometry)


def write_carlasc(root: Path, raw: np.ndarray, counts: np.ndarray, pose: np.ndarray, split: str = "Train",
                  scene: str = "Town01_Light") -> Path:
    """A CarlaSC scene in the release format, written without occlab's exporter."""
    ev = root / split / scene / "cartesian" / "evaluation"
    ev.mkdir(parents=True)
    for t in range(len(raw)):
        raw[t].astype(np.uint32).tofile(ev / f"{t:06d}.label")
        counts[t].astype(np.float32).tofile(ev / f"{t:06d}.bin")
    (ev / "params.json").write_text(json.dumps({"grid_size": [128, 128, 8], "min_bound": [-25.6, -25.6, -2.0],
                                                "max_bound": [25.6, 25.6, 1.0], "num_channels": 11}))
    np.savetxt(ev.parent / "poses.txt", pose[:, :3, :].reshape(len(pose), 12))
    return ev


def write_nuscenes(root: Path, tokens: list[str], scene: str = "scene-0001", split: str = "train_split") -> None:
    """A tiny Occ3D-nuScenes layout: the real frame under each token, annotations.json written here."""
    infos = {}
    for i, token in enumerate(tokens):
        (root / "gts" / scene / token).mkdir(parents=True)
        shutil.copy(FIXTURE, root / "gts" / scene / token / "labels.npz")
        infos[token] = {"timestamp": 1531883530449377 + 500000 * i,
                        "ego_pose": {"translation": [1.0 + i, 2.0, 3.0],
                                     "rotation": [np.cos(np.pi / 4), 0.0, 0.0, np.sin(np.pi / 4)]},
                        "gt_path": f"gts/{scene}/{token}/labels.npz",
                        "prev": tokens[i - 1] if i else "", "next": tokens[i + 1] if i + 1 < len(tokens) else "",
                        "camera_sensor": {}}
    ann = {"train_split": [], "val_split": [], "scene_infos": {scene: infos}}
    ann[split].append(scene)
    (root / "annotations.json").write_text(json.dumps(ann))


@pytest.fixture(scope="module")
def real() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------------ Occ3D-nuScenes
def test_real_occ3d_frame_maps_to_occlab(tmp_path: Path, real: dict) -> None:
    write_nuscenes(tmp_path, [TOKEN, "b" * 32])
    src = make_source("occ3d_nuscenes", tmp_path, "train", mask="none")
    assert (len(src), src.length(0), src.num_classes) == (1, 2, 12)
    seq = src.load(0, np.array([0, 1]))
    sem = real["semantics"]
    assert seq.labels.shape == (2, 200, 200, 16) and seq.labels.dtype == np.uint8
    assert (seq.labels[0] == CLASS_ID["road"]).sum() == (sem == 11).sum() == 8433
    assert (seq.labels[0] == CLASS_ID["building"]).sum() == (sem == 15).sum()
    assert (seq.labels[0] == CLASS_ID["ground"]).sum() == (sem == 12).sum() + (sem == 14).sum()
    assert (seq.labels[0] == CLASS_ID["free"]).sum() == (sem == 17).sum()
    np.testing.assert_array_equal(seq.labels[0], NUSC[sem])
    assert seq.mask.all()
    cam = Occ3DNuScenesSource(tmp_path, "train").load(0, [0])
    np.testing.assert_array_equal(cam.mask[0], real["mask_camera"] != 0)
    lidar = Occ3DNuScenesSource(tmp_path, "train", mask="lidar").load(0, [0])
    np.testing.assert_array_equal(lidar.mask[0], real["mask_lidar"] != 0)
    # ego_pose: yaw +90 degrees, translation (1 + i, 2, 3)
    np.testing.assert_allclose(seq.poses[1], [[0, -1, 0, 2], [1, 0, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1]], atol=1e-12)


def test_real_occ3d_frame_raw_mode_keeps_17_classes(tmp_path: Path, real: dict) -> None:
    write_nuscenes(tmp_path, [TOKEN])
    src = make_source("occ3d_nuscenes", tmp_path, "train", classes=17)
    assert src.num_classes == 18 and len(src.class_names) == 18
    assert src.class_names[0] == "free" and src.class_names[12] == "driveable_surface"
    assert src.class_names[1] == "others" and src.class_names[17] == "vegetation"
    seq = src.load(0, [0])
    np.testing.assert_array_equal(seq.labels[0], (real["semantics"].astype(int) + 1) % 18)
    assert set(np.unique(seq.labels).tolist()) == {0, 1, 2, 4, 5, 7, 12, 14, 15, 16, 17}


def test_quaternions_round_trip() -> None:
    for r in poses(8, seed=3)[:, :3, :3]:
        q = matrix_to_quat(r)
        assert q[0] >= 0 and np.isclose(np.linalg.norm(q), 1)
        np.testing.assert_allclose(quat_to_matrix(q), r, atol=1e-12)


# ------------------------------------------------------------------------------------------------ CarlaSC
def test_carlasc_release_format_maps_every_raw_id(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 23, size=(3, *CARLA_GRID)).astype(np.uint32)
    counts = rng.integers(0, 3, size=raw.shape).astype(np.float32)
    pose = poses(3)
    write_carlasc(tmp_path, raw, counts, pose)
    src = make_source("carlasc", tmp_path, "train")
    assert (len(src), src.length(0), src.num_classes, src.class_names) == (1, 3, 11, CLASS_NAMES[:11])
    seq = src.load(0, np.arange(3))
    np.testing.assert_array_equal(seq.labels, CARLA[raw])
    np.testing.assert_array_equal(seq.mask, counts > 0)
    np.testing.assert_allclose(seq.poses, pose, rtol=1e-15)
    raw_mode = make_source("carlasc", tmp_path, "train", classes="raw", mask="none").load(0, [2])
    np.testing.assert_array_equal(raw_mode.labels[0], raw[2])
    assert raw_mode.mask.all()


def test_carlasc_windows_stride_skip(tmp_path: Path) -> None:
    seqs = [make_seq(t=5, seed=s) for s in range(2)]
    export_carlasc(seqs, tmp_path)
    assert sorted(p.name for p in (tmp_path / "Train").iterdir()) == ["Town10_Medium_000", "Town10_Medium_001"]
    ds = make_dataset("carlasc", tmp_path, "train", frames=2, stride=2, skip=2)
    assert len(ds) == 2 * 2  # a window spans 3 of 5 frames; starts 0 and 2 in each scene
    np.testing.assert_array_equal(ds.window(1).labels, seqs[0].labels[[2, 4]])
    np.testing.assert_array_equal(ds.window(2).labels, seqs[1].labels[[0, 2]])
    item = ds[0]
    assert item["labels"].shape == (2, *CARLA_GRID)


# ------------------------------------------------------------------------------------------------ Occ3D-Waymo
def test_waymo_release_format_and_free_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    ids = np.array(sorted(WAYMO))
    scene = tmp_path / "training" / "000"
    scene.mkdir(parents=True)
    frames = []
    for t in range(2):
        label = ids[rng.integers(0, len(ids), size=OCC_GRID)].astype(np.uint8)
        states = {k: rng.random(OCC_GRID) < 0.7 for k in ("origin_voxel_state", "final_voxel_state", "infov")}
        np.savez_compressed(scene / f"{t:03d}_04.npz", voxel_label=label, **states)
        np.savez_compressed(scene / f"{t:03d}.npz", voxel_label=np.zeros(3))  # 0.1 m file: ignored
        frames.append((label, states))
    src = Occ3DWaymoSource(tmp_path, "train")
    seq = src.load(0, [0, 1])
    lut = np.zeros(24, np.uint8)
    lut[list(WAYMO)] = list(WAYMO.values())
    for t, (label, s) in enumerate(frames):
        np.testing.assert_array_equal(seq.labels[t], lut[label])
        np.testing.assert_array_equal(seq.mask[t], s["infov"] & s["final_voxel_state"])
    np.testing.assert_array_equal(seq.poses, np.tile(np.eye(4), (2, 1, 1)))
    assert any("identity" in w for w in src.warnings)
    lidar = Occ3DWaymoSource(tmp_path, "train", mask="lidar").load(0, [1])
    np.testing.assert_array_equal(lidar.mask[0], frames[1][1]["origin_voxel_state"])
    raw = Occ3DWaymoSource(tmp_path, "train", classes="raw")
    assert raw.num_classes == 16 and raw.class_names[1] == "general_object"
    assert raw.load(0, [0]).labels[0][frames[0][0] == 23].max() == 0


# ------------------------------------------------------------------------------------------------ exports
def test_carlasc_export_round_trip_identical(tmp_path: Path) -> None:
    seq = make_seq(t=3)
    (scene,) = export_carlasc(seq, tmp_path, split="val", town="Town03", density="Heavy")
    assert scene == tmp_path / "Val" / "Town03_Heavy"
    back = CarlaSCSource(tmp_path, "val").load(0, np.arange(3))
    assert back.density == 2  # Heavy, from the folder name
    np.testing.assert_array_equal(back.labels, seq.labels)
    np.testing.assert_array_equal(back.mask, seq.mask)
    np.testing.assert_array_equal(back.poses, seq.poses)


def test_occ3d_nuscenes_export_round_trip_identical(tmp_path: Path) -> None:
    seqs = [make_seq(t=2, geometry="occ3d", classes=12, seed=s) for s in (4, 5)]
    export_occ3d_nuscenes(seqs[0], tmp_path, split="train")
    export_occ3d_nuscenes(seqs[1], tmp_path, split="val")
    for split, seq in zip(("train", "val"), seqs):
        back = Occ3DNuScenesSource(tmp_path, split).load(0, [0, 1])
        np.testing.assert_array_equal(back.labels, seq.labels)
        np.testing.assert_array_equal(back.mask, seq.mask)
        np.testing.assert_allclose(back.poses, seq.poses, rtol=0, atol=1e-9)
        lidar = Occ3DNuScenesSource(tmp_path, split, mask="lidar").load(0, [1])
        np.testing.assert_array_equal(lidar.mask[0], seq.mask[1])


def test_occ3d_waymo_export_round_trip(tmp_path: Path) -> None:
    seq = make_seq(t=2, geometry="occ3d", classes=12, seed=6)
    export_occ3d_waymo(seq, tmp_path)
    back = Occ3DWaymoSource(tmp_path, "train").load(0, [0, 1])
    collapse = np.arange(12)
    collapse[CLASS_ID["barrier"]], collapse[CLASS_ID["ground"]] = CLASS_ID["other"], CLASS_ID["sidewalk"]
    np.testing.assert_array_equal(back.labels, collapse[seq.labels])
    np.testing.assert_array_equal(back.mask, seq.mask)
    np.testing.assert_array_equal(back.poses, seq.poses)


def test_exports_refuse_what_the_layout_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(OcclabError, match="bicycle"):
        export_carlasc(make_seq(t=1, classes=12), tmp_path)
    with pytest.raises(OcclabError, match="grid"):
        export_occ3d_nuscenes(make_seq(t=1), tmp_path)
    seq = make_seq(t=1)
    seq.labels[0, 5, 5, 5] = 255
    with pytest.raises(OcclabError, match="ignore"):
        export_carlasc(seq, tmp_path)


def test_town_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    town = pytest.importorskip("occlab.data.town")
    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path / "cache"))
    seq = town.generate_sequence(0, geometry="carlasc", frames=3)
    export_carlasc(seq, tmp_path / "carlasc")
    back = make_source("carlasc", tmp_path / "carlasc").load(0, np.arange(3))
    for key in ("labels", "mask", "poses", "density"):
        np.testing.assert_array_equal(getattr(back, key), getattr(seq, key))
    occ = town.generate_sequence(1, geometry="occ3d", frames=2)
    export_occ3d_nuscenes(occ, tmp_path / "nusc")
    back = make_source("occ3d_nuscenes", tmp_path / "nusc").load(0, [0, 1])
    np.testing.assert_array_equal(back.labels, occ.labels)
    np.testing.assert_array_equal(back.mask, occ.mask)
    np.testing.assert_allclose(back.poses, occ.poses, atol=1e-9)


# ------------------------------------------------------------------------------------------------ verify, describe
def test_verify_ok_then_names_a_deleted_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    export_carlasc(make_seq(t=4), tmp_path)
    report = verify("carlasc", tmp_path)
    assert report.ok, report.text()
    assert report.splits["train"] == {"scenes": 1, "frames": 4}
    assert any("Val" in w for w in report.warnings)  # absent splits are warnings while one split is usable
    assert verify_main("carlasc", tmp_path) == 0
    gone = tmp_path / "Train" / "Town10_Medium" / "cartesian" / "evaluation" / "000002.label"
    gone.unlink()
    report = verify("carlasc", tmp_path)
    assert not report.ok and any(str(gone) in e and "missing frame files (1)" in e for e in report.errors)
    capsys.readouterr()
    assert verify_main("carlasc", tmp_path) == 1
    assert str(gone) in capsys.readouterr().out


def test_verify_occ3d_nuscenes_and_bad_roots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_nuscenes(tmp_path, [TOKEN, "c" * 32])
    assert verify("occ3d_nuscenes", tmp_path).ok
    gone = tmp_path / "gts" / "scene-0001" / ("c" * 32) / "labels.npz"
    gone.unlink()
    report = verify("occ3d_nuscenes", tmp_path)
    assert not report.ok and str(gone) in report.text()
    assert verify_main("occ3d_nuscenes", tmp_path / "absent") == 1
    out = capsys.readouterr().out
    assert str(tmp_path / "absent") in out and "occlab data verify occ3d_nuscenes --root" in out
    assert verify_main("carlasc", tmp_path) == 1  # a nuScenes root holds no CarlaSC split
    assert not verify("synthetic_town", tmp_path).ok  # the town takes no root


def test_describe_counts(tmp_path: Path) -> None:
    seqs = [make_seq(t=5, seed=s) for s in range(2)]
    export_carlasc(seqs, tmp_path)
    d = describe("carlasc", tmp_path, frames=3)
    train = d["splits"]["train"]
    assert (train["scenes"], train["frames"], train["windows"], train["frames_counted"]) == (2, 10, 6, 10)
    labels = np.concatenate([s.labels for s in seqs])
    mask = np.concatenate([s.mask for s in seqs])
    expected = np.bincount(labels.ravel(), minlength=11)
    assert train["class_voxels"] == {n: int(expected[i]) for i, n in enumerate(CLASS_NAMES[:11])}
    assert train["class_voxels_visible"]["road"] == int((labels[mask] == CLASS_ID["road"]).sum())
    assert train["visible_share"] == pytest.approx(mask.mean())
    assert "Val" in d["splits"]["val"]["error"] and d["class_names"] == list(CLASS_NAMES[:11])
    json.dumps(d)
    assert describe("carlasc", tmp_path, frames=3, max_frames=4)["splits"]["train"]["frames_counted"] == 4


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_root_names_dataset_path_and_help(tmp_path: Path) -> None:
    for name in ("carlasc", "occ3d_nuscenes", "occ3d_waymo"):
        with pytest.raises(OcclabError) as e:
            make_source(name, tmp_path / "nowhere")
        msg = str(e.value)
        assert name in msg and str(tmp_path / "nowhere") in msg
        assert f"occlab data verify {name} --root DIR" in msg and f"data_manifests/{name}.yaml" in msg
    with pytest.raises(OcclabError, match="Train"):
        make_source("carlasc", tmp_path)  # the root exists but has no Train/ folder


def test_missing_frame_inside_a_window(tmp_path: Path) -> None:
    export_carlasc(make_seq(t=4), tmp_path)
    ev = tmp_path / "Train" / "Town10_Medium" / "cartesian" / "evaluation"
    (ev / "000002.label").unlink()
    ds = WindowDataset(CarlaSCSource(tmp_path, "train"), frames=2)
    ds.window(0)  # frames 0, 1 are fine
    with pytest.raises(OcclabError, match=str(ev / "000002.label")):
        ds.window(1)
    (ev / "000002.bin").unlink()  # the whole frame gone: poses.txt has one pose too many, the frame is named
    with pytest.raises(OcclabError, match=str(ev / "000002.label")):
        CarlaSCSource(tmp_path, "train")
    export_occ3d_waymo(make_seq(t=3, geometry="occ3d", classes=12), tmp_path / "w")
    gone = tmp_path / "w" / "training" / "000" / "001_04.npz"
    gone.unlink()
    src = Occ3DWaymoSource(tmp_path / "w", "train")
    assert src.length(0) == 3  # the gap is kept, never skipped
    with pytest.raises(OcclabError, match=str(gone)):
        src.load(0, [0, 1])


def test_wrong_shape_dtype_labels_and_corrupt_files(tmp_path: Path, real: dict) -> None:
    tokens = [TOKEN, "d" * 32, "e" * 32, "f" * 32]
    write_nuscenes(tmp_path, tokens)
    src = Occ3DNuScenesSource(tmp_path, "train")
    frame = [tmp_path / "gts" / "scene-0001" / t / "labels.npz" for t in tokens]
    np.savez_compressed(frame[0], semantics=real["semantics"][:100], mask_lidar=real["mask_lidar"],
                        mask_camera=real["mask_camera"])
    np.savez_compressed(frame[1], semantics=np.where(real["semantics"] == 4, 18, real["semantics"]),
                        mask_lidar=real["mask_lidar"], mask_camera=real["mask_camera"])
    frame[2].write_bytes(b"this is not a zip archive")
    frame[3].write_bytes(FIXTURE.read_bytes()[:30000])  # truncated download
    for i, what in enumerate(("shape", r"\[18\]", "corrupt", "corrupt")):
        with pytest.raises(OcclabError, match=what) as e:
            src.load(0, [i])
        assert str(frame[i]) in str(e.value)
    np.savez_compressed(frame[0], semantics=real["semantics"].astype(np.float32), mask_camera=real["mask_camera"])
    with pytest.raises(OcclabError, match="float32"):
        src.load(0, [0])
    # CarlaSC: a label file of the wrong size, a raw id outside 0..22
    seq = make_seq(t=2)
    export_carlasc(seq, tmp_path / "c")
    ev = tmp_path / "c" / "Train" / "Town10_Medium" / "cartesian" / "evaluation"
    np.zeros(100, np.uint32).tofile(ev / "000000.label")
    bad = np.zeros(CARLA_GRID, np.uint32)
    bad[3, 4, 5] = 30
    bad.tofile(ev / "000001.label")
    carla = CarlaSCSource(tmp_path / "c", "train")
    with pytest.raises(OcclabError, match="400 bytes") as e:
        carla.load(0, [0])
    assert str(ev / "000000.label") in str(e.value)
    with pytest.raises(OcclabError, match=r"\[30\]") as e:
        carla.load(0, [1])
    assert str(ev / "000001.label") in str(e.value)
    report = verify("carlasc", tmp_path / "c")
    assert not report.ok and str(ev / "000000.label") in report.text()


def test_annotations_and_params_errors(tmp_path: Path) -> None:
    with pytest.raises(OcclabError, match="annotations.json"):
        Occ3DNuScenesSource(tmp_path, "train")
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(OcclabError, match="not valid JSON"):
        Occ3DNuScenesSource(tmp_path, "train")
    export_carlasc(make_seq(t=1), tmp_path)
    params = tmp_path / "Train" / "Town10_Medium" / "cartesian" / "evaluation" / "params.json"
    params.write_text(json.dumps({"grid_size": [256, 256, 32], "min_bound": [0, 0, 0], "max_bound": [1, 1, 1]}))
    with pytest.raises(OcclabError, match=str(params)):
        CarlaSCSource(tmp_path, "train")


# ------------------------------------------------------------------------------------------------ manifests
def test_manifests_load_and_agree_with_the_code() -> None:
    assert set(known_manifests()) >= {"carlasc", "occ3d_nuscenes", "occ3d_waymo", "synthetic_town"}
    with pytest.raises(OcclabError, match="known: .*carlasc"):
        load_manifest("kitti360")
    for name in ("carlasc", "occ3d_nuscenes", "occ3d_waymo"):
        m = load_manifest(name)
        g = GEOMETRIES[m["geometry"]["name"]]
        assert tuple(m["geometry"]["grid"]) == g.grid and np.allclose(m["geometry"]["voxel_size"], g.voxel_size)
        assert np.allclose(m["geometry"]["min_bound"], g.min_bound)
        assert np.allclose(m["geometry"]["max_bound"], g.max_bound)
        assert m["checksums"] == [] and m["source"]["paper"] and m["licence"]
    town = load_manifest("synthetic_town")
    assert {k: v["seeds"] for k, v in town["splits"].items()} == {
        "train": [0, 99999], "val": [100000, 109999], "test": [110000, 119999]}
    for g, spec in town["geometries"].items():
        assert tuple(spec["grid"]) == GEOMETRIES[g].grid


def test_synthetic_town_verify_and_describe_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("occlab.data.town")
    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path))
    assert verify_main("synthetic_town") == 0
    d = describe("synthetic_town", frames=2, num_sequences=1, seq_len=3)
    assert d["splits"]["val"]["scenes"] == 1 and d["splits"]["val"]["windows"] == 2
    assert sum(d["splits"]["test"]["class_voxels"].values()) == 3 * int(np.prod(CARLA_GRID))
    with pytest.raises(OcclabError, match="without --root"):
        describe("synthetic_town", tmp_path)
