"""SEP-4D VAE (tiny configs; the paper size only through model_info and the config arithmetic)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from occlab import planes as P
from occlab.errors import OcclabError
from occlab.models.dynamiccity import dynamiccity_tiny, model_info as dynamiccity_info
from occlab.models.sep4d import (ENCODERS, FUSIONS, PLANES, PRESETS, ConcatFusion, Sep4D, Sep4DConfig, SepFusion,
                                 model_info, sep4d_paper, sep4d_small, sep4d_tiny, spatial_profiles)
from occlab.train.losses import OccupancyLoss

CARLASC = (128, 128, 8)
TINY_GRID, TINY_T = (16, 16, 8), 4


def tiny(**kw) -> Sep4D:
    torch.manual_seed(0)
    return Sep4D(sep4d_tiny(TINY_GRID, TINY_T, **kw))


def labels(batch=2, T=TINY_T, grid=TINY_GRID, classes=11, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (batch, T, *grid), generator=g)


def structured_sequence(T=TINY_T, grid=TINY_GRID) -> torch.Tensor:
    """One small street: road and sidewalk on the ground, a building, a pole, a vehicle moving along x."""
    X, Y, Z = grid
    seq = torch.zeros(1, T, X, Y, Z, dtype=torch.long)  # free
    seq[..., :, : Y // 2, 0] = 6  # road
    seq[..., :, Y // 2:, 0] = 8  # sidewalk
    seq[..., : X // 2, Y - 3:, 1:5] = 1  # building
    seq[..., X - 2, Y // 2, 1:4] = 5  # pole
    for t in range(T):
        seq[0, t, 2 * t: 2 * t + 3, 2:4, 1] = 10  # vehicle
    noise = torch.rand(seq.shape, generator=torch.Generator().manual_seed(1)) < 0.03
    return torch.where(noise & (seq == 0), torch.full_like(seq, 9), seq)  # sparse vegetation


def random_planes(cfg: Sep4DConfig, B=2, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, *s, generator=g) for n, s in cfg.plane_shapes().items()}


# ---------------------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------------------

def check_shapes(model: Sep4D, B=2):
    cfg = model.config
    out = model(labels(B, cfg.frames, cfg.grid, cfg.num_classes))
    assert out["logits"].shape == (B, cfg.num_classes, cfg.frames, *cfg.grid)
    assert out["latent"].shape == (B, *cfg.latent_shape)
    for name, shape in cfg.plane_shapes().items():
        for key in ("planes", "mu", "logvar"):
            assert out[key][name].shape == (B, *shape), (key, name)
    assert set(out["mu"]) == set(cfg.plane_shapes())
    assert torch.isfinite(out["logits"]).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_shapes_every_fusion(fusion):
    check_shapes(tiny(fusion=fusion))


def test_shapes_conv3d_se_encoder():
    model = tiny(encoder="conv3d_se")
    assert model.fusion is None
    check_shapes(model)
    assert list(model.config.plane_shapes()) == ["volume"]


@pytest.mark.parametrize("rates", [(1, 1, 1, 1), (1, 2, 2, 1), (4, 4, 4, 2), (2, 4, 2, 1)])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_shapes_rates(rates, encoder):
    check_shapes(tiny(rates=rates, encoder=encoder), B=1)


def test_latent_layout_is_frames_outer_on_the_last_axis():
    """z (B, C, X', Y', Z'T') holds latent frame t in the slab [t*Z', (t+1)*Z')."""
    model = tiny(fusion="average").eval()
    planes = random_planes(model.config, B=1)
    vol = P.expand(planes, "txyz", op="sum") / 6  # (1, C, T', X', Y', Z')
    z = model.fuse(planes)
    Zr = model.config.latent_sizes["z"]
    for t in range(model.config.latent_sizes["t"]):
        torch.testing.assert_close(z[..., t * Zr:(t + 1) * Zr], vol[:, :, t])


# ---------------------------------------------------------------------------------------------------------
# config arithmetic and validation
# ---------------------------------------------------------------------------------------------------------

def test_compression_ratio_by_hand():
    cfg = sep4d_tiny((16, 16, 8), 4, rates=(2, 2, 2, 2))  # C = 4; latent t 2, x 8, y 8, z 4
    # tx 2*8 + ty 2*8 + tz 2*4 + xy 8*8 + xz 8*4 + yz 8*4 = 168 cells, x 4 channels = 672 floats
    assert cfg.latent_floats() == 672
    assert cfg.compression_ratio() == pytest.approx(4 * 16 * 16 * 8 / 672)  # 12.19
    # the dense latent of the conv3d_se baseline: 4 * 8 * 8 * (4 * 2) = 2048 floats -> 8192 / 2048
    se = sep4d_tiny((16, 16, 8), 4, encoder="conv3d_se")
    assert se.latent_shape == (4, 8, 8, 8) and se.compression_ratio() == pytest.approx(4.0)
    assert sep4d_paper(CARLASC, 16, encoder="conv3d_se").compression_ratio() == pytest.approx(1.0)  # 16 / C
    # the paper preset's planes count like DynamicCity's HexPlane (DESIGN §4: 23.14)
    assert sep4d_paper(CARLASC, 16).compression_ratio() == pytest.approx(23.14, abs=0.01)


@pytest.mark.parametrize("field,kw", [
    ("fusion", {"fusion": "mlp"}),
    ("encoder", {"encoder": "conv3d"}),
    ("rates", {"rates": (3, 2, 2, 2)}),
    ("rates", {"rates": (2, 2, 2)}),
    ("rates", {"frames": 3}),  # dT = 2 does not divide T = 3
    ("rates", {"grid": (16, 16, 6), "rates": (1, 1, 1, 4)}),
    ("widths", {"widths": (16, 8)}),
    ("num_classes", {"num_classes": 1}),
    ("latent_channels", {"latent_channels": 0}),
    ("grid", {"grid": (16, 16)}),
])
def test_bad_config_names_the_field(field, kw):
    kw = dict(kw)
    args = {"geometry_grid": kw.pop("grid", TINY_GRID), "frames": kw.pop("frames", TINY_T)}
    with pytest.raises(OcclabError, match=field):
        sep4d_tiny(**args, **kw)


def test_single_cell_frame_is_rejected():
    with pytest.raises(OcclabError, match="rates"):
        sep4d_tiny((4, 4, 1), 4, rates=(1, 4, 4, 1))


def test_wrong_input_shape_is_an_occlab_error():
    with pytest.raises(OcclabError, match="expects labels"):
        tiny()(labels(1, TINY_T, (16, 16, 4)))


def test_presets_and_model_info():
    assert set(PRESETS) == {"paper", "small", "tiny"}
    assert PRESETS["small"]().grid == (32, 32, 8) and PRESETS["small"]().frames == 8
    assert PRESETS["tiny"]().grid == (16, 16, 8) and PRESETS["tiny"]().frames == 4
    info = model_info(sep4d_tiny(TINY_GRID, TINY_T))
    assert set(info) == set(dynamiccity_info(dynamiccity_tiny()))
    assert info["model"] == "sep4d"
    assert info["parameters"] == sum(info["parameters_by_part"].values())
    assert info["plane_shapes"]["tz"] == [4, 2, 4] and info["plane_shapes"]["xy"] == [4, 8, 8]
    assert info["latent_floats"] == 672
    json.dumps(info)  # backs `occlab model info --json`
    assert Sep4DConfig(**json.loads(json.dumps(info["config"]))) == sep4d_tiny(TINY_GRID, TINY_T)  # round trip


def test_paper_preset_size():
    """The paper preset is sized to DynamicCity's compute (module docstring): about 1.0 M parameters."""
    info = model_info(sep4d_paper(CARLASC, 16))
    assert info["parameters"] == 1_041_355
    assert info["plane_shapes"]["xy"] == [16, 64, 64] and info["plane_shapes"]["tz"] == [16, 8, 4]
    assert 0.2e6 < model_info(sep4d_small())["parameters"] < 0.4e6


