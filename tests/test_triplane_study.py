"""Triplane latent diffusion training on static town frames: encode, train, resume, sample, outpaint via the CLI."""
from __future__ import annotations

import csv
from dataclasses import asdict

import numpy as np
import pytest
import torch

from occlab.models.xscene import XSceneVAE, xscene_tiny
from occlab.models.xscene_diffusion import config_for_vae
from occlab.train.config import DataConfig, TrainConfig
from occlab.train.dit_trainer import DiTTrainConfig
from occlab.train.triplane_diffusion import (
    encode_frames,
    load_triplane_diffusion,
    sample_scenes,
    train_triplane_diffusion,
)

TINY = (16, 16, 8)


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    from occlab.train.trainer import train

    mp = pytest.MonkeyPatch()
    mp.setenv("OCCLAB_CACHE", str(tmp_path_factory.getbasetemp() / "town"))
    cfg = xscene_tiny(TINY, 1, num_classes=11)
    data = DataConfig(frames=1, crop=TINY, train_sequences=3, val_sequences=1)
    out = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    train(XSceneVAE(cfg), {"name": "xscene", "config": asdict(cfg)}, data, TrainConfig(steps=4, ckpt_every=4), out,
          num_classes=11, progress=False)
    yield out / "checkpoint.pt"
    mp.undo()


def test_encode_frames_gives_latents_layouts_and_boxes(vae_ckpt):
    from occlab.train.triplane_diffusion import load_vae

    vae, data = load_vae(vae_ckpt)
    frames = encode_frames(vae, data, "train", max_boxes=8)
    n = len(frames["labels"])
    assert n == 3 and frames["layout"].shape == (n, 16, 16) and frames["boxes"].shape == (n, 8, 8, 3)
    assert frames["planes"]["xy"].shape == (n, 4, 8, 8) and frames["planes"]["xz"].shape == (n, 4, 8, 8)
    assert frames["box_classes"].shape == (n, 8)


def test_training_lowers_the_loss_resumes_exactly_and_samples(vae_ckpt, tmp_path):
    cfg = DiTTrainConfig(steps=40, batch_size=4, lr=1e-3, diffusion_steps=100, ckpt_every=20, seed=3)
    m = train_triplane_diffusion(vae_ckpt, tmp_path / "a", cfg=cfg)
    assert m["steps"] == 40 and m["final_loss"] < m["first_loss"]
    # an interrupted run (stopped at 20) resumes to the same weights
    train_triplane_diffusion(vae_ckpt, tmp_path / "b", cfg=DiTTrainConfig(**{**asdict(cfg), "steps": 20}))
    (tmp_path / "b" / "metrics.json").unlink()
    train_triplane_diffusion(vae_ckpt, tmp_path / "b", cfg=cfg)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert all(torch.allclose(a["ema"][k], b["ema"][k], atol=1e-6) for k in a["ema"])
    with open(tmp_path / "b" / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(40))
    vae, model, diffusion, stats, _ = load_triplane_diffusion(tmp_path / "a" / "checkpoint.pt")
    s1 = sample_scenes(vae, model, diffusion, stats, None, 2, steps=4, seed=1)
    s2 = sample_scenes(vae, model, diffusion, stats, None, 2, steps=4, seed=1)
    assert s1.shape == (2, *TINY) and s1.dtype == torch.uint8 and torch.equal(s1, s2)


