"""X-Scene triplane VAE (tiny configs; the paper size only through its config and parameter count)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from occlab import planes as P
from occlab.classes import FREE, IGNORE
from occlab.errors import OcclabError
from occlab.models.xscene import (
    PRESETS,
    RELEASED_PARAMS_OCC3D,
    XSceneVAE,
    XSceneVAEConfig,
    model_info,
    sample_queries,
    sincos_encoding,
    xscene_paper,
    xscene_tiny,
)
from occlab.train.losses import OccupancyLoss

OCC3D = (200, 200, 16)
TINY = (16, 16, 8)
CLASSES = 12



def tiny(**kw) -> XSceneVAE:
    torch.manual_seed(0)
    return XSceneVAE(xscene_tiny(TINY, num_classes=CLASSES, **kw))


def scene(grid=TINY) -> torch.Tensor:
    """One small street (1, X, Y, Z): road and sidewalk on the ground, a building, a pole, a vehicle, some trees."""
    X, Y, Z = grid
    s = torch.zeros(1, X, Y, Z, dtype=torch.long)  # free
    s[0, :, : Y // 2, 0] = 6  # road
    s[0, :, Y // 2:, 0] = 8  # sidewalk
    s[0, : X // 2, Y - 3:, 1:5] = 1  # building
    s[0, X - 2, Y // 2, 1:4] = 5  # pole
    s[0, 3:7, 2:4, 1:3] = 10  # vehicle
    trees = torch.rand(s.shape, generator=torch.Generator().manual_seed(1)) < 0.02
    return torch.where(trees & (s == 0), torch.full_like(s, 9), s)


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------

def test_plane_shapes_at_occ3d_for_both_rates():
    assert xscene_paper(OCC3D).plane_shapes() == {"xy": (16, 100, 100), "xz": (16, 100, 16), "yz": (16, 100, 16)}
    assert xscene_paper(OCC3D, downsample=4).plane_shapes() == {"xy": (16, 50, 50), "xz": (16, 50, 16),
                                                               "yz": (16, 50, 16)}
    assert list(xscene_paper().plane_shapes()) == P.axis_pairs("xyz")


def test_compression_ratio_hand_computed():
    # 200*200*16 voxels over 16 * (100*100 + 100*16 + 100*16) floats, and with 50x50x16 planes
    assert xscene_paper(OCC3D).compression_ratio() == pytest.approx(640_000 / 211_200)
    assert xscene_paper(OCC3D, downsample=4).compression_ratio() == pytest.approx(640_000 / 65_600)
    assert xscene_tiny(TINY).compression_ratio() == pytest.approx(16 * 16 * 8 / (4 * (8 * 8 + 8 * 8 + 8 * 8)))


@pytest.mark.parametrize("field,value", [("downsample", 3), ("decoder", "nearest"), ("num_classes", 1),
                                         ("points", 0), ("mlp_layers", 3), ("latent_channels", 0), ("chunk", 0),
                                         ("query_near", 0.5), ("grid", (2, 2))])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(OcclabError, match=field):
        XSceneVAEConfig(**{"grid": TINY, field: value})


def test_bad_grid_errors():
    with pytest.raises(OcclabError, match="divisible by downsample"):
        xscene_tiny((18, 16, 8), downsample=4)
    with pytest.raises(OcclabError, match="single cell"):
        xscene_tiny((2, 2, 1))


def test_paper_size_parameter_count_matches_released():
    info = model_info(xscene_paper(OCC3D, vae=False))
    assert info["parameters"] == RELEASED_PARAMS_OCC3D
    assert info["model"] == "xscene" and info["input_shape"] == list(OCC3D)
    assert info["plane_shapes"] == {"xy": [16, 100, 100], "xz": [16, 100, 16], "yz": [16, 100, 16]}
    assert info["latent_floats"] == 211_200
    assert sum(info["parameters_by_part"].values()) == info["parameters"]
    json.dumps(info)
    assert set(PRESETS) == {"paper", "small", "tiny"}


# ---------------------------------------------------------------------------------------------------------
# shapes, decoding
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["deformable", "bilinear"])
@pytest.mark.parametrize("downsample", [2, 4])
def test_output_shapes_with_and_without_queries(decoder, downsample):
    model = tiny(decoder=decoder, downsample=downsample).eval()
    x = torch.randint(0, CLASSES, (2, *TINY))
    with torch.no_grad():
        full = model(x)
        pts = model(x, torch.rand(2, 37, 3) * 2 - 1)
        shared = model(x, torch.rand(37, 3) * 2 - 1)
    assert full["logits"].shape == (2, CLASSES, *TINY)
    assert pts["logits"].shape == shared["logits"].shape == (2, CLASSES, 37)
    d = downsample
    assert {n: tuple(p.shape) for n, p in full["planes"].items()} == {
        "xy": (2, 4, 16 // d, 16 // d), "xz": (2, 4, 16 // d, 8), "yz": (2, 4, 16 // d, 8)}
    assert set(full["mu"]) == set(full["logvar"]) == set(P.axis_pairs("xyz"))


def test_full_grid_is_the_decoder_at_every_voxel_centre():
    model = tiny().eval()
    x = scene()
    with torch.no_grad():
        planes = model.encode(x)["planes"]
        full = model.decode(planes)
        pts = model.decode(planes, P.voxel_centres(dict(zip("xyz", TINY)), "xyz"))
    assert torch.allclose(full.flatten(2), pts, atol=1e-6)


def test_chunked_full_grid_decoding_equals_unchunked():
    model = tiny().eval()
    x = torch.randint(0, CLASSES, (2, *TINY))
    with torch.no_grad():
        planes = model.encode(x)["planes"]
        model.config.chunk = 16 * 16 * 8  # one chunk
        whole = model.decode(planes)
        model.config.chunk = 300  # 7 chunks, the last one short
        chunked = model.decode(planes)
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_positional_encoding_is_36_channels_in_released_order():
    q = torch.tensor([[0.5, -0.25, 1.0]])
    pe = sincos_encoding(q, 6)
    assert pe.shape == (1, 36)
    assert pe[0, 1].item() == pytest.approx(torch.sin(torch.tensor(-0.25)).item())  # sin(y), f = 0
    assert pe[0, 5].item() == pytest.approx(torch.cos(torch.tensor(1.0)).item())  # cos(z), f = 0
    assert pe[0, 6].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())  # sin(2 x), f = 1
    assert xscene_paper().pe_channels == 36


# ---------------------------------------------------------------------------------------------------------
# deformable attention
# ---------------------------------------------------------------------------------------------------------

def test_offsets_zero_at_init_so_deformable_sampling_is_the_reference_sample():
    model = tiny()
    sampler = model.decoder.sampler
    assert all(not l.weight.any() and not l.bias.any() for l in sampler.offsets.values())
    with torch.no_grad():  # any attention weights: K identical samples average to the reference sample
        for layer in sampler.weights.values():
            layer.weight.normal_()
            layer.bias.normal_()
    planes = {n: torch.randn(2, 16, *ab) for n, ab in P.plane_shapes({"x": 8, "y": 8, "z": 8}, "xyz").items()}
    coords = torch.rand(2, 50, 3) * 2 - 1
    pe = sincos_encoding(coords, model.config.pe_freqs)
    deform = sampler(planes, coords, pe)  # (B, N, W)
    reference = P.sample(planes, coords, "xyz", op="sum").transpose(1, 2)  # (B, N, W)
    assert torch.allclose(deform, reference, atol=1e-5)


def test_bilinear_ablation_differs_only_in_sampling():
    deform, bilinear = tiny(decoder="deformable").eval(), tiny(decoder="bilinear").eval()
    missing, unexpected = bilinear.load_state_dict(deform.state_dict(), strict=False)
    assert not missing and all(k.startswith("decoder.sampler.") for k in unexpected)
    x = scene()
    with torch.no_grad():
        assert torch.allclose(deform(x)["logits"], bilinear(x)["logits"], atol=1e-5)  # offsets zero at init


def test_offsets_learn():
    model = tiny()
    coords, targets = model.sample_queries(scene(), torch.Generator().manual_seed(0))
    F.cross_entropy(model(scene(), coords)["logits"], targets).backward()
    assert all(l.weight.grad.abs().sum() > 0 for l in model.decoder.sampler.offsets.values())
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


# ---------------------------------------------------------------------------------------------------------
# query sampling
# ---------------------------------------------------------------------------------------------------------

def voxel_index(coords: torch.Tensor, grid=TINY) -> torch.Tensor:
    """Normalised voxel centres (..., 3) -> flat C-order voxel indices (...)."""
    sizes = torch.tensor(grid)
    ijk = ((coords + 1) * sizes / 2 - 0.5).round().long()
    return (ijk[..., 0] * grid[1] + ijk[..., 1]) * grid[2] + ijk[..., 2]


def test_sample_queries_takes_every_occupied_voxel_then_near_then_far_free():
    x = torch.cat([scene(), torch.zeros(1, *TINY, dtype=torch.long)])
    x[1, 5, 5, 3] = 4  # second scene: one pedestrian voxel
    coords, targets = sample_queries(x, torch.Generator().manual_seed(0), num_points=600)  # 405 occupied in scene 1
    assert coords.shape == (2, 600, 3) and targets.shape == (2, 600)
    idx = voxel_index(coords)
    for b in range(2):
        assert len(set(idx[b].tolist())) == 600  # no voxel twice
        assert torch.equal(targets[b], x[b].flatten()[idx[b]])  # targets are the labels at the coords
        occupied = set((x[b].flatten() != FREE).nonzero().flatten().tolist())
        assert occupied <= set(idx[b].tolist())
        n_occ = len(occupied)
        assert (targets[b, :n_occ] != FREE).all() and (targets[b, n_occ:] == FREE).all()  # occupied first
    # scene 2: the 32 free voxels within distance 2 of the pedestrian come right after it
    ijk = torch.stack(torch.meshgrid(*[torch.arange(n) for n in TINY], indexing="ij"), -1).reshape(-1, 3)
    near = set(((ijk - torch.tensor([5, 5, 3])) ** 2).sum(-1).le(4).nonzero().flatten().tolist())
    near -= set(voxel_index(P.voxel_centres(dict(zip("xyz", TINY)), "xyz")[x[1].flatten() != FREE]).tolist())
    assert len(near) == 32 and set(idx[1, 1:33].tolist()) == near


def test_sample_queries_is_deterministic_given_the_generator():
    x = scene()
    a = sample_queries(x, torch.Generator().manual_seed(3), num_points=500)
    b = sample_queries(x, torch.Generator().manual_seed(3), num_points=500)
    c = sample_queries(x, torch.Generator().manual_seed(4), num_points=500)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_sample_queries_small_grid_is_queried_whole_and_ignore_comes_last():
    x = scene()
    x[0, 0, 0, 7] = IGNORE
    coords, targets = sample_queries(x, torch.Generator().manual_seed(0), num_points=10 ** 6)
    assert coords.shape == (1, 16 * 16 * 8, 3)
    assert sorted(voxel_index(coords)[0].tolist()) == list(range(16 * 16 * 8))
    assert targets[0, -1] == IGNORE
    out = tiny()(x, coords)  # the encoder reads IGNORE as free; the loss skips it
    assert torch.isfinite(F.cross_entropy(out["logits"], targets, ignore_index=IGNORE))


# ---------------------------------------------------------------------------------------------------------
# VAE, training
# ---------------------------------------------------------------------------------------------------------

def test_eval_is_deterministic_and_train_samples():
    model = tiny()
    x = scene()
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a["logits"], b["logits"])
    assert all(torch.equal(a["planes"][n], a["mu"][n]) for n in a["planes"])
    model.train()
    with torch.no_grad():
        c = model(x)
    assert not torch.equal(c["planes"]["xy"], c["mu"]["xy"])


def test_shared_loss_with_and_without_vae():
    coords, targets = sample_queries(scene(), torch.Generator().manual_seed(0), num_points=256)
    loss = OccupancyLoss(kl=0.01)
    with_vae = loss(tiny()(scene(), coords), targets)
    assert {"ce", "lovasz", "kl", "loss"} <= set(with_vae) and torch.isfinite(with_vae["loss"])
    out = tiny(vae=False)(scene(), coords)
    assert out["mu"] is None and out["logvar"] is None
    assert all(p.abs().max() < 1 for p in out["planes"].values())  # tanh-bounded latent
    assert "kl" not in loss(out, targets)


@pytest.mark.parametrize("decoder", ["deformable", "bilinear"])
def test_short_training_run_lowers_the_loss(decoder):
    model = tiny(decoder=decoder)
    x = scene()
    coords, targets = model.sample_queries(x, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_ce():
        model.eval()
        with torch.no_grad():
            ce = F.cross_entropy(model(x, coords)["logits"], targets).item()
        model.train()
        return ce

    before = eval_ce()
    for _ in range(30):
        out = model(x, coords)
        loss = F.cross_entropy(out["logits"], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_ce()
    assert after < 0.5 * before, (before, after)


# ---------------------------------------------------------------------------------------------------------
# windows (B, T, X, Y, Z): the shared trainer's path
# ---------------------------------------------------------------------------------------------------------

def test_static_window_eval_decodes_the_whole_grid_as_the_trainer_compares():
    model = tiny().eval()
    x = scene()
    with torch.no_grad():
        five = model(x[:, None])  # (B, 1, X, Y, Z)
        four = model(x)
    assert five["logits"].shape == (1, CLASSES, 1, *TINY)
    assert torch.allclose(five["logits"][:, :, 0], four["logits"], atol=1e-6)
    assert five["logits"].argmax(1).shape == x[:, None].shape  # what `evaluate` compares with the labels
    assert "targets" not in five


def test_static_window_training_samples_queries_from_the_global_rng():
    model = tiny()
    x = torch.cat([scene(), scene().flip(1)])[:, None]  # (2, 1, X, Y, Z)
    torch.manual_seed(5)
    a = model(x)
    torch.manual_seed(5)
    b = model(x)
    n = model.config.query_points
    assert a["logits"].shape == (2, CLASSES, n) and a["targets"].shape == (2, n)
    assert torch.equal(a["targets"], b["targets"]) and torch.allclose(a["logits"], b["logits"])
    # the same points as sample_queries drawn from the same global RNG state, scored at those points
    torch.manual_seed(5)
    coords, targets = sample_queries(x[:, 0], None, n, model.config.query_near)
    four = model(x[:, 0], coords)  # the Gaussian head draws next, as inside the window call
    assert torch.equal(a["targets"], targets) and torch.allclose(a["logits"], four["logits"], atol=1e-6)
    occupied = int((x[0] != FREE).sum())
    assert (a["targets"][0, :occupied] != FREE).all()  # every occupied voxel first, as the released loader
    parts = OccupancyLoss(kl=0.005)(a, x)  # the trainer passes the labels; the model's targets are used
    assert torch.isfinite(parts["loss"]) and {"ce", "lovasz", "kl"} <= set(parts)
    parts["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_windows_of_several_frames_are_static_scenes_folded_into_the_batch():
    model = tiny().eval()
    x = torch.stack([scene()[0], scene()[0].flip(0), scene()[0].flip(1)])[None]  # (1, 3, X, Y, Z)
    with torch.no_grad():
        win = model(x)["logits"]  # (1, K, 3, X, Y, Z)
        per_frame = torch.stack([model(x[:, t])["logits"] for t in range(3)], dim=2)
        coords = torch.rand(20, 3) * 2 - 1
        pts = model(x, coords)
    assert win.shape == (1, CLASSES, 3, *TINY)
    assert torch.allclose(win, per_frame, atol=1e-5)
    assert pts["logits"].shape == (1, CLASSES, 60) and pts["planes"]["xy"].shape[0] == 3
    model.train()
    out = model(x)
    assert out["logits"].shape == (1, CLASSES, 3 * model.config.query_points)
    assert out["targets"].shape == (1, 3 * model.config.query_points)
    with pytest.raises(OcclabError, match="windows"):
        model(torch.zeros(1, 1, 8, 8, 8, dtype=torch.long))


def test_presets_take_the_registry_signature():
    for factory in PRESETS.values():
        cfg = factory(TINY, 1, num_classes=CLASSES)
        assert cfg.grid == TINY and cfg.num_classes == CLASSES
    with pytest.raises(OcclabError, match="frames"):
        xscene_tiny(TINY, 0)


def test_shared_trainer_trains_the_triplane_vae_on_static_town_windows(tmp_path, tmp_path_factory, monkeypatch):
    import csv
    from dataclasses import asdict

    from occlab.train.config import DataConfig, TrainConfig
    from occlab.train.trainer import train

    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path_factory.getbasetemp() / "town"))
    cfg = xscene_tiny(TINY, 1, num_classes=11)
    data = DataConfig(frames=1, crop=TINY, train_sequences=2, val_sequences=1)
    torch.manual_seed(0)
    res = train(XSceneVAE(cfg), {"name": "xscene", "config": asdict(cfg)}, data,
                TrainConfig(steps=60, ckpt_every=30), tmp_path, num_classes=11, progress=False)
    with open(tmp_path / "log.csv") as f:
        loss = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(loss) == 60 and res.metrics["steps"] == 60
    first, last = sum(loss[:6]) / 6, sum(loss[-6:]) / 6  # both windows of the two-scene split alternate
    assert last < 0.5 * first, (first, last)
    assert 0 <= res.metrics["val"]["miou"] <= 1 and res.metrics["val"]["iou"] > 0
