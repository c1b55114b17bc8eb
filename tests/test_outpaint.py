"""Consistency-aware outpainting (X-Scene Eq. 3) with tiny untrained models: sizes, determinism, exact overlaps."""
from __future__ import annotations

import pytest
import torch

from occlab.diffusion import Diffusion
from occlab.errors import OcclabError
from occlab.models.xscene import XSceneVAE, xscene_tiny
from occlab.models.xscene_diffusion import TriplaneDiT, config_for_vae, decode_labels
from occlab.outpaint import (
    OutpaintResult,
    big_shape,
    chunk_offsets,
    outpaint,
    outpaint_chunk,
    seam_agreement,
    stitch,
)

GRID = (16, 16, 8)  # latent 8 x 8 x 8 (downsample 2)
K = 11



@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    vae = XSceneVAE(xscene_tiny(GRID, num_classes=K))
    den = TriplaneDiT(config_for_vae(vae.config, "tiny"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # small non-zero weights: an untrained denoiser that does something
        for p in den.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return vae, den, Diffusion(100)


def layout(shape, seed=0):
    return torch.randint(0, K, shape[:2], generator=torch.Generator().manual_seed(seed))


def test_map_sizes_and_offsets():
    assert big_shape((200, 200, 16), (3, 3), 100) == (400, 400, 16)  # Occ3D, 3 x 3, half-chunk overlap
    assert big_shape((200, 200, 16), (3, 3)) == (400, 400, 16)
    assert big_shape((200, 200, 16), (2, 4), (40, 100)) == (360, 500, 16)
    offs = chunk_offsets(GRID, (2, 3), 8)
    assert list(offs) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # row-major generation order
    assert offs[(1, 2)] == (8, 16)
    with pytest.raises(OcclabError, match="overlap"):
        chunk_offsets(GRID, (2, 2), 16)


def test_stitch_keeps_the_reference_in_overlaps():
    offs = chunk_offsets((4, 4, 2), (1, 2), 2)
    a, b = torch.full((4, 4, 2), 1, dtype=torch.uint8), torch.full((4, 4, 2), 2, dtype=torch.uint8)
    big = stitch({(0, 0): a, (0, 1): b}, offs, big_shape((4, 4, 2), (1, 2), 2))
    assert big.shape == (4, 6, 2) and big.dtype == torch.uint8
    assert (big[:, :4] == 1).all() and (big[:, 4:] == 2).all()
    assert seam_agreement({(0, 0): a, (0, 1): b}, offs, big.shape) == {(0, 1): 0.0}
    assert seam_agreement({(0, 0): a, (0, 1): a}, offs, big.shape) == {(0, 1): 1.0}


def test_three_by_three_map_shape_determinism_and_exact_overlaps(models):
    vae, den, diffusion = models
    shape = big_shape(GRID, (3, 3), 8)
    assert shape == (32, 32, 8)
    bev = layout(shape)
    kw = {"chunks": (3, 3), "overlap": 8, "steps": 4, "seed": 3}
    res = outpaint(vae, den, diffusion, bev, None, details=True, **kw)
    assert isinstance(res, OutpaintResult)
    assert res.labels.shape == shape and res.labels.dtype == torch.uint8 and int(res.labels.max()) < K
    again = outpaint(vae, den, diffusion, bev, None, **kw)
    assert torch.equal(again, res.labels)  # same seed, same map
    other = outpaint(vae, den, diffusion, bev, None, details=True, **{**kw, "seed": 4})
    assert not torch.equal(other.latents[(0, 0)]["xy"], res.latents[(0, 0)]["xy"])

    L = res.latents  # latent 8 x 8 x 8, overlap 4 cells, stride 4
    # a step along y (chunk (0, 1)): xy columns and yz rows are synchronised with chunk (0, 0), xz is new
    assert torch.equal(L[(0, 1)]["xy"][:, :, :4], L[(0, 0)]["xy"][:, :, 4:])
    assert torch.equal(L[(0, 1)]["yz"][:, :4], L[(0, 0)]["yz"][:, 4:])
    assert not res.known[(0, 1)]["xz"].any()
    # a step along x (chunk (1, 0)): xy rows and xz rows, yz is new
    assert torch.equal(L[(1, 0)]["xy"][:, :4], L[(0, 0)]["xy"][:, 4:])
    assert torch.equal(L[(1, 0)]["xz"][:, :4], L[(0, 0)]["xz"][:, 4:])
    assert not res.known[(1, 0)]["yz"].any()
    # chunk (1, 1) has three earlier neighbours: an L-shaped known region of the xy plane
    assert int(res.known[(1, 1)]["xy"].sum()) == 64 - 16
    assert torch.equal(L[(1, 1)]["xy"][:, :4, 4:], L[(0, 2)]["xy"][:, 4:, :4])
    assert torch.equal(L[(1, 1)]["xy"][:, 4:, :4], L[(1, 0)]["xy"][:, 4:, 4:])
    assert torch.equal(L[(1, 1)]["xz"][:, :4], L[(0, 1)]["xz"][:, 4:])
    assert torch.equal(L[(1, 1)]["yz"][:, :4], L[(1, 0)]["yz"][:, 4:])
    assert not res.known[(0, 0)]["xy"].any()
    # the map holds chunk (0, 0) whole and every chunk outside earlier chunks
    assert torch.equal(res.labels[:16, :16], res.chunks[(0, 0)])
    assert torch.equal(res.labels[24:, 24:], res.chunks[(2, 2)][8:, 8:])  # the part no earlier chunk covers
    assert set(res.agreement) == set(res.offsets) - {(0, 0)} and all(0 <= v <= 1 for v in res.agreement.values())


def test_extending_a_given_scene_keeps_it(models):
    vae, den, diffusion = models
    scene = torch.randint(0, K, GRID, generator=torch.Generator().manual_seed(5))
    out = outpaint(vae, den, diffusion, None, None, chunks=(1, 2), overlap=8, steps=3, seed=0, scene=scene,
                   details=True)
    assert out.labels.shape == (16, 24, 8)
    assert torch.equal(out.labels[:, :16], scene.to(torch.uint8))
    mu = vae.encode(scene[None])["mu"]
    assert torch.allclose(out.latents[(0, 1)]["xy"][:, :, :4], mu["xy"][0, :, :, 4:])  # continues the scene's latent
    # with latent statistics the synchronisation happens in the normalised space, the decoding in the raw one
    stats = {"mean": {n: torch.full((4,), 0.5) for n in mu}, "std": {n: torch.full((4,), 2.0) for n in mu}}
    norm = outpaint(vae, den, diffusion, None, None, chunks=(1, 2), overlap=8, steps=3, seed=0, scene=scene,
                    stats=stats, details=True)
    assert torch.allclose(norm.latents[(0, 0)]["xy"], (mu["xy"][0] - 0.5) / 2.0)
    assert torch.equal(norm.labels[:, :16], scene.to(torch.uint8))
    raw = {n: v[None] * 2.0 + 0.5 for n, v in norm.latents[(0, 1)].items()}
    assert torch.equal(norm.chunks[(0, 1)], decode_labels(vae, raw)[0])


def test_chunks_see_their_own_layout_and_boxes(models):
    vae, den, diffusion = models
    shape = big_shape(GRID, (1, 2), 8)
    bev = layout(shape)
    changed = bev.clone()
    changed[:, 16:] = (changed[:, 16:] + 1) % K  # only chunk (0, 1) sees this part
    kw = {"chunks": (1, 2), "overlap": 8, "steps": 3, "seed": 0, "details": True}
    a = outpaint(vae, den, diffusion, bev, None, **kw)
    b = outpaint(vae, den, diffusion, changed, None, **kw)
    assert torch.equal(a.latents[(0, 0)]["xy"], b.latents[(0, 0)]["xy"])
    assert not torch.equal(a.latents[(0, 1)]["xy"], b.latents[(0, 1)]["xy"])

    boxes = torch.zeros(2, 10)
    boxes[:, 1:9] = torch.tensor([[10.0, 8.0, 20.0, 4.0, 4.0, 2.0, 2.0, 0.3],  # a vehicle in chunk (0, 1) only
                                  [4.0, 30.0, 4.0, 4.0, 1.0, 1.0, 2.0, 0.0]])  # outside the map
    seen = []
    hook = den.register_forward_pre_hook(lambda mod, args: seen.append(args[2]))
    try:
        outpaint(vae, den, diffusion, bev, boxes, chunks=(1, 2), overlap=8, steps=2, seed=0)
    finally:
        hook.remove()
    first, second = seen[0], seen[2]  # two DDIM steps per chunk
    assert torch.equal(first["layout"], bev[None, :, :16]) and torch.equal(second["layout"], bev[None, :, 8:])
    assert (first["box_classes"] == -1).all()
    assert second["box_classes"][0, 0] == 10 and (second["box_classes"][0, 1:] == -1).all()
    centre = second["boxes"][0, 0].mean(0)  # in chunk (0, 1): x 0..16, y 8..24, z 0..8 -> [-1, 1]
    assert torch.allclose(centre, torch.tensor([0.0, 0.5, 0.0]), atol=1e-6)


def test_outpaint_chunk_matches_the_reference_exactly_at_the_end(models):
    _, den, diffusion = models
    lay = den.layout
    ref = {n: torch.randn(1, 4, *lay.shapes[n], generator=torch.Generator().manual_seed(7)) for n in lay.names}
    mask = {n: torch.zeros(1, 1, *lay.shapes[n], dtype=torch.bool) for n in lay.names}
    mask["xy"][..., :3, :] = True
    for method in ("ddim", "ddpm"):
        new = outpaint_chunk(den, diffusion, ref, mask, steps=3, method=method,
                             generator=torch.Generator().manual_seed(0))
        assert torch.equal(new["xy"][..., :3, :], ref["xy"][..., :3, :])
        assert not torch.equal(new["xy"][..., 3:, :], ref["xy"][..., 3:, :])
        assert not torch.equal(new["xz"], ref["xz"])


def test_bad_arguments_are_named(models):
    vae, den, diffusion = models
    with pytest.raises(OcclabError, match="multiple of the VAE's downsampling"):
        outpaint(vae, den, diffusion, None, None, chunks=(1, 2), overlap=3, steps=2)
    with pytest.raises(OcclabError, match="layout_big"):
        outpaint(vae, den, diffusion, torch.zeros(16, 16, dtype=torch.long), None, chunks=(1, 2), overlap=8, steps=2)
    other = TriplaneDiT(config_for_vae(xscene_tiny((32, 32, 8)), "tiny"))
    with pytest.raises(OcclabError, match="does not match"):
        outpaint(vae, other, diffusion, None, None, chunks=(1, 2), overlap=8, steps=2)


def _toy_eps(x, t):
    return 0.3 * torch.tanh(x) + 1e-3 * t.float().view(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_repaint_resample_zero_is_the_plain_sampler_and_keeps_the_known_region(method):
    d = Diffusion(steps=40)
    known = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    m = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    m[..., :3, :] = True

    def run(**kw):
        return d.sample(_toy_eps, known.shape, method=method, steps=8, eta=0.5, known=known, known_mask=m,
                        generator=torch.Generator().manual_seed(1), **kw)

    plain = run()
    assert torch.equal(run(resample=0), plain)
    again = run(resample=2)
    assert torch.equal(again[..., :3, :], known[..., :3, :])  # known region exact at the end
    assert not torch.allclose(again[..., 3:, :], plain[..., 3:, :])  # the resampling changes the rest
    assert torch.equal(run(resample=2), again)  # deterministic given the seed


def test_repaint_resample_repeats_each_step_after_a_forward_jump():
    """With r resamplings the model sees every timestep r + 1 times; the re-noised input at step t has the
    forward-process statistics of q(x_t | x_0) when the model predicts the data exactly."""
    d = Diffusion(steps=100)
    known = torch.full((1, 1, 1, 20000), 2.0)
    seen: dict = {}

    def model(x, t):  # the exact eps for data == 2 everywhere
        seen.setdefault(int(t[0]), []).append((x.mean().item(), x.std().item()))
        ac = d.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - ac.sqrt() * 2.0) / (1 - ac).sqrt()

    mask = torch.zeros_like(known, dtype=torch.bool)
    out = d.ddim_sample(model, known.shape, steps=5, resample=2, known=known, known_mask=mask,
                        generator=torch.Generator().manual_seed(0))
    assert all(len(v) == 3 for v in seen.values()) and len(seen) == 5
    for t, tries in seen.items():
        ac = d.alphas_cumprod[t].item()
        for mean, std in tries[1:]:  # the re-noised tries
            assert mean == pytest.approx(2.0 * ac ** 0.5, abs=0.03) and std == pytest.approx((1 - ac) ** 0.5, abs=0.03)
    assert out.mean().item() == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(OcclabError, match="resample"):
        d.ddim_sample(model, known.shape, steps=2, resample=-1)


def test_outpaint_with_resampling_keeps_overlaps_exact(models):
    _, den, diffusion = models
    lay = den.layout
    ref = {n: torch.randn(1, 4, *lay.shapes[n], generator=torch.Generator().manual_seed(7)) for n in lay.names}
    mask = {n: torch.zeros(1, 1, *lay.shapes[n], dtype=torch.bool) for n in lay.names}
    mask["xy"][..., :3, :] = True
    new = outpaint_chunk(den, diffusion, ref, mask, steps=3, resample=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(new["xy"][..., :3, :], ref["xy"][..., :3, :])
