"""Gaussian diffusion: schedule, forward process, loss, DDPM / DDIM samplers, guidance, inpainting."""
from __future__ import annotations

import math

import pytest
import torch

from occlab.diffusion import Diffusion, cfg_model, guide, masked_mse
from occlab.errors import OcclabError
from occlab.models import dit as D


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed smooth eps function of (x, t) for sampler tests."""
    return 0.3 * torch.tanh(x) + 1e-3 * t.float().view(-1, *([1] * (x.dim() - 1)))


def gaussian_eps(diff: Diffusion, mu: float, s: float):
    """The exact eps predictor for data x_0 ~ N(mu, s^2): E[eps | x_t]."""
    def fn(x, t):
        ac = diff.alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return (x - ac.sqrt() * mu) * (1 - ac).sqrt() / (ac * s * s + 1 - ac)
    return fn


def test_linear_schedule_known_values():
    d = Diffusion()
    assert d.steps == 1000 and d.betas.dtype == torch.float64
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert d.alphas_cumprod[0].item() == pytest.approx(0.9999, abs=1e-12)
    assert d.alphas_cumprod[-1].item() == pytest.approx(4.0358e-05, rel=1e-4)  # sqrt = 0.00635: nearly pure noise
    assert d.alphas_cumprod[499].item() == pytest.approx(0.078587, rel=1e-4)
    assert d.posterior_variance[0].item() == 0.0
    assert Diffusion(steps=100).betas[-1].item() == pytest.approx(0.2)  # ADM scaling 1000 / steps
    with pytest.raises(OcclabError):
        Diffusion(steps=20)  # scaled beta_end would reach 1
    assert (d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all()


def test_q_sample_statistics():
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((1, 200_000), 2.0)
    for t in (0, 250, 999):
        xt = d.q_sample(x0, torch.tensor([t]), torch.randn(x0.shape, generator=g))
        ac = d.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(2.0 * math.sqrt(ac), abs=0.01)
        assert xt.std().item() == pytest.approx(math.sqrt(1 - ac), abs=0.01 + 0.01 * math.sqrt(1 - ac))
    noise = torch.randn(3, 2, 4, 4, generator=g)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([5, 500, 995])
    assert torch.allclose(d.predict_x0(d.q_sample(x0, t, noise), t, noise), x0, atol=1e-4)


def test_loss_masks_and_reduces():
    d = Diffusion(steps=100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    mask = torch.zeros(4, 4)
    mask[:2] = 1

    def model(x, t):  # right on the masked-in rows, far off elsewhere
        return torch.where(mask.bool(), noise, noise + 100.0)

    assert d.loss(model, x0, noise=noise, mask=mask, generator=g).item() == 0.0
    assert d.loss(model, x0, noise=noise, generator=g).item() == pytest.approx(5000.0)
    per = d.loss(lambda x, t: torch.zeros_like(x), x0, noise=noise, mask=mask, reduction="none")
    assert per.shape == (2,)
    assert torch.allclose(per, (noise[..., :2, :] ** 2).mean(dim=(1, 2, 3)))
    assert torch.allclose(masked_mse(noise, torch.zeros_like(noise)), (noise ** 2).mean(dim=(1, 2, 3)))


def test_ddim_with_all_steps_and_eta_one_is_ddpm():
    d = Diffusion(steps=50)
    a = d.ddpm_sample(toy_model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    b = d.ddim_sample(toy_model, (2, 3, 4, 4), steps=50, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    c = d.ddpm_sample(toy_model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(a, c)


def test_ddim_eta_zero_is_deterministic():
    d = Diffusion(steps=100)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [d.ddim_sample(toy_model, noise=noise, steps=10, eta=0.0, generator=torch.Generator().manual_seed(s))
            for s in (1, 2)]
    assert torch.equal(runs[0], runs[1])  # no draw besides the starting noise
    seeded = [d.ddim_sample(toy_model, (2, 3, 4, 4), steps=10, generator=torch.Generator().manual_seed(5))
              for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    assert d.ddim_timesteps(10)[0] == 99 and d.ddim_timesteps(10)[-1] == 0 and len(d.ddim_timesteps(10)) == 10
    with pytest.raises(OcclabError):
        d.ddim_timesteps(101)


@pytest.mark.parametrize("method,steps,eta", [("ddpm", None, 0.0), ("ddim", 50, 0.0), ("ddim", 100, 1.0)])
def test_samplers_reach_the_data_distribution(method, steps, eta):
    """With the exact eps of Gaussian data N(1.5, 0.5^2), samples have that mean and spread."""
    d = Diffusion()
    mu, s = 1.5, 0.5
    x = d.sample(gaussian_eps(d, mu, s), (1, 4000), method=method, steps=steps, eta=eta,
                 generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(mu, abs=0.05)
    assert x.std().item() == pytest.approx(s, abs=0.05)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_inpainting_keeps_the_known_region(method):
    d = Diffusion(steps=40)
    g = torch.Generator().manual_seed(0)
    known = torch.randn(2, 3, 6, 6, generator=g)
    m = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    m[..., :3, :] = True
    out = d.sample(toy_model, known.shape, method=method, steps=10, eta=0.5, known=known, known_mask=m,
                   generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[..., :3, :], known[..., :3, :])
    free = d.sample(toy_model, known.shape, method=method, steps=10, eta=0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(out[..., 3:, :], free[..., 3:, :])  # the known region steers the rest
    again = d.sample(toy_model, known.shape, method=method, steps=10, eta=0.5, known=known, known_mask=m,
                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_inpainting_steps_use_the_noised_known_region():
    """After every step the known region is q(x_t | x_0 known): seen by a model that records its input."""
    d = Diffusion(steps=1000)
    known = torch.full((1, 1, 1, 20000), 3.0)
    mask = torch.ones_like(known, dtype=torch.bool)
    seen = {}

    def model(x, t):
        seen[int(t[0])] = (x.mean().item(), x.std().item())
        return torch.zeros_like(x)

    d.ddim_sample(model, known.shape, steps=5, known=known, known_mask=mask, generator=torch.Generator().manual_seed(0))
    for t, (mean, std) in seen.items():
        ac = d.alphas_cumprod[t].item()
        assert mean == pytest.approx(3.0 * math.sqrt(ac), abs=0.03) and std == pytest.approx(math.sqrt(1 - ac), abs=0.03)


def test_classifier_free_guidance():
    torch.manual_seed(0)
    model = D.DiT(D.dit_tiny(command_cond=True, layout_cond=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    x = torch.randn(2, 4, *model.layout.map_shape)
    t = torch.tensor([10, 600])
    cond = {"command": torch.tensor([1, 2]), "layout": torch.randint(0, 11, (2, 4, 4))}
    eps_c, eps_u = model(x, t, cond, drop=False), model(x, t, cond, drop=True)
    assert torch.equal(cfg_model(model, cond, 1.0)(x, t), eps_c)
    assert torch.equal(cfg_model(model, cond, 0.0)(x, t), eps_u)
    assert torch.allclose(cfg_model(model, cond, 4.0)(x, t), eps_u + 4.0 * (eps_c - eps_u), atol=1e-5)
    assert torch.allclose(guide(eps_c, eps_u, 1.0), eps_c)
    d = Diffusion(steps=50)
    a = d.ddim_sample(cfg_model(model, cond, 2.0), x.shape, steps=5, generator=torch.Generator().manual_seed(0))
    b = d.ddim_sample(cfg_model(model, cond, 2.0), x.shape, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.isfinite(a).all()
