"""OccSora VQ-VAE tokenizer: shapes, quantiser, codebook statistics, sizes, config errors, a short training run."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from occlab.errors import OcclabError
from occlab.models.blocks import count_parameters
from occlab.models.occsora import (PRESETS, RELEASED_PARAMS_NUSCENES, OccSora, OccSoraConfig, VectorQuantizer,
                                   codebook_usage, model_info, occsora_paper, occsora_small,
                                   occsora_tiny)
from occlab.train.losses import OccupancyLoss

TINY_GRID, TINY_T = (16, 16, 8), 4


def tiny(**kw) -> OccSora:
    torch.manual_seed(0)
    return OccSora(occsora_tiny(TINY_GRID, TINY_T, **kw))


def labels(batch=2, T=TINY_T, grid=TINY_GRID, classes=11, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (batch, T, *grid), generator=g)


def street(T=TINY_T, grid=TINY_GRID) -> torch.Tensor:
    """One small street: road and sidewalk on the ground, a building, a pole, a vehicle moving along x."""
    X, Y, Z = grid
    seq = torch.zeros(1, T, X, Y, Z, dtype=torch.long)
    seq[..., :, : Y // 2, 0] = 6  # road
    seq[..., :, Y // 2:, 0] = 8  # sidewalk
    seq[..., : X // 2, Y - 3:, 1:5] = 1  # building
    seq[..., X - 2, Y // 2, 1:6] = 5  # pole
    for t in range(T):
        seq[0, t, 2 * t: 2 * t + 4, 2:5, 1:3] = 10  # vehicle
    return seq


# ---------------------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"downsample": (4, 2, 1)}, {"downsample": (1, 8, 8)}, {"norm": "group"},
                                {"kernel_size": 3}])
def test_shapes(kw):
    model = tiny(**kw)
    cfg = model.config
    T_, X_, Y_ = cfg.latent_sizes.values()
    out = model(labels())
    assert out["logits"].shape == (2, cfg.num_classes, TINY_T, *TINY_GRID)
    assert out["indices"].shape == (2, T_, X_, Y_) and out["indices"].dtype == torch.long
    assert out["latent"].shape == (2, cfg.code_dim, T_, X_, Y_) == (2, *cfg.latent_shape)
    assert out["vq_loss"].dim() == 0 and out["perplexity"].dim() == 0
    assert 1.0 <= float(out["perplexity"]) <= cfg.codebook_size
    assert torch.isfinite(out["logits"]).all()


def test_encode_decode_paths_agree():
    model = tiny().eval()
    x = labels()
    with torch.no_grad():
        out = model(x)
        enc = model.encode(x)
        assert torch.equal(enc["indices"], out["indices"])
        assert torch.allclose(model.decode(enc["latent"]), out["logits"], atol=1e-5)
        assert torch.allclose(model.decode_indices(enc["indices"]), out["logits"], atol=1e-5)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(OcclabError, match="expects labels"):
        tiny()(labels(T=TINY_T + 1))


def test_runs_under_bf16_autocast_with_fp32_codes():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(labels(batch=1))
    assert out["latent"].dtype == torch.float32 and torch.isfinite(out["logits"].float()).all()


# ---------------------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------------------

def test_compression_ratio_by_hand():
    nus = occsora_paper()  # 200x200x16, T = 32, rates 8, D 128
    assert nus.latent_shape == (128, 4, 25, 25) and nus.tokens == 2500
    assert nus.compression_ratio() == pytest.approx(32 * 200 * 200 * 16 / (128 * 4 * 25 * 25)) == 64.0
    assert nus.compression_ratio_tokens() == 8192.0
    carla = occsora_paper((128, 128, 8), 16)
    assert carla.latent_shape == (128, 2, 16, 16)
    assert carla.compression_ratio() == 16 * 128 * 128 * 8 / (128 * 2 * 16 * 16) == 32.0
    small = occsora_small()  # 32x32x8, T = 8, rates 4, 8, 8: 65536 voxels / (2*4*4 tokens x 128 floats)
    assert small.latent_shape == (128, 2, 4, 4) and small.compression_ratio() == 16.0
    assert small.compression_ratio_tokens() == 2048.0


def test_paper_size_matches_released_tokenizer():
    model = OccSora(occsora_paper(num_classes=18))  # the released 18 nuScenes-occupancy labels
    assert count_parameters(model) == RELEASED_PARAMS_NUSCENES == 137_369_744
    assert count_parameters(model.quantizer) == 512 * 128


def test_model_info_and_presets():
    info = model_info(occsora_tiny(TINY_GRID, TINY_T))
    assert info["model"] == "occsora"
    assert info["parameters"] == sum(info["parameters_by_part"].values())
    assert set(info["parameters_by_part"]) == {"embedding", "encoder", "quantizer", "decoder"}
    assert info["input_shape"] == [TINY_T, *TINY_GRID]
    assert info["latent_shape"] == [16, 2, 4, 4] and info["latent_floats"] == 16 * 32
    assert info["compression_ratio"] == pytest.approx(4 * 16 * 16 * 8 / 512)
    cfg = OccSoraConfig(**json.loads(json.dumps(info["config"])))  # the run cache's JSON round trip
    assert cfg == occsora_tiny(TINY_GRID, TINY_T)
    assert set(PRESETS) == {"paper", "small", "tiny"}
    for make in PRESETS.values():
        assert make((32, 32, 8), 8).grid == (32, 32, 8)


def test_config_validation():
    for kw, field in [({"downsample": (3, 2, 2)}, "downsample"), ({"downsample": (1, 1, 1)}, "downsample"),
                      ({"downsample": (8, 8, 8)}, "downsample"),  # T = 4 is not divisible by 8
                      ({"downsample": (4, 16, 16)}, "downsample"),  # a single latent cell
                      ({"norm": "layer"}, "norm"), ({"hidden": 33}, "hidden"), ({"beta": -1.0}, "beta"),
                      ({"codebook_size": 1}, "codebook_size"), ({"code_dim": 0}, "code_dim"),
                      ({"num_classes": 1}, "num_classes"), ({"restart_decay": 1.0}, "restart_decay"),
                      ({"kernel_size": 1}, "kernel_size")]:
        with pytest.raises(OcclabError, match=field):
            occsora_tiny(TINY_GRID, TINY_T, **kw)
    with pytest.raises(OcclabError, match="grid"):
        OccSoraConfig(grid=(16, 16))


# ---------------------------------------------------------------------------------------------------------
# quantiser
# ---------------------------------------------------------------------------------------------------------

def test_quantizer_picks_nearest_code_and_its_loss():
    vq = VectorQuantizer(codebook_size=4, code_dim=2, beta=0.25)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    points = torch.tensor([[0.1, -0.1], [0.9, 0.2], [0.2, 0.8], [4.0, 6.0], [0.6, 0.0], [3.5, 3.0]])
    want = torch.tensor([0, 1, 2, 3, 1, 3])
    z = points.t().reshape(1, 2, 1, 2, 3)  # (B, D, T', X', Y') holding the six points in (t, x, y) order
    out = vq(z)
    assert torch.equal(out["indices"].flatten(), want)
    codes = vq.codebook.weight[want]
    assert torch.allclose(out["latent"].reshape(2, 6).t(), codes)
    mse = F.mse_loss(points, codes)
    assert torch.allclose(out["vq_loss"], (1 + 0.25) * mse)  # codebook + beta * commitment, equal in value
    assert float(out["perplexity"]) == pytest.approx(codebook_usage(want, 4)["perplexity"])


def test_straight_through_gradient_reaches_the_encoder():
    model = tiny()
    out = model(labels(batch=1))
    F.cross_entropy(out["logits"], labels(batch=1)).backward()  # reconstruction loss only, no VQ term
    for p in (model.encoder.downs[0].conv.weight, model.embedding.weight, model.decoder.ups[-1].convt.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.quantizer.codebook.weight.grad is None  # the codebook learns from the VQ loss alone
    model.zero_grad()
    model(labels(batch=1))["vq_loss"].backward()
    assert model.quantizer.codebook.weight.grad.abs().sum() > 0
    assert model.encoder.downs[0].conv.weight.grad.abs().sum() > 0  # commitment


def test_codebook_usage_known_values():
    idx = torch.tensor([0, 1, 2, 3] * 5)  # uniform use of 4 of 8 codes
    assert codebook_usage(idx, 8) == {"perplexity": pytest.approx(4.0), "dead_codes": 4, "used": 4}
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 8) == {"perplexity": pytest.approx(1.0),
                                                                     "dead_codes": 7, "used": 1}
    assert codebook_usage(torch.arange(8).reshape(2, 2, 2), 8)["perplexity"] == pytest.approx(8.0)


def test_dead_code_restart_reseeds_idle_codes_in_training_only():
    vq = VectorQuantizer(codebook_size=8, code_dim=3, dead_code_restart=True, restart_threshold=0.5)
    with torch.no_grad():
        vq.codebook.weight[:4] = 1e3  # codes 0..3 far from every input: never chosen
        vq.usage[:4] = 0.0  # and idle
    z = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    before = vq.codebook.weight.detach().clone()
    vq.eval()(z)
    assert torch.equal(vq.codebook.weight, before)  # eval: nothing changes
    out = vq.train()(z)
    assert (out["indices"] >= 4).all()  # this step was quantised with the old codebook
    rows = z.detach().reshape(3, -1).t()  # (8, 3) encoder outputs
    for k in range(4):  # re-seeded from the batch for the next steps
        assert (vq.codebook.weight[k] - rows).abs().sum(1).min() < 1e-5
    assert torch.equal(vq.codebook.weight[4:], before[4:]) and torch.equal(vq.usage[:4], torch.ones(4))
    out["vq_loss"].backward()  # the in-place re-seed does not break autograd
    assert z.grad.abs().sum() > 0 and vq.codebook.weight.grad[:4].abs().sum() == 0
    assert not VectorQuantizer(8, 3).dead_code_restart  # off by default


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------

def test_short_training_run_lowers_the_loss():
    model = tiny()
    loss_fn = OccupancyLoss(ce=10.0)  # the released weights: 10 x CE + Lovász + VQ
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = street()
    losses = []
    for _ in range(30):
        parts = loss_fn(model(x), x)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["loss"].item())
    assert "vq" in parts and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
