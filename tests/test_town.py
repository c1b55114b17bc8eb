"""The procedural town: determinism, classes, motion, visibility, windows and caching."""
import numpy as np
import pytest

from occlab.classes import CLASS_ID
from occlab.data import get_geometry, make_dataset
from occlab.data.town import SPLITS, TownSource, generate_sequence
from occlab.data.town.raycast import visibility
from occlab.errors import OcclabError


@pytest.fixture(scope="module")
def seq():
    return generate_sequence(3, "carlasc", 16)


def test_deterministic_by_seed(seq):
    again = generate_sequence(3, "carlasc", 16)
    for key in ("labels", "mask", "poses", "boxes"):
        np.testing.assert_array_equal(getattr(seq, key), getattr(again, key))
    other = generate_sequence(4, "carlasc", 16)
    assert (other.labels != seq.labels).mean() > 0.05


def test_shorter_sequence_is_a_prefix(seq):
    short = generate_sequence(3, "carlasc", 6)
    np.testing.assert_array_equal(short.labels, seq.labels[:6])
    np.testing.assert_allclose(short.poses, seq.poses[:6])


@pytest.mark.parametrize("geometry", ["carlasc", "occ3d"])
def test_shapes_and_every_class_present(geometry):
    geo = get_geometry(geometry)
    s = generate_sequence(11, geometry, 16)
    assert s.labels.shape == (16, *geo.grid) and s.labels.dtype == np.uint8
    assert s.mask.shape == s.labels.shape and s.mask.dtype == bool
    assert s.poses.shape == (16, 4, 4) and s.layout.shape == (16, *geo.grid[:2])
    assert set(np.unique(s.labels)) == set(range(11)), "a 16-frame sequence shows all 10 classes"


def test_poles_are_one_voxel_thick(seq):
    pole = (seq.labels[0] == CLASS_ID["pole"]).any(-1)
    assert pole.sum() > 3
    neighbours = sum(np.roll(pole, shift, axis) for shift in (-1, 1) for axis in (0, 1))
    assert (neighbours[pole] == 0).mean() > 0.9


def test_vehicles_move_and_static_world_follows_the_ego_pose():
    s = generate_sequence(4, "carlasc", 16)  # forward command
    geo = get_geometry("carlasc")
    assert np.linalg.norm(s.poses[-1, :2, 3] - s.poses[0, :2, 3]) > 5.0
    # buildings of frame 0, moved into frame t's ego frame with the poses, land on frame t's buildings
    t = 10
    ijk = np.argwhere(s.labels[0] == CLASS_ID["building"])
    xyz = np.array(geo.min_bound) + (ijk + 0.5) * np.array(geo.voxel_size)
    rel = np.linalg.inv(s.poses[t]) @ s.poses[0]
    moved = xyz[:, :2] @ rel[:2, :2].T + rel[:2, 3]
    idx = np.floor((moved - np.array(geo.min_bound[:2])) / np.array(geo.voxel_size[:2])).astype(int)
    inside = np.all((idx >= 0) & (idx < 128), axis=1)
    hits = s.labels[t][idx[inside, 0], idx[inside, 1], ijk[inside, 2]] == CLASS_ID["building"]
    assert hits.mean() > 0.85
    # the same tracks move by more than the ego-motion would explain for still objects
    boxes = s.boxes
    moved_tracks = 0
    for track in np.unique(boxes[boxes[:, 1] == CLASS_ID["vehicle"], 9]):
        rows = boxes[boxes[:, 9] == track]
        if rows[0, 0] == 0 and rows[-1, 0] >= 8:
            world = [s.poses[int(r[0])] @ np.array([r[2], r[3], 0, 1]) for r in (rows[0], rows[-1])]
            moved_tracks += np.linalg.norm(world[1][:2] - world[0][:2]) > 2.0
    assert moved_tracks >= 1
    assert (s.labels[0] == CLASS_ID["vehicle"]).sum() != (s.labels[-1] == CLASS_ID["vehicle"]).sum() or \
        not np.array_equal(s.labels[0] == CLASS_ID["vehicle"], s.labels[-1] == CLASS_ID["vehicle"])


@pytest.mark.parametrize("command,sign", [(2, 1), (3, -1)])
def test_turn_commands_turn_the_right_way(command, sign):
    s = generate_sequence(20, "carlasc", 32, command=command)
    assert s.command == command
    assert sign * s.trajectory[:, 2].sum() > 0.3


def test_static_command_stays_put():
    s = generate_sequence(21, "carlasc", 16, command=0)
    assert np.abs(s.trajectory).max() < 1e-6


def test_visibility_sanity(seq):
    geo = get_geometry("carlasc")
    m = seq.mask[0]
    assert 0.3 < m.mean() < 0.95
    assert m[60:68, 60:68, 0].all(), "the road right around the ego is seen"
    # a solid wall hides what is behind it
    wall = np.zeros(geo.grid, np.uint8)
    wall[:, :, 0] = CLASS_ID["road"]
    wall[80:82, :, :] = CLASS_ID["building"]
    vis = visibility(wall, geo)
    assert vis[80, 64, 3] and not vis[81, 64, 3] and not vis[100:, 50:78, :].any()
    assert vis[70, 64, 0] and vis[40, 64, 0]
    occ3d = generate_sequence(3, "occ3d", 2)
    below = get_geometry("occ3d").heights() < -0.4
    assert not occ3d.mask[..., below].any(), "nothing under the road surface is visible"


def test_boxes_are_in_the_grid_with_tracks(seq):
    assert len(seq.boxes) > 0
    frame, cls = seq.boxes[:, 0], seq.boxes[:, 1]
    assert set(np.unique(cls)) <= {CLASS_ID["vehicle"], CLASS_ID["pedestrian"]}
    assert frame.min() >= 0 and frame.max() < 16
    assert np.abs(seq.boxes[:, 2:4]).max() < 25.6


def test_windows_and_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path))
    ds = make_dataset("synthetic_town", split="val", frames=4, stride=2, num_sequences=2, seq_len=8)
    assert len(ds) == 2 * 3
    item = ds[1]
    assert item["labels"].shape == (4, 128, 128, 8) and item["boxes"].shape[:1] == (4,)
    assert len(list(tmp_path.rglob("*.npz"))) == 1
    again = TownSource(split="val", num_sequences=2, seq_len=8)
    np.testing.assert_array_equal(again.load(0, np.arange(2, 6)).labels, item["labels"].numpy())
    assert TownSource(split="train").seeds[0] == SPLITS["train"][0]
    assert set(TownSource(split="val").seeds).isdisjoint(TownSource(split="test").seeds)


def test_bad_requests_are_clear_errors():
    with pytest.raises(OcclabError, match="1..128"):
        generate_sequence(0, "carlasc", 500)
    with pytest.raises(OcclabError, match="expected one of carlasc, occ3d"):
        generate_sequence(0, "kitti", 4)
    with pytest.raises(OcclabError, match="no window of 40 frames"):
        make_dataset("synthetic_town", split="val", frames=40, num_sequences=1, seq_len=16)
