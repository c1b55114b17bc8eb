"""DynamicCity HexPlane VAE and the plane utilities (tiny configs; the paper size only on the meta device)."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from occlab import planes as P
from occlab.errors import OcclabError
from occlab.models.dynamiccity import (
    RELEASED_PARAMS_CARLASC,
    DynamicCity,
    DynamicCityConfig,
    PlaneConvBlock,
    dynamiccity_paper,
    dynamiccity_tiny,
    model_info,
)

CARLASC, WAYMO = (128, 128, 8), (200, 200, 16)
TINY_GRID, TINY_T = (8, 8, 4), 4



def tiny(**kw) -> DynamicCity:
    torch.manual_seed(0)
    return DynamicCity(dynamiccity_tiny(TINY_GRID, TINY_T, **kw))


def labels(batch=2, T=TINY_T, grid=TINY_GRID, classes=11, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (batch, T, *grid), generator=g)


def structured_sequence(T=TINY_T, grid=TINY_GRID) -> torch.Tensor:
    """One small street: road and sidewalk on the ground, a building, a pole, a vehicle moving along x."""
    X, Y, Z = grid
    seq = torch.zeros(1, T, X, Y, Z, dtype=torch.long)  # free
    seq[..., :, : Y // 2, 0] = 6  # road
    seq[..., :, Y // 2:, 0] = 8  # sidewalk
    seq[..., : X // 2, Y - 2:, 1:] = 1  # building
    seq[..., X - 1, Y // 2, 1:] = 5  # pole
    for t in range(T):
        seq[0, t, t % X: t % X + 2, 1:3, 1] = 10  # vehicle
    noise = torch.rand(seq.shape, generator=torch.Generator().manual_seed(1)) < 0.05
    return torch.where(noise, torch.full_like(seq, 9), seq)  # sparse vegetation


# ---------------------------------------------------------------------------------------------------------
# planes
# ---------------------------------------------------------------------------------------------------------

def test_axis_pairs():
    assert P.axis_pairs("txyz") == ["tx", "ty", "tz", "xy", "xz", "yz"]
    assert P.axis_pairs("xyz") == ["xy", "xz", "yz"]
    with pytest.raises(OcclabError):
        P.axis_pairs("xx")


def random_planes(sizes, axes, B=2, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, C, a, b, generator=g) for n, (a, b) in P.plane_shapes(sizes, axes).items()}


def test_expand_matches_hand_computed_broadcast():
    sizes = {"t": 2, "x": 3, "y": 4, "z": 5}
    p = random_planes(sizes, "txyz")
    tx, ty, tz, xy, xz, yz = (p[n] for n in ["tx", "ty", "tz", "xy", "xz", "yz"])
    want = torch.einsum("bctx,bcty,bctz,bcxy,bcxz,bcyz->bctxyz", tx, ty, tz, xy, xz, yz)
    assert torch.allclose(P.expand(p, "txyz", "hadamard"), want, atol=1e-6)
    want_sum = (tx[:, :, :, :, None, None] + ty[:, :, :, None, :, None] + tz[:, :, :, None, None, :]
                + xy[:, :, None, :, :, None] + xz[:, :, None, :, None, :] + yz[:, :, None, None, :, :])
    assert torch.allclose(P.expand(p, "txyz", "sum"), want_sum, atol=1e-6)
    tri = random_planes({"x": 3, "y": 4, "z": 5}, "xyz")
    want_tri = torch.einsum("bcxy,bcxz,bcyz->bcxyz", tri["xy"], tri["xz"], tri["yz"])
    assert torch.allclose(P.expand(tri, "xyz"), want_tri, atol=1e-6)
    bad = dict(p, tz=torch.randn(2, 3, 2, 6))
    with pytest.raises(OcclabError):
        P.expand(bad, "txyz")


def test_sample_at_voxel_centres_is_expand_and_interpolates():
    sizes = {"t": 2, "x": 3, "y": 4, "z": 5}
    p = random_planes(sizes, "txyz")
    coords = P.voxel_centres(sizes, "txyz")  # (120, 4)
    got = P.sample(p, coords, "txyz", op="hadamard")  # (B, C, N)
    assert torch.allclose(got.reshape(2, 3, 2, 3, 4, 5), P.expand(p, "txyz"), atol=1e-5)
    # a plane with 2 cells along t sampled at the 4 centres of the full axis: bilinear, edges clamped
    plane = {"tx": torch.tensor([[[[0.0], [4.0]]]])}  # (1, 1, t=2, x=1)
    t = P.voxel_centres({"t": 4, "x": 1}, "tx")
    got = P.sample(plane, t, "tx")["tx"].flatten()
    assert torch.allclose(got, torch.tensor([0.0, 1.0, 3.0, 4.0]))


@pytest.mark.parametrize("rates,carlasc,waymo", [
    ((1, 1, 1, 1), 5.78, None),
    ((1, 2, 2, 1), 17.96, 38.42),
    ((2, 2, 2, 2), 23.14, 48.25),
    ((2, 4, 4, 2), 71.86, 153.69),
])
def test_compression_ratio_matches_paper_table4(rates, carlasc, waymo):
    cfg = DynamicCityConfig(frames=16, grid=CARLASC, rates=rates)
    assert cfg.compression_ratio() == pytest.approx(carlasc, abs=0.01)
    dT, dX, dY, dZ = rates
    assert cfg.plane_shapes()["xy"] == (16, 128 // dX, 128 // dY)
    assert cfg.plane_shapes()["tz"] == (16, 16 // dT, 8 // dZ)
    sizes = {"t": 16, "x": 128, "y": 128, "z": 8}
    latent = P.reduce_sizes(sizes, dict(zip("txyz", rates)))
    assert P.compression_ratio(sizes, latent, 16) == pytest.approx(carlasc, abs=0.01)
    if waymo is not None:
        assert DynamicCityConfig(frames=16, grid=WAYMO, rates=rates).compression_ratio() == pytest.approx(
            waymo, abs=0.01)


# ---------------------------------------------------------------------------------------------------------
# model shapes
# ---------------------------------------------------------------------------------------------------------

def check_shapes(model: DynamicCity, B=2):
    cfg = model.config
    out = model(labels(B, cfg.frames, cfg.grid, cfg.num_classes))
    assert out["logits"].shape == (B, cfg.num_classes, cfg.frames, *cfg.grid)
    for name, (C, a, b) in cfg.plane_shapes().items():
        for key in ("planes", "mu", "logvar"):
            assert out[key][name].shape == (B, C, a, b), (key, name)
    assert torch.isfinite(out["logits"]).all()


@pytest.mark.parametrize("encoder,decoder,expansion",
                         list(itertools.product(["projection", "avgpool"], ["ess", "query"], ["hadamard", "sum"])))
def test_shapes_every_variant(encoder, decoder, expansion):
    check_shapes(tiny(encoder=encoder, decoder=decoder, expansion=expansion))


@pytest.mark.parametrize("rates", [(1, 1, 1, 1), (1, 2, 2, 1), (2, 2, 2, 2), (2, 4, 4, 2), (4, 2, 2, 1)])
@pytest.mark.parametrize("decoder", ["ess", "query"])
def test_shapes_rates(rates, decoder):
    check_shapes(tiny(rates=rates, decoder=decoder), B=1)


def test_config_validation():
    with pytest.raises(OcclabError):
        DynamicCityConfig(rates=(3, 2, 2, 2))
    with pytest.raises(OcclabError):
        DynamicCityConfig(encoder="mean")
    with pytest.raises(OcclabError):
        dynamiccity_tiny((8, 8, 4), 4, rates=(4, 4, 4, 4))  # tz would be a single cell
    with pytest.raises(OcclabError):
        tiny()(labels(1, TINY_T, (8, 8, 8)))


# ---------------------------------------------------------------------------------------------------------
# size, init, behaviour
# ---------------------------------------------------------------------------------------------------------

def test_paper_size_parameter_count_matches_released():
    info = model_info(dynamiccity_paper(CARLASC, 16, num_classes=12, rates=(2, 2, 2, 2)))
    assert abs(info["parameters"] - RELEASED_PARAMS_CARLASC) <= 0.15 * RELEASED_PARAMS_CARLASC
    assert info["plane_shapes"] == {"tx": [16, 8, 64], "ty": [16, 8, 64], "tz": [16, 8, 4],
                                    "xy": [16, 64, 64], "xz": [16, 64, 4], "yz": [16, 64, 4]}
    assert info["compression_ratio"] == pytest.approx(23.14, abs=0.01)
    json.dumps(info)  # backs `occlab model info --json`


def test_eval_is_deterministic_and_train_samples():
    model = tiny()
    x = labels()
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a["logits"], b["logits"])
    assert all(torch.equal(a["planes"][n], a["mu"][n]) for n in a["planes"])
    model.train()
    with torch.no_grad():
        c = model(x)
    assert not torch.equal(c["planes"]["xy"], c["mu"]["xy"])


def test_plane_conv_block_is_its_shortcut_at_init():
    block = PlaneConvBlock(4, 8)
    x = torch.randn(2, 4, 5, 6)
    assert torch.equal(block(x), block.shortcut(x))
    model = tiny()
    for block in model.decoder.plane_convs.values():
        assert not block.conv_out.weight.any() and not block.conv_out.bias.any()


def test_positional_encoding_is_a_constant_buffer():
    model = tiny()
    pe = model.decoder.pe.encoding
    assert pe.shape == (24, TINY_T, *TINY_GRID)
    assert not any(k.endswith("pe.encoding") for k in model.state_dict())
    assert pe[0, 1, 0, 0, 0] == pytest.approx(torch.sin(torch.tensor(1.0)).item())  # sin(t = 1), f = 0
    assert pe[7, 0, 0, 0, 2] == pytest.approx(torch.cos(torch.tensor(2.0)).item())  # cos(z = 2), f = 0
    model(labels(1))
    assert model.decoder.pe.encoding is pe  # never rebuilt


def test_gradients_reach_the_embedding_and_every_parameter():
    model = tiny(decoder="ess")
    out = model(labels())
    kl = sum((out["mu"][n] ** 2 + out["logvar"][n].exp() - out["logvar"][n]).mean() for n in out["mu"])
    (F.cross_entropy(out["logits"], labels()) + kl).backward()
    assert model.encoder.embedding.weight.grad.abs().sum() > 0
    # zero-initialised convs block nothing: their own weights get gradients
    assert model.decoder.plane_convs["xy"].conv_out.weight.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_vae_off_is_a_plain_autoencoder():
    out = tiny(vae=False)(labels(1))
    assert out["logvar"] is None and out["mu"] is out["planes"]


@pytest.mark.parametrize("encoder,decoder", [("projection", "ess"), ("avgpool", "query")])
def test_overfits_one_sequence(encoder, decoder):
    torch.manual_seed(0)
    model = tiny(encoder=encoder, decoder=decoder, dropout=0.0, attn_dropout=0.0)
    seq = structured_sequence()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_ce():
        model.eval()
        with torch.no_grad():
            ce = F.cross_entropy(model(seq)["logits"], seq).item()
        model.train()
        return ce

    before = eval_ce()
    for _ in range(30):
        out = model(seq)
        loss = F.cross_entropy(out["logits"], seq)
        loss = loss + 1e-4 * sum((out["mu"][n] ** 2 + out["logvar"][n].exp() - out["logvar"][n] - 1).mean()
                                 for n in out["mu"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_ce()
    assert after < 0.5 * before, (before, after)


def test_first_row_only_transformer_is_exact():
    """The projection module's fast path (last block computes only the query row) equals the full run."""
    from occlab.models.blocks import Transformer

    torch.manual_seed(0)
    net = Transformer(8, depth=2, heads=2, mlp_dim=16).eval()
    x = torch.randn(5, 33, 8, requires_grad=True)
    full = net(x)[:, :1]
    fast = net(x, first_row_only=True)
    assert fast.shape == (5, 1, 8)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    g_full, = torch.autograd.grad(full.square().sum(), x)
    g_fast, = torch.autograd.grad(fast.square().sum(), x)
    torch.testing.assert_close(g_fast, g_full, rtol=1e-5, atol=1e-6)
