"""Gaussian diffusion for latent generators (DDPM, Ho et al. 2020; DDIM, Song et al. 2021): small and tested.

- `Diffusion(steps=1000)`: linear beta schedule 1e-4 .. 0.02 (as the released DynamicCity / ADM "linear"),
  `q_sample`, `predict_x0`, the epsilon-prediction loss (MSE, optionally masked, e.g. the padding of a
  rollout), DDPM ancestral sampling and DDIM sampling with any number of steps and eta.
- Classifier-free guidance: `guide(eps_cond, eps_uncond, scale)` = uncond + scale * (cond - uncond), and
  `cfg_model(model, cond, scale)`, an eps function running the conditional and the unconditional pass as one
  batch of 2B for models with the occlab signature `model(x, t, cond, drop=...)` (drop=True: all null).
- Inpainting: samplers take `known` (x_0 values) and `known_mask` (True / 1 where known): at the start and after
  every step the known region is replaced by the known values forward-noised to the current step,
  x_t = m * q(x_t | x_0 known) + (1 - m) * x_t, and by the known values themselves at the end (exact).
  (DESIGN §3 writes the same rule with m marking the unknown region.)
- RePaint resampling (Lugmayr et al. 2022, jump length 1): with `resample` = r > 0 every sampler step from t to
  t_prev is done r + 1 times; between two tries the result is re-noised back to t with the forward process
  q(x_t | x_t_prev) (x_t = sqrt(abar_t / abar_prev) x_prev + sqrt(1 - abar_t / abar_prev) z), so the unknown
  region is denoised again in harmony with the known one. r = 0 is the plain sampler (same draws).

A model is any function eps = model_fn(x_t, t) with t a (B,) long tensor. Every random draw comes from the
given torch.Generator (a CPU generator also drives CUDA tensors), so a seed fixes the result. Sampling
loops run under torch.no_grad; call model.eval() first (the DiT drops conditions at random in training).

Released DynamicCity differences: it learns the variance (IDDPM hybrid loss) and samples with it; we predict
epsilon only and sample with a fixed variance, the posterior variance beta~_t ("small", default, which makes
DDIM with eta = 1 over all steps the same process as DDPM) or beta_t ("large").
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from occlab.errors import OcclabError

VARIANCES = ("small", "large")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM linear schedule, float64; for steps != 1000 both ends scaled by 1000 / steps (ADM and the released
    code), which keeps abar at the last step near zero; needs steps > 1000 * beta_end (20 by default)."""
    scale = 1000.0 / steps
    return torch.linspace(scale * beta_start, scale * beta_end, steps, dtype=torch.float64)