def test_cli_outpaints_a_three_by_three_map_of_the_expected_size(vae_ckpt, tmp_path, capsys):
    import json

    from occlab.cli import main
    from occlab.outpaint import big_shape

    cfg = DiTTrainConfig(steps=2, batch_size=2, diffusion_steps=100, ckpt_every=2)
    train_triplane_diffusion(vae_ckpt, tmp_path / "d", cfg=cfg)
    want = big_shape(TINY, (3, 3))
    assert want == (32, 32, 8)
    layout = np.zeros(want[:2], np.int64)
    layout[:, 10:14] = 6  # a road along x
    np.save(tmp_path / "layout.npy", layout)
    out = tmp_path / "map.npz"
    assert main(["generate", "--model", "xscene", "--ckpt", str(tmp_path / "d" / "checkpoint.pt"), "--layout",
                 str(tmp_path / "layout.npy"), "--outpaint", "3x3", "--steps", "3", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = np.load(out)
    assert saved["labels"].shape == want and saved["labels"].dtype == np.uint8 and info["shape"] == list(want)
    assert saved["offsets"].shape == (9, 4) and saved["agreement"].shape == (8, 3)
    np.save(tmp_path / "small.npy", layout[:16])
    assert main(["generate", "--model", "xscene", "--ckpt", str(tmp_path / "d" / "checkpoint.pt"), "--layout",
                 str(tmp_path / "small.npy"), "--outpaint", "3x3", "--steps", "3", "--out", str(out)]) != 0
    assert "needs (32, 32)" in capsys.readouterr().err


def test_flyover_writes_a_gif_with_one_frame_per_pose(tmp_path):
    pytest.importorskip("pyvista")
    import imageio.v3 as iio

    from occlab.render.flyover import flyover_path, render_flyover

    labels = np.zeros((32, 32, 8), np.uint8)
    labels[:, :, 0] = 6  # road
    labels[4:10, 4:10, :5] = 1  # a building
    poses = flyover_path(labels.shape, frames=5)
    assert len(poses) == 5 and poses[0][0][2] > 0 and poses[-1][0][0] > poses[0][0][0]
    path = render_flyover(labels, tmp_path / "fly.gif", frames=5, window_size=(160, 120))
    gif = iio.imread(path, index=None)
    assert gif.shape[0] == 5 and gif.shape[1:3] == (120, 160)
    assert not np.array_equal(gif[0], gif[-1])  # the camera moves


def test_seam_statistics_on_hand_made_maps():
    from occlab.outpaint import chunk_offsets
    from occlab.studies.triplane import seam_statistics

    offsets = chunk_offsets((8, 8, 2), (1, 2), 4)  # chunks at y 0 and 4: the seam is where y = 8 meets y = 7
    uniform = torch.full((8, 12, 2), 6, dtype=torch.uint8)
    s = seam_statistics(uniform, offsets, (8, 8, 2), band=1)
    assert s["seam_columns"] == 8 * 2 and s["class_tv_seam_vs_interior"] == 0 and s["occupancy_seam"] == 1.0
    split = uniform.clone()
    split[:, 7:9] = 1  # another class exactly on the seam band
    s = seam_statistics(split, offsets, (8, 8, 2), band=1)
    assert s["class_tv_seam_vs_interior"] == pytest.approx(1.0)


def test_claims_from_hand_made_tables():
    import pandas as pd

    from occlab.studies.triplane import claims, gain_values

    rows = []
    for seed, jitter in ((0, 0.0), (1, 0.01)):
        for dec, res, miou in (("deformable", "high", 0.60), ("bilinear", "high", 0.59),
                               ("deformable", "low", 0.50), ("bilinear", "low", 0.40)):
            rows.append({"decoder": dec, "resolution": res, "seed": seed, "miou": miou + jitter, "iou": 0.5,
                         "run_id": f"{dec}-{res}-{seed}"})
    vae = pd.DataFrame(rows)
    g = gain_values(vae)
    assert g["low"]["miou_gain"] == pytest.approx(0.10) and g["high"]["miou_gain"] == pytest.approx(0.01)
    diff = pd.DataFrame([{"variant": v, "seed": s, "fid_3d": f + s, "f_score_3d": 0.5, "run_id": v}
                         for v, f in (("full", 100.0), ("without_layout", 300.0), ("without_boxes", 110.0))
                         for s in (0, 1)])
    verdicts = {c["id"]: c for c in claims(vae, diff, "study")}
    assert verdicts["xs-t6-deform-gain-low"]["holds"] == "yes"
    assert verdicts["xs-t6-resolution"]["holds"] == "yes"
    assert verdicts["xs-t6-layout-vs-boxes"]["holds"] == "yes"
    assert verdicts["xs-t6-layout-vs-boxes"]["ours"] == [pytest.approx(200.0), pytest.approx(10.0)]
    flipped = vae.copy()
    flipped.loc[flipped.resolution == "high", "miou"] -= 0.3
    assert {c["id"]: c for c in claims(flipped, diff, "study")}["xs-t6-resolution"]["holds"] == "no"
    noisy = diff.copy()
    noisy.loc[(noisy.variant == "without_layout") & (noisy.seed == 1), "fid_3d"] = 2000.0  # spread 1200 > margin
    assert {c["id"]: c for c in claims(vae, noisy, "study")}["xs-t6-layout-vs-boxes"]["holds"] == "inconclusive"
    assert all(c["holds"] == "smoke" for c in claims(vae, diff, "smoke"))


def test_cli_outpaints_with_boxes_and_refuses_bad_box_files(vae_ckpt, tmp_path, capsys, monkeypatch):
    """--boxes conditions each chunk on the boxes whose centre it holds (in voxels, or in metres with
    --voxel-size); malformed box files, boxes for the DiT and a box-less denoiser are refused naming the fix."""
    import json

    import occlab.outpaint
    from occlab.cli import main
    from occlab.data import BOX_FIELDS

    seen = {}
    chunk_cond = occlab.outpaint._chunk_cond

    def spy(denoiser, layout, boxes, x0, y0, *args):
        cond = chunk_cond(denoiser, layout, boxes, x0, y0, *args)
        seen[(x0, y0)] = cond["box_classes"][0].tolist() if "box_classes" in cond else None
        return cond

    monkeypatch.setattr(occlab.outpaint, "_chunk_cond", spy)
    cfg = DiTTrainConfig(steps=2, batch_size=2, diffusion_steps=100, ckpt_every=2)
    train_triplane_diffusion(vae_ckpt, tmp_path / "d", cfg=cfg)
    ckpt = str(tmp_path / "d" / "checkpoint.pt")
    box = np.array([[0, 1, 20.0, 20.0, 2.0, 4.0, 2.0, 2.0, 0.3, 0]], np.float32)  # a car at voxel (20, 20)
    np.save(tmp_path / "boxes.npy", box)
    np.save(tmp_path / "metres.npy", box * np.array([1, 1, .5, .5, .5, .5, .5, .5, 1, 1], np.float32))
    base = ["generate", "--model", "xscene", "--ckpt", ckpt, "--outpaint", "3x3", "--steps", "3", "--seed", "4"]
    holding = {(x, y) for x in (8, 16) for y in (8, 16)}  # 16-voxel chunks every 8 voxels: x0 <= 20 < x0 + 16
    for extra in (["--boxes", str(tmp_path / "boxes.npy")],
                  ["--boxes", str(tmp_path / "metres.npy"), "--voxel-size", "0.5", "0.5", "0.5"]):
        seen.clear()
        assert main([*base, *extra, "--out", str(tmp_path / "boxed.npz")]) == 0
        info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert np.load(tmp_path / "boxed.npz")["labels"].shape == tuple(info["shape"]) == (32, 32, 8)
        assert {c for c, classes in seen.items() if 1 in classes} == holding and len(seen) == 9, seen
    np.save(tmp_path / "bad.npy", box[:, :5])
    assert main([*base, "--boxes", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "x.npz")]) != 0
    assert f"(M, {len(BOX_FIELDS)})" in capsys.readouterr().err
    np.savez(tmp_path / "seq.npz", labels=np.zeros((2, 4, 4, 4), np.uint8))
    assert main([*base, "--boxes", str(tmp_path / "seq.npz"), "--out", str(tmp_path / "x.npz")]) != 0
    assert "no 'boxes' array" in capsys.readouterr().err
    assert main(["generate", "--model", "dit", "--ckpt", ckpt, "--n", "1", "--boxes", str(tmp_path / "boxes.npy"),
                 "--out", str(tmp_path / "y")]) != 0
    assert "--model xscene" in capsys.readouterr().err
    nobox = DiTTrainConfig(steps=2, batch_size=2, diffusion_steps=100, ckpt_every=2)
    dit = config_for_vae(xscene_tiny(TINY, 1, num_classes=11), "tiny", box_cond=False)
    train_triplane_diffusion(vae_ckpt, tmp_path / "n", dit, nobox)
    assert main([*base[:4], str(tmp_path / "n" / "checkpoint.pt"), *base[5:], "--boxes", str(tmp_path / "boxes.npy"),
                 "--out", str(tmp_path / "z.npz")]) != 0
    assert "without the box condition" in capsys.readouterr().err


def test_the_centre_chunk_of_a_seam_map_is_conditioned_like_a_training_frame(tmp_path, monkeypatch):
    """real_region's boxes, corner and voxel size line up: the centre chunk of a 3x3 map (half-chunk overlaps) is
    the data's own centred crop and gets the same layout and box conditions as that training frame."""
    from types import SimpleNamespace

    from occlab.data import make_dataset
    from occlab.models.xscene_diffusion import boxes_condition
    from occlab.outpaint import _chunk_cond, big_shape, chunk_offsets
    from occlab.studies.triplane import real_region
    from occlab.train.triplane_diffusion import window_bounds

    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path / "town"))
    grid = (32, 32, 8)  # the study chunk: wide enough to hold boxes
    data = DataConfig(frames=1, crop=grid, train_sequences=1, val_sequences=8)
    frames = make_dataset(data.dataset, None, "val", **data.source_options("val"))
    denoiser = SimpleNamespace(config=SimpleNamespace(max_boxes=16))
    x0, y0 = chunk_offsets(grid, (3, 3))[(1, 1)]
    checked = 0
    for index in range(len(frames)):
        item, region = frames[index], real_region(data, big_shape(grid, (3, 3)), index)
        cond = _chunk_cond(denoiser, region["layout"], region["boxes"], x0, y0, grid,
                           torch.tensor(region["voxel_size"]), torch.tensor(region["min_bound"]), "cpu")
        corners, classes = boxes_condition(item["boxes"][:1], *window_bounds(data), 16)
        assert torch.equal(cond["layout"][0], item["layout"][0].long())
        assert torch.equal(cond["box_classes"], classes) and torch.allclose(cond["boxes"], corners, atol=1e-5)
        checked += int((classes >= 0).any())
    assert checked  # some frame has a box inside the crop: the comparison is not vacuous
