"""Applications of the HexPlane DiT: long sequences chunk by chunk, inpainting and outpainting on HexPlanes, and
the ego-motion measure that asks whether generated scenes follow their command."""
import numpy as np
import pytest
import torch

from occlab.diffusion import Diffusion
from occlab.editing import (
    box_plane_mask,
    inpaint_latent,
    map_mask,
    overlap_box,
    shift_labels,
    shift_planes,
)
from occlab.errors import OcclabError
from occlab.generate import sample_long
from occlab.metrics import ego_motion as E
from occlab.models import dit as D
from occlab.planes import PLANES

FULL = {"t": 4, "x": 16, "y": 16, "z": 8}  # the smoke VAE window and its latent (rates 2, 2, 2, 2)
LATENT = {"t": 2, "x": 8, "y": 8, "z": 4}


def tiny_dit(**kw):
    torch.manual_seed(0)
    return D.DiT(D.dit_tiny(sizes=(2, 8, 8, 4), **kw)).eval()


# ---------------------------------------------------------------------------------------------------------
# long sequences
# ---------------------------------------------------------------------------------------------------------

class Spy(torch.nn.Module):
    """A DiT stand-in that records the `previous` condition of every call and predicts zero noise."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []
        self.config, self.layout = model.config, model.layout

    def forward(self, x, t, cond=None, drop=None):
        self.seen.append(None if (cond or {}).get("previous") is None else cond["previous"].clone())
        return torch.zeros_like(x)


def test_each_chunk_receives_the_previous_chunks_latent():
    spy = Spy(tiny_dit(previous_cond=True, command_cond=True))
    diffusion = Diffusion(100)
    maps = sample_long(spy, diffusion, 3, cond={"command": torch.tensor([2])}, steps=4, seed=1)
    assert maps.shape == (3, 4, *spy.layout.map_shape)
    per_chunk = [spy.seen[k * 4:(k + 1) * 4] for k in range(3)]  # 4 DDIM steps per chunk
    assert all(p is None for p in per_chunk[0])  # the first chunk has no previous window
    for k in (1, 2):
        assert all(torch.equal(p, maps[k - 1:k]) for p in per_chunk[k])
    assert not torch.equal(maps[0], maps[1])  # chunks draw their own noise


def test_long_sequence_without_previous_condition_still_samples_every_chunk():
    model = tiny_dit(command_cond=True)
    maps = sample_long(model, Diffusion(100), 2, cond={"command": [torch.tensor([0]), torch.tensor([3])]}, steps=3)
    assert maps.shape[0] == 2
    with pytest.raises(OcclabError, match="3 values for 2 chunks"):
        sample_long(model, Diffusion(100), 2, cond={"command": [torch.tensor([0])] * 3}, steps=3)


# ---------------------------------------------------------------------------------------------------------
# inpainting and outpainting
# ---------------------------------------------------------------------------------------------------------

def test_a_voxel_box_touches_the_plane_cells_its_voxels_read():
    pm = box_plane_mask((0, 4, 0, 16, 0, 7, 0, 8), FULL, LATENT)  # the left part of the scene, y < 7
    assert pm["xy"].shape == (8, 8) and pm["xy"][:, :4].all() and not pm["xy"][:, 4:].any()  # ceil(7 / 2) = 4
    assert pm["tx"].all() and pm["xz"].all() and pm["tz"].all()  # every x, t, z is read by the box
    assert pm["yz"][:4].all() and not pm["yz"][4:].any() and pm["ty"][:, :4].all() and not pm["ty"][:, 4:].any()
    with pytest.raises(OcclabError, match="non-empty range"):
        box_plane_mask((0, 4, 5, 5, 0, 16, 0, 8), FULL, LATENT)


@pytest.mark.parametrize("rollout", ["pro", "vconcat", "unfold"])
def test_inpainting_keeps_the_known_region_exactly(rollout):
    model = tiny_dit(rollout=rollout, command_cond=True)
    torch.manual_seed(3)
    known = model.layout.to_map({n: torch.randn(1, 4, *model.layout.shapes[n]) for n in PLANES})
    mask = map_mask(model.layout, box_plane_mask((0, 4, 0, 8, 0, 16, 0, 8), FULL, LATENT))
    assert mask.shape == (1, 1, *model.layout.map_shape) and 0 < int(mask.sum()) < int(model.layout.cell_mask.sum())
    for sampler in ("ddim", "ddpm"):
        x = inpaint_latent(model, Diffusion(50), known, mask, cond={"command": torch.tensor([1])}, steps=5,
                           sampler=sampler, guidance=2.0, seed=4)
        m = mask.expand_as(x)
        assert torch.equal(x[m], known[m])  # exact, not close
        assert not torch.allclose(x[~m & model.layout.cell_mask.expand_as(x)], known[~m & model.layout.cell_mask.expand_as(x)])


def test_outpainting_overlap_equals_the_shifted_source_latent():
    model = tiny_dit()
    torch.manual_seed(5)
    planes = {n: torch.randn(1, 4, *model.layout.shapes[n]) for n in PLANES}
    shifted = shift_planes(planes, 2, -1)  # 4 voxels ahead, 2 to the right, in latent cells
    assert torch.equal(shifted["xy"][0, :, :6, 1:], planes["xy"][0, :, 2:, :7])
    assert torch.equal(shifted["tx"][0, :, :, :6], planes["tx"][0, :, :, 2:])
    assert torch.equal(shifted["tz"], planes["tz"])  # no x, no y: unchanged
    assert shifted["xy"][0, :, 6:].abs().sum() == 0 and shifted["yz"][0, :, 0].abs().sum() == 0
    box = overlap_box((4, -2), FULL)
    assert box == (0, 4, 0, 12, 2, 16, 0, 8)
    known = model.layout.to_map(shifted)
    mask = map_mask(model.layout, box_plane_mask(box, FULL, LATENT))
    x = inpaint_latent(model, Diffusion(50), known, mask, steps=4, seed=0)
    got = model.layout.from_map(x)
    assert torch.equal(got["xy"][0, :, :6, 1:], planes["xy"][0, :, 2:, :7])  # the overlap is the source, shifted
    assert not torch.equal(got["xy"][0, :, 6:], known[0:1].new_zeros(1)[0].expand(4, 2, 8))  # the strip is new
    lab = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    moved = shift_labels(lab, (1, -1))
    assert (moved[:, :3, 1:] == lab[:, 1:, :3]).all() and (moved[:, 3] == 255).all()


# ---------------------------------------------------------------------------------------------------------
# the ego-motion measure
# ---------------------------------------------------------------------------------------------------------

def moved_frame(big: np.ndarray, dx: float, dy: float, yaw: float, crop: int, voxel: float = 0.4) -> np.ndarray:
    """The centre crop of a big BEV frame seen by an ego that moved by (dx, dy, yaw): q -> R q + d (nearest)."""
    X = big.shape[0]
    c = (np.arange(crop) + 0.5 - crop / 2) * voxel
    qx, qy = np.meshgrid(c, c, indexing="ij")
    px = np.cos(yaw) * qx - np.sin(yaw) * qy + dx
    py = np.sin(yaw) * qx + np.cos(yaw) * qy + dy
    i = np.floor(px / voxel + X / 2).astype(int)
    j = np.floor(py / voxel + X / 2).astype(int)
    return big[i, j]


@pytest.fixture(scope="module")
def town_windows(tmp_path_factory):
    """Town windows of 8 frames at the study crop, 3 per scene: their commands are known."""
    from occlab.data import make_dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OCCLAB_CACHE", str(tmp_path_factory.mktemp("town")))
        ds = make_dataset("synthetic_town", None, "train", frames=8, stride=8, crop=(32, 32, 8), num_sequences=8,
                          seq_len=24)
        return [ds.window(i) for i in range(len(ds))]


def test_registration_recovers_a_known_shift_and_rotation():
    rng = np.random.default_rng(0)  # a static world of 3 x 3-cell blocks: road, sidewalk, building, vegetation
    world = np.kron(rng.choice([6, 8, 1, 9], size=(22, 22), p=[0.5, 0.2, 0.2, 0.1]), np.ones((3, 3), np.int64))
    for dx, dy, yaw in [(0.8, 0.0, 0.0), (0.5, 0.2, np.deg2rad(4.0)), (-0.3, -0.4, np.deg2rad(-6.0))]:
        a = moved_frame(world, 0, 0, 0, 24)
        b = moved_frame(world, dx, dy, yaw, 24)
        est = E.register(a, b)
        assert abs(est[0] - dx) < 0.15 and abs(est[1] - dy) < 0.15 and abs(np.degrees(est[2] - yaw)) < 1.5


def test_the_estimated_motion_follows_the_poses_of_town_windows(town_windows):
    errors = []
    for w in town_windows:
        true, est = E.motion_summary(w.trajectory), E.motion_summary(E.estimate_trajectory(w.labels))
        errors.append((abs(true["path_m"] - est["path_m"]), abs(true["yaw_deg"] - est["yaw_deg"])))
    errors = np.array(errors)
    assert np.median(errors[:, 0]) < 1.0 and np.median(errors[:, 1]) < 4.0  # metres, degrees over 0.7 s


def test_command_classification_of_town_windows_beats_chance(town_windows):
    summaries = [E.motion_summary(E.estimate_trajectory(w.labels)) for w in town_windows]
    commands = [w.command for w in town_windows]
    rule = E.fit_command_rule(summaries[::2], commands[::2])  # fitted on half, scored on the other half
    pred = [rule.classify(s) for s in summaries[1::2]]
    truth = commands[1::2]
    chance = 1 / len(set(truth))
    assert E.balanced_accuracy(truth, pred) > chance + 0.2
    m = E.confusion(truth, pred)
    assert m.sum() == len(truth) and m.shape == (4, 4)


def test_command_rule_reads_static_forward_left_right():
    rule = E.CommandRule(static_m=0.5, turn_deg=8.0)
    traj = np.zeros((8, 3))
    assert E.classify(traj, rule) == 0
    traj[1:, 0] = 0.6
    assert E.classify(traj, rule) == 1
    traj[1:, 2] = np.deg2rad(3.0)
    assert E.classify(traj, rule) == 2
    traj[1:, 2] *= -1
    assert E.classify(traj, rule) == 3


# ---------------------------------------------------------------------------------------------------------
# end to end: a smoke VAE and DiT, the command line
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_dit(tmp_path_factory):
    """A smoke VAE (2 steps) and a DiT with the previous and command conditions (2 steps) on 8-frame scenes."""
    from occlab.cli import main
    from occlab.train.dit_trainer import dit_setup, train_dit

    base = tmp_path_factory.mktemp("apps")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OCCLAB_CACHE", str(base / "town"))
        assert main(["train", "vae", "--preset", "smoke", "--steps", "2", "--threads", "1",
                     "--out", str(base / "vae")]) == 0
        dit, cfg = dit_setup(base / "vae" / "checkpoint.pt", "smoke", "pro", ("command", "previous"))
        cfg.steps, cfg.threads, cfg.data_options = 2, 1, {"seq_len": 8, "num_sequences": 2}
        train_dit(base / "vae" / "checkpoint.pt", base / "dit", dit, cfg, progress=False)
    return base / "dit" / "checkpoint.pt"


def test_generate_frames_writes_one_long_sequence(smoke_dit, tmp_path):
    from occlab.cli import main
    from occlab.data import load_sequence

    assert main(["generate", "--ckpt", str(smoke_dit), "--n", "1", "--frames", "10", "--steps", "2",
                 "--command", "left", "--out", str(tmp_path)]) == 0
    seq = load_sequence(tmp_path / "long_00000.npz")
    assert seq.labels.shape == (10, 16, 16, 8) and seq.command == 2  # 3 chunks of 4 frames, cut to 10


def test_scene_edits_keep_their_known_cells(smoke_dit):
    from occlab.editing import inpaint_scene, outpaint_scene
    from occlab.generate import load_generator

    gen = load_generator(smoke_dit)
    labels = np.random.default_rng(0).choice([0, 6, 8, 1], size=(4, 16, 16, 8)).astype(np.uint8)
    inp = inpaint_scene(gen, labels, (0, 4, 0, 16, 0, 8, 0, 8), steps=3, cond={"command": "right"})
    out = outpaint_scene(gen, labels, (4, 0), steps=3)
    for r in (inp, out):
        m = r["mask"].expand_as(r["map"])
        assert r["labels"].shape == (4, 16, 16, 8) and torch.equal(r["map"][m], r["known"][m])
    with pytest.raises(OcclabError, match="multiple of the latent's cell"):
        outpaint_scene(gen, labels, (3, 0), steps=3)