def randn(shape, generator: torch.Generator | None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws from `generator` (on the generator's device), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean squared error (B,), over the cells where `mask` (broadcastable to pred) is nonzero."""
    err = (pred - target).float() ** 2
    dims = tuple(range(1, err.dim()))
    if mask is None:
        return err.mean(dim=dims)
    m = mask.to(device=err.device, dtype=err.dtype).expand_as(err)
    return (err * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(1.0)


def guide(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond) (scale 1: conditional, 0: unconditional)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def _twice(value):
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    if isinstance(value, Mapping):
        return {k: _twice(v) for k, v in value.items()}
    return value


def cfg_model(model, cond: Mapping | None, scale: float) -> ModelFn:
    """Eps function with classifier-free guidance for `model(x, t, cond, drop=...)`: one batched pass of the
    conditional (drop nothing) and the unconditional (drop every condition) predictions, combined by `guide`.
    scale 1 runs the conditional pass alone, scale 0 the unconditional one."""
    cond = dict(cond or {})

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1:
            return model(x, t, cond, drop=False)
        if scale == 0:
            return model(x, t, cond, drop=True)
        b = x.shape[0]
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        eps = model(torch.cat([x, x]), torch.cat([t, t]), {k: _twice(v) for k, v in cond.items()}, drop=drop)
        eps_cond, eps_uncond = eps.chunk(2)
        return guide(eps_cond, eps_uncond, scale)

    return fn


class Diffusion:
    """Discrete-time Gaussian diffusion with `steps` steps (t = 0 .. steps-1) and epsilon prediction."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 variance: str = "small"):
        if variance not in VARIANCES:
            raise OcclabError(f"variance must be one of {VARIANCES}, got {variance!r}")
        if steps < 1:
            raise OcclabError(f"steps must be positive, got {steps}")
        self.steps, self.variance = int(steps), variance
        b = linear_betas(self.steps, beta_start, beta_end)  # float64 tables
        if b[-1] >= 1:
            raise OcclabError(f"{steps} steps scale the linear schedule's last beta to {b[-1].item():.3g} >= 1; "
                              f"use more steps (sample with DDIM for fewer network evaluations)")
        ac = torch.cumprod(1.0 - b, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = b, ac, ac_prev
        self.posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)  # beta~_t (0 at t = 0)
        self.tables = {
            "sqrt_ac": ac.sqrt(), "sqrt_1m_ac": (1.0 - ac).sqrt(),
            "sqrt_recip_ac": (1.0 / ac).sqrt(), "sqrt_recipm1_ac": (1.0 / ac - 1.0).sqrt(),
            "post_c0": b * ac_prev.sqrt() / (1.0 - ac),  # posterior mean = c0 * x_0 + ct * x_t
            "post_ct": (1.0 - ac_prev) * (1.0 - b).sqrt() / (1.0 - ac),
        }
        self._cache: dict = {}

    # -- tables -------------------------------------------------------------------------------------------

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """tables[name][t] as x's dtype on x's device, shaped (B, 1, ..., 1)."""
        key = (name, x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self.tables[name].to(device=x.device, dtype=x.dtype)
        return self._cache[key][t.to(x.device)].reshape(-1, *([1] * (x.dim() - 1)))

    def _times(self, t, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, device=x.device).long().reshape(-1).expand(x.shape[0])

    # -- forward process and loss -------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        t = self._times(t, x0)
        return self._at("sqrt_ac", t, x0) * x0 + self._at("sqrt_1m_ac", t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        t = self._times(t, x_t)
        return self._at("sqrt_recip_ac", t, x_t) * x_t - self._at("sqrt_recipm1_ac", t, x_t) * eps

    def predict_eps(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        t = self._times(t, x_t)
        return (self._at("sqrt_recip_ac", t, x_t) * x_t - x0) / self._at("sqrt_recipm1_ac", t, x_t)

    def loss(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, reduction: str = "mean") -> torch.Tensor:
        """Epsilon-prediction MSE at uniform random (or given) timesteps; `mask` (broadcastable, 1 = counts)
        restricts it per sample, normalised by the counted cells (the released masked MSE).
        reduction "mean" -> scalar, "none" -> (B,)."""
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.steps, (b,), generator=generator,
                              device=generator.device if generator is not None else x0.device).to(x0.device)
        t = self._times(t, x0)
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        eps = model_fn(self.q_sample(x0, t, noise), t)
        per_sample = masked_mse(eps, noise, mask)
        if reduction == "none":
            return per_sample
        if reduction != "mean":
            raise OcclabError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        return per_sample.mean()

    # -- sampling -----------------------------------------------------------------------------------------

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps evenly spread over [0, T-1], both ends included, descending."""
        if not 1 <= steps <= self.steps:
            raise OcclabError(f"sampling steps must lie in 1..{self.steps}, got {steps}")
        ts = torch.linspace(0, self.steps - 1, steps, dtype=torch.float64).round().long().unique()
        return ts.flip(0).tolist()

    def _start(self, shape, noise, generator, device, dtype):
        if noise is not None:
            return noise.to(device=device if device is not None else noise.device)
        if shape is None:
            raise OcclabError("give the sample shape or the starting noise")
        return randn(shape, generator, device, dtype)

    def _inpaint(self, x, t: int, known, mask, generator):
        """Known region <- known values noised to step t (t < 0: the known values themselves)."""
        if known is None:
            return x
        if t < 0:
            return torch.where(mask, known, x)
        noised = self.q_sample(known, t, randn(x.shape, generator, x.device, x.dtype))
        return torch.where(mask, noised, x)

    def _prepare_known(self, known, known_mask, x):
        if known is None:
            return None, None
        if known_mask is None:
            raise OcclabError("inpainting needs known_mask together with known")
        known = known.to(device=x.device, dtype=x.dtype).expand_as(x)
        return known, known_mask.to(x.device).bool().expand_as(x)

    def _renoise(self, x, step: int, prev: int, generator):
        """RePaint's jump back: a draw of q(x_step | x_prev) (prev < 0: x_prev is x_0)."""
        ac = self.alphas_cumprod
        a_prev = ac[prev] if prev >= 0 else torch.ones((), dtype=torch.float64)
        ratio = ac[step] / a_prev
        return float(ratio.sqrt()) * x + float((1 - ratio).sqrt()) * randn(x.shape, generator, x.device, x.dtype)

    def _x0(self, x, t, eps, clip):
        x0 = self.predict_x0(x, t, eps)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = self.predict_eps(x, t, x0)
        return x0, eps

    @torch.no_grad()
    def ddpm_sample(self, model_fn: ModelFn, shape=None, *, generator: torch.Generator | None = None,
                    device=None, dtype=torch.float32, noise: torch.Tensor | None = None,
                    known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                    clip: float | None = None, resample: int = 0) -> torch.Tensor:
        """Ancestral sampling over all T steps: x_{t-1} = posterior mean(x_0 pred, x_t) + sigma_t z (no noise
        at t = 0); sigma_t^2 = beta~_t ("small") or beta_t ("large"). `clip` bounds the x_0 prediction;
        `resample`: RePaint resamplings per step (module docstring)."""
        x = self._start(shape, noise, generator, device, dtype)
        known, mask = self._prepare_known(known, known_mask, x)
        x = self._inpaint(x, self.steps - 1, known, mask, generator)
        var = self.posterior_variance if self.variance == "small" else self.betas
        self._check_resample(resample)
        for i in reversed(range(self.steps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            for r in range(resample + 1):
                if r:
                    x = self._renoise(x, i, i - 1, generator)
                x0, _ = self._x0(x, t, model_fn(x, t), clip)
                x = self._at("post_c0", t, x) * x0 + self._at("post_ct", t, x) * x
                if i > 0:
                    x = x + float(var[i].sqrt()) * randn(x.shape, generator, x.device, x.dtype)
                x = self._inpaint(x, i - 1, known, mask, generator)
        return x

    @staticmethod
    def _check_resample(resample: int) -> None:
        if int(resample) != resample or resample < 0:
            raise OcclabError(f"resample must be a whole number >= 0, got {resample!r}")

    @torch.no_grad()
    def ddim_sample(self, model_fn: ModelFn, shape=None, *, steps: int = 50, eta: float = 0.0,
                    generator: torch.Generator | None = None, device=None, dtype=torch.float32,
                    noise: torch.Tensor | None = None, known: torch.Tensor | None = None,
                    known_mask: torch.Tensor | None = None, clip: float | None = None,
                    resample: int = 0) -> torch.Tensor:
        """DDIM (Song et al. Eq. 12) over `steps` evenly spaced timesteps: x_prev = sqrt(abar_prev) x_0 +
        sqrt(1 - abar_prev - sigma^2) eps + sigma z, sigma = eta sqrt((1-abar_prev)/(1-abar)) sqrt(1 -
        abar/abar_prev). eta 0: deterministic given the starting noise; eta 1 with steps = T: DDPM ("small").
        `resample`: RePaint resamplings per step (module docstring; the jump back draws fresh noise)."""
        x = self._start(shape, noise, generator, device, dtype)
        known, mask = self._prepare_known(known, known_mask, x)
        ts = self.ddim_timesteps(steps)
        x = self._inpaint(x, ts[0], known, mask, generator)
        ac = self.alphas_cumprod
        self._check_resample(resample)
        for i, step in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            a, a_prev = ac[step], (ac[prev] if prev >= 0 else torch.ones((), dtype=torch.float64))
            sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
            for r in range(resample + 1):
                if r:
                    x = self._renoise(x, step, prev, generator)
                x0, eps = self._x0(x, t, model_fn(x, t), clip)
                x = float(a_prev.sqrt()) * x0 + float((1 - a_prev - sigma ** 2).clamp_min(0).sqrt()) * eps
                if prev >= 0 and eta > 0:
                    x = x + float(sigma) * randn(x.shape, generator, x.device, x.dtype)
                x = self._inpaint(x, prev, known, mask, generator)
        return x

    def sample(self, model_fn: ModelFn, shape=None, *, method: str = "ddpm", steps: int | None = None,
               eta: float = 0.0, **kw) -> torch.Tensor:
        """`ddpm_sample` (method "ddpm") or `ddim_sample` (method "ddim", `steps` default 50)."""
        if method == "ddpm":
            return self.ddpm_sample(model_fn, shape, **kw)
        if method == "ddim":
            return self.ddim_sample(model_fn, shape, steps=steps or 50, eta=eta, **kw)
        raise OcclabError(f"sampling method must be 'ddpm' or 'ddim', got {method!r}")


__all__ = ["VARIANCES", "Diffusion", "cfg_model", "guide", "linear_betas", "masked_mse", "randn"]