# ---------------------------------------------------------------------------------------------------------
# init, exactness, determinism
# ---------------------------------------------------------------------------------------------------------

def test_eval_is_deterministic_and_train_samples():
    model = tiny()
    x = labels()
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        dec = model.decode(model.encode(x)["latent"])
    assert torch.equal(a["logits"], b["logits"])
    torch.testing.assert_close(dec, a["logits"])
    assert all(torch.equal(a["planes"][n], a["mu"][n]) for n in PLANES)
    model.train()
    with torch.no_grad():
        c = model(x)
    assert not torch.equal(c["planes"]["xy"], c["mu"]["xy"])


def test_same_seed_same_model():
    a, b = tiny(), tiny()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_zero_init_components():
    """PF starts as average pooling, decoder residual blocks as the identity, dynamic weighting as averaging."""
    model = tiny()
    for level in model.decoder.levels:
        for block in level:
            x = torch.randn(2, block.conv_out.in_channels, 4, 4, 2)
            assert torch.equal(block(x), x)
    vol = torch.randn(2, 8, TINY_T, 8, 8, 4)  # (B, Ce, T, X', Y', Z')
    planes = model.encoder.factorize(vol)
    torch.testing.assert_close(planes["xy"], vol.mean(dim=(2, 5)))
    torch.testing.assert_close(planes["tz"], vol.mean(dim=(3, 4)))
    dyn, avg = tiny(fusion="dynamic"), tiny(fusion="average")
    p = random_planes(dyn.config)
    torch.testing.assert_close(dyn.fuse(p), avg.fuse(p))


def test_sep_fusion_matches_the_naive_mlp_at_init():
    """At init phi = psi = 1, so g_theta = MLP([xy + xz + yz ; tx + ty + tz]) on the explicit 4D concatenation;
    the split first layer (W_t applied on the planes) must give exactly that."""
    model = tiny()
    fusion: SepFusion = model.fusion
    p = random_planes(model.config)
    s = P.expand({n: p[n] for n in ("xy", "xz", "yz")}, "xyz", op="sum")  # (B, C, X', Y', Z')
    t = P.expand({**{n: p[n] for n in ("tx", "ty", "tz")},
                  **{n: torch.zeros_like(p[n]) for n in ("xy", "xz", "yz")}}, "txyz", op="sum")  # (B, C, T', ...)
    cat = torch.cat([s[:, :, None].expand_as(t), t], dim=1)  # (B, 2C, T', X', Y', Z')
    first = nn.Linear(cat.shape[1], fusion.fc_spatial.out_features)
    with torch.no_grad():
        first.weight.copy_(torch.cat([fusion.fc_spatial.weight, fusion.fc_temporal.weight], dim=1))
        first.bias.copy_(fusion.fc_spatial.bias)
    want = fusion.fc_out(F.gelu(first(cat.movedim(1, -1)))).movedim(-1, 1)  # (B, C, T', X', Y', Z')
    torch.testing.assert_close(fusion(p), want, rtol=1e-5, atol=1e-5)


def test_sep_fusion_weights_are_geometry_aware_attention():
    """phi_k is a softmax over the plane's missing axis (mean 1); psi_k gates depend on the spatial profile."""
    model = tiny()
    fusion: SepFusion = model.fusion
    with torch.no_grad():
        for m in [*fusion.phi.values(), *fusion.psi.values()]:
            m.weight.normal_()
    p = random_planes(model.config)
    g = spatial_profiles(p)
    phi = fusion.phi["xy"](g["z"].movedim(1, -1)).movedim(-1, 1).softmax(-1) * g["z"].shape[-1]
    torch.testing.assert_close(phi.mean(-1), torch.ones_like(phi[..., 0]))
    want = torch.einsum("bcxy,bcz->bcxyz", p["xy"], phi)
    got = fusion.spatial({"xy": p["xy"], "xz": torch.zeros_like(p["xz"]), "yz": torch.zeros_like(p["yz"])}, g)
    torch.testing.assert_close(got, want)
    q = fusion.temporal(p, g)
    g2 = {**g, "x": g["x"] + 1.0}  # another spatial structure along x changes the tx gate only
    q2 = fusion.temporal(p, g2)
    assert not torch.allclose(q["tx"], q2["tx"]) and torch.equal(q["ty"], q2["ty"])


def test_concat_fusion_is_a_linear_on_the_concatenation():
    model = tiny(fusion="concat")
    fusion: ConcatFusion = model.fusion
    with torch.no_grad():
        fusion.bias.normal_()
    p = random_planes(model.config)
    sizes = P.sizes_of(p)
    views = [rearrange(P.expand({m: p[m] if m == n else torch.zeros_like(p[m]) for m in PLANES}, "txyz", "sum"),
                       "b c t x y z -> b t x y z c") for n in PLANES]  # each plane broadcast alone
    weight = torch.cat([fusion.proj[n].weight for n in PLANES], dim=1)  # (C, 6C)
    want = F.linear(torch.cat(views, dim=-1), weight, fusion.bias).movedim(-1, 1)
    assert want.shape[2:] == tuple(sizes.values())
    torch.testing.assert_close(fusion(p), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# training behaviour
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder,fusion", [("planar", "sep"), ("conv3d_se", "sep")])
def test_gradients_reach_every_parameter(encoder, fusion):
    model = tiny(encoder=encoder, fusion=fusion)
    x = labels()
    OccupancyLoss()(model(x), x)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    # zero-initialised layers block nothing: their own weights get gradients from the first step
    zero_init = [block.conv_out.weight for level in model.decoder.levels for block in level]
    if encoder == "planar":
        zero_init += [m.weight for m in model.encoder.factorize.score.values()]
        zero_init += [m.weight for m in [*model.fusion.phi.values(), *model.fusion.psi.values()]]
    assert all(w.grad.abs().sum() > 0 for w in zero_init)
    assert model.encoder.frames.embedding.weight.grad.abs().sum() > 0


def test_vae_off_is_a_plain_autoencoder():
    model = tiny(vae=False)
    x = labels(1)
    out = model(x)
    assert out["mu"] is None and out["logvar"] is None
    assert out["logits"].shape == (1, 11, TINY_T, *TINY_GRID)
    assert "kl" not in OccupancyLoss()(out, x)
    assert tiny(vae=False, encoder="conv3d_se")(x)["mu"] is None


def test_training_lowers_the_loss():
    """30 Adam steps on one fixed window with the shared OccupancyLoss (CE + Lovasz + KL 0.005); a half-size
    window (16x16x4, T = 2) keeps the test near 1.5 s (3.5 -> 1.1 measured)."""
    grid, T = (16, 16, 4), 2
    torch.manual_seed(0)
    model = Sep4D(sep4d_tiny(grid, T))
    seq = structured_sequence(T, grid)
    loss_fn = OccupancyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            value = loss_fn(model(seq), seq)["loss"].item()
        model.train()
        return value

    before = eval_loss()
    for _ in range(30):
        loss = loss_fn(model(seq), seq)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
