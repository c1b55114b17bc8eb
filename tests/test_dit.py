"""HexPlane DiT: token layouts (padded rollout, vertical concat, direct unfold; the grid layout of OccSora's latent)
and the adaLN-Zero model."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from occlab import planes as P
from occlab.diffusion import Diffusion
from occlab.errors import OcclabError
from occlab.models import dit as D

CARLASC_LATENT = (8, 64, 64, 4)  # T', X', Y', Z' at CarlaSC, T = 16, rates 2,2,2,2
# (t, x, y, z): the CarlaSC latent, tiny ones, X != Y, odd sizes (patches straddling planes and padding)
SIZES = [CARLASC_LATENT, (2, 4, 4, 2), (4, 16, 16, 4), (3, 5, 5, 2), (2, 6, 4, 3), (1, 3, 7, 1)]


def shapes(sizes) -> dict[str, tuple[int, int]]:
    return P.plane_shapes(dict(zip("txyz", sizes)), "txyz")


def random_planes(sizes, channels=3, batch=2, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, channels, *ab, generator=g) for n, ab in shapes(sizes).items()}


def perturb(model: torch.nn.Module, seed=0, std=0.05):
    """Random weights everywhere (the adaLN-Zero init makes every output zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def tiny_model(seed=0, **kw) -> D.DiT:
    torch.manual_seed(seed)
    return D.DiT(D.dit_tiny(**kw))


# ---------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", SIZES)
def test_rollout_round_trip(sizes):
    planes = random_planes(sizes, channels=16 if sizes == CARLASC_LATENT else 3)
    T, X, Y, Z = sizes
    m = P.rollout(planes)
    assert m.shape[-2:] == (X + T + Z, Y + Z + T)
    back = P.unroll(m, shapes(sizes))
    assert list(back) == P.axis_pairs("txyz")
    for n in planes:
        assert torch.equal(back[n], planes[n]), n
    cells = P.rollout_cell_mask(shapes(sizes))
    assert (m[..., ~cells] == 0).all()  # padding is zero
    assert int(cells.sum()) == sum(a * b for a, b in shapes(sizes).values())
    noisy = torch.randn_like(m)  # unroll o rollout keeps every plane cell, zeroes the rest
    assert torch.equal(P.rollout(P.unroll(noisy, shapes(sizes))), noisy * cells)


def test_rollout_carlasc_latent_is_76_square():
    m = P.rollout(random_planes(CARLASC_LATENT, channels=16))
    assert m.shape == (2, 16, 76, 76)


def test_rollout_arrangement_and_transposes():
    """Rows [xy | xz | tx^T], [ty | tz | 0], [yz^T | 0 | 0], checked block by block (X != Y)."""
    T, X, Y, Z = 3, 6, 5, 2
    p = random_planes((T, X, Y, Z))
    m = P.rollout(p)
    assert torch.equal(m[..., :X, :Y], p["xy"])
    assert torch.equal(m[..., :X, Y:Y + Z], p["xz"])
    assert torch.equal(m[..., :X, Y + Z:], p["tx"].transpose(-1, -2))
    assert torch.equal(m[..., X:X + T, :Y], p["ty"])
    assert torch.equal(m[..., X:X + T, Y:Y + Z], p["tz"])
    assert (m[..., X:X + T, Y + Z:] == 0).all()
    assert torch.equal(m[..., X + T:, :Y], p["yz"].transpose(-1, -2))
    assert (m[..., X + T:, Y:] == 0).all()


@pytest.mark.parametrize("sizes,patch", [(CARLASC_LATENT, 2), (CARLASC_LATENT, 4), (CARLASC_LATENT, 1),
                                         ((4, 16, 16, 4), 2), ((2, 4, 4, 2), 2), ((4, 8, 12, 2), 2)])
def test_padding_mask_count_is_analytic(sizes, patch):
    """Sizes divisible by p: the zero blocks T x T and Z x (Z + T) hold (T/p)^2 + (Z/p)(Z+T)/p patches."""
    T, X, Y, Z = (s // patch for s in sizes)
    mask = P.rollout_padding_mask(shapes(sizes), patch)
    assert mask.shape == (X + T + Z, Y + Z + T)
    assert int(mask.sum()) == T * T + Z * (Z + T)
    if sizes == CARLASC_LATENT and patch == 2:
        assert (mask.numel(), int(mask.sum())) == (38 * 38, 28)


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("patch", [2, 3])
def test_padding_patches_hold_no_plane_cell(sizes, patch):
    cells = P.rollout_cell_mask(shapes(sizes))
    mask = P.rollout_padding_mask(shapes(sizes), patch)
    H, W = cells.shape
    for i, j in itertools.product(range(mask.shape[0]), range(mask.shape[1])):
        has_cell = bool(cells[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].any())
        assert mask[i, j] == (not has_cell)
    assert mask.shape == (math.ceil(H / patch), math.ceil(W / patch))


@pytest.mark.parametrize("sizes", SIZES)
def test_vconcat_and_unfold_round_trip(sizes):
    planes = random_planes(sizes)
    s = shapes(sizes)
    m = P.vconcat(planes)
    assert m.shape[-2:] == (sum(a for a, _ in s.values()), max(b for _, b in s.values()))
    assert all(torch.equal(P.unvconcat(m, s)[n], planes[n]) for n in planes)
    assert (m[..., ~P.vconcat_cell_mask(s)] == 0).all()
    for patch in (1, 2, 3):
        tokens = P.unfold(planes, patch)
        assert tokens.shape[1:] == (sum(P.unfold_token_counts(s, patch).values()), 3 * patch * patch)
        assert all(torch.equal(P.fold(tokens, s, patch)[n], planes[n]) for n in planes)


@pytest.mark.parametrize("kind", P.ROLLOUTS)
@pytest.mark.parametrize("sizes", SIZES)
def test_layout_to_map_round_trip(kind, sizes):
    planes = random_planes(sizes)
    lay = P.make_layout(kind, shapes(sizes), 2)
    m = lay.to_map(planes)
    assert m.shape[-2:] == lay.map_shape
    assert (m[..., ~lay.cell_mask] == 0).all()
    assert all(torch.equal(lay.from_map(m)[n], planes[n]) for n in planes)
    # xy patches: the patches covering the xy plane, in its row-major order (with odd sizes the last row and
    # column of patches also hold cells of the neighbouring planes, or padding)
    _, X, Y, _ = sizes
    gx, gy = -(-X // 2), -(-Y // 2)
    xy = P.unpatchify(P.patchify(P.pad_to_multiple(m, 2), 2)[:, lay.xy_patches()], (gx, gy), 2)
    assert torch.equal(xy[..., :X, :Y], planes["xy"])


def test_token_counts_of_the_three_layouts():
    """CarlaSC latent, patch 2: every layout keeps the 1416 patches that hold plane cells (sum of a/2 * b/2);
    PRO has 38 x 38 patches (28 padding), vertical concat 108 x 32 (2040 padding)."""
    s = shapes(CARLASC_LATENT)
    plane_tokens = sum((a // 2) * (b // 2) for a, b in s.values())
    assert plane_tokens == 1416
    counts = {}
    for kind in P.ROLLOUTS:
        lay = P.make_layout(kind, s, 2)
        counts[kind] = (lay.grid, lay.num_patches, lay.num_padding, lay.num_tokens)
    assert counts["pro"] == ((38, 38), 1444, 28, 1416)
    assert counts["vconcat"] == ((108, 32), 3456, 2040, 1416)
    assert counts["unfold"][3] == 1416 and counts["unfold"][1] - counts["unfold"][2] == 1416
    assert sum(P.unfold_token_counts(s, 2).values()) == 1416


def test_layout_rejects_bad_shapes():
    s = dict(shapes((2, 4, 4, 2)))
    s["xz"] = (5, 2)  # x disagrees with xy
    with pytest.raises(OcclabError):
        P.make_layout("pro", s, 2)
    with pytest.raises(OcclabError):
        P.make_layout("diagonal", shapes((2, 4, 4, 2)), 2)
    with pytest.raises(OcclabError):
        P.unroll(torch.zeros(1, 1, 9, 9), shapes((2, 4, 4, 2)))


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------

ALL_CONDS = {"command_cond": True, "trajectory_cond": True, "layout_cond": True, "previous_cond": True}


def conditions(model: D.DiT, batch=2, seed=1) -> dict:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    _, X, Y, _ = c.sizes
    return {"command": torch.randint(0, 4, (batch,), generator=g),
            "trajectory": torch.randn(batch, c.frames, 3, generator=g),
            "layout": torch.randint(0, c.layout_channels, (batch, 2 * X, 2 * Y), generator=g),
            "previous": torch.randn(batch, c.channels, *model.layout.map_shape, generator=g) * model.cell_mask}


@pytest.mark.parametrize("kind", P.ROLLOUTS)
@pytest.mark.parametrize("spatial", D.SPATIAL_COND)
def test_adaln_zero_output_is_zero_at_init(kind, spatial):
    model = tiny_model(rollout=kind, spatial_cond=spatial, **ALL_CONDS)
    x = torch.randn(2, 4, *model.layout.map_shape)
    out = model(x, torch.tensor([3, 999]), conditions(model))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    planes = random_planes(model.config.sizes, channels=4)
    out = model(planes, torch.tensor([0, 1]))
    assert set(out) == set(planes) and all(out[n].shape == planes[n].shape for n in planes)
    assert all(torch.count_nonzero(v) == 0 for v in out.values())


def test_paper_parameter_count():
    """DiT-DC/2 at CarlaSC: 43,151,296 = about 44 M (tolerance 3 %); the released count 43,730,432 adds its
    frozen positional-embedding parameter (38 * 38 * 384) and the learned-variance outputs (384 * 64 + 64)."""
    info = D.model_info(D.dit_paper())
    n = info["parameters"]
    assert n == 43_151_296
    assert abs(n / 44e6 - 1) < 0.03
    assert D.RELEASED_PARAMS_CARLASC == n + 38 * 38 * 384 + (384 * 64 + 64)
    assert info["tokens"] == 1416 and info["map_shape"] == [16, 76, 76] and info["padding_patches"] == 28


def test_presets_and_vae_sizing():
    from occlab.models.dynamiccity import dynamiccity_small
    cfg = D.config_for_vae(dynamiccity_small(), "small")
    assert cfg.sizes == (4, 16, 16, 4) and cfg.channels == 8 and cfg.frames == 8
    assert D.dit_small().sizes == cfg.sizes
    tiny = D.model_info(D.dit_tiny())
    assert tiny["parameters"] < 100_000 and tiny["map_shape"] == [4, 8, 8]
    with pytest.raises(OcclabError):
        D.DiTConfig(width=30, heads=3)
    with pytest.raises(OcclabError):
        D.DiTConfig(rollout="spiral")


@pytest.mark.parametrize("kind", P.ROLLOUTS)
def test_padding_is_dropped_and_restored_as_zeros(kind):
    model = perturb(tiny_model(rollout=kind, sizes=(3, 5, 5, 2))).eval()  # odd sizes: partial patches too
    lay = model.layout
    assert model.num_tokens == lay.num_tokens < lay.num_patches
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *lay.map_shape, generator=g)
    t = torch.tensor([10, 500])
    out = model(x, t)
    assert (out[..., ~lay.cell_mask] == 0).all() and (out[..., lay.cell_mask] != 0).any()
    # padding cells carry nothing: changing them changes no output
    x2 = torch.where(lay.cell_mask, x, torch.randn(x.shape, generator=g))
    assert torch.equal(model(x2, t), out)
    # planes in, planes out, same values as through the map
    planes_out = model(lay.from_map(x), t)
    assert all(torch.allclose(planes_out[n], lay.from_map(out)[n], atol=1e-6) for n in planes_out)


def test_padding_stays_zero_when_its_patches_are_kept():
    model = perturb(tiny_model(drop_padding=False)).eval()
    lay = model.layout
    out = model(torch.randn(2, 4, *lay.map_shape), torch.tensor([10, 500]))
    assert model.num_tokens == lay.num_patches and (out[..., ~lay.cell_mask] == 0).all()


@pytest.mark.parametrize("spatial", D.SPATIAL_COND)
def test_conditions_drop_and_null(spatial):
    model = perturb(tiny_model(spatial_cond=spatial, **ALL_CONDS)).eval()
    x = torch.randn(2, 4, *model.layout.map_shape)
    t = torch.tensor([7, 300])
    cond = conditions(model)
    full = model(x, t, cond)
    null = model(x, t, {})
    assert torch.equal(model(x, t, cond, drop=True), null)  # dropped == absent
    assert not torch.allclose(full, null)
    for name in D.CONDITIONS:  # each condition reaches the output; dropping it alone equals leaving it out
        alone = model(x, t, cond, drop={name: torch.tensor([True, True])})
        without = model(x, t, {k: v for k, v in cond.items() if k != name})
        assert torch.equal(alone, without), name
        assert not torch.allclose(alone, full), name
    per_sample = model(x, t, cond, drop=torch.tensor([False, True]))  # drop all conditions of sample 1
    assert torch.allclose(per_sample[0], full[0], atol=1e-6) and torch.allclose(per_sample[1], null[1], atol=1e-6)
    # a float (B, K, H, W) layout at the xy size equals the integer one one-hot encoded
    onehot = torch.nn.functional.one_hot(cond["layout"], model.config.layout_channels).permute(0, 3, 1, 2).float()
    assert torch.allclose(model(x, t, {**cond, "layout": onehot}), full, atol=1e-6)
    with pytest.raises(OcclabError):
        model(x, t, {"text": torch.zeros(2)})


def test_condition_dropout_in_training():
    model = perturb(tiny_model(command_cond=True, cond_dropout=0.5)).train()
    x = torch.randn(64, 4, *model.layout.map_shape)
    t = torch.full((64,), 100)
    cond = {"command": torch.ones(64, dtype=torch.long)}
    torch.manual_seed(0)
    out = model(x, t, cond)
    kept = torch.isclose(out, model(x, t, cond, drop=False), atol=1e-6).flatten(1).all(1)
    dropped = torch.isclose(out, model(x, t, cond, drop=True), atol=1e-6).flatten(1).all(1)
    assert (kept ^ dropped).all() and 10 < int(dropped.sum()) < 54


def fit_one_latent(model, x0: torch.Tensor, g: torch.Generator, steps: int = 30) -> tuple[float, float]:
    """(before, after): the masked diffusion loss of `model` on the map x0 at fixed (t, noise), around `steps` Adam
    steps on it."""
    diff, mask = Diffusion(steps=100), model.loss_mask()
    t_eval, noise_eval = torch.arange(0, 100, 100 // 8)[:8], torch.randn(x0.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            return diff.loss(lambda x, t: model(x, t), x0, t=t_eval, noise=noise_eval, mask=mask).item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = diff.loss(lambda x, t: model(x, t), x0, mask=mask, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, eval_loss()


def test_training_lowers_the_loss():
    """dit_tiny fits one fixed tiny latent: the loss at fixed (t, noise) falls over 30 Adam steps (1.0 -> 0.34)."""
    torch.manual_seed(0)
    model = D.DiT(D.dit_tiny(width=64, heads=4, cond_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    planes = {n: torch.randn(1, 4, *ab, generator=g).expand(8, -1, -1, -1) for n, ab in shapes((2, 4, 4, 2)).items()}
    before, after = fit_one_latent(model, model.layout.to_map(planes), g)
    assert after < 0.6 * before, (before, after)


# ---------------------------------------------------------------------------------------------------------
# the grid layout (OccSora's tokenizer latent, issue #7 section 4)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [(2, 4, 4), (3, 5, 3), (1, 2, 6)])
def test_grid_layout_puts_frames_side_by_side(sizes):
    T, X, Y = sizes
    g = torch.randn(2, 5, T, X, Y, generator=torch.Generator().manual_seed(0))
    lay = D.token_layout("grid", sizes, 2)
    m = lay.to_map({"grid": g})
    assert m.shape == (2, 5, X, T * Y) and lay.map_shape == (X, T * Y)
    for t in range(T):  # frame t is the column block [t * Y, (t + 1) * Y)
        assert torch.equal(m[..., t * Y:(t + 1) * Y], g[:, :, t])
    assert torch.equal(lay.from_map(m)["grid"], g)
    assert lay.num_padding == 0 and lay.num_tokens == -(-X // 2) * -(-T * Y // 2)
    if Y % 2 == 0:  # frame 0's patches: the layout condition's place
        gx, gy = -(-X // 2), Y // 2
        f0 = P.unpatchify(P.patchify(P.pad_to_multiple(m, 2), 2)[:, lay.xy_patches()], (gx, gy), 2)
        assert torch.equal(f0[..., :X, :Y], g[:, :, 0])


def test_grid_dit_sizing_and_errors():
    from occlab.models.occsora import occsora_small

    os_cfg = occsora_small()  # 32x32x8, 8 frames, rates (4, 8, 8): latent (128, 2, 4, 4)
    sizes = type("V", (), {"latent_sizes": os_cfg.latent_sizes, "latent_channels": os_cfg.code_dim,
                           "frames": os_cfg.frames})
    cfg = D.config_for_vae(sizes, "small", rollout="grid")
    assert cfg.sizes == (2, 4, 4) and cfg.channels == 128
    info = D.model_info(cfg)
    assert info["map_shape"] == [128, 4, 8] and info["tokens"] == 8 and info["padding_patches"] == 0
    with pytest.raises(OcclabError):
        D.DiTConfig(rollout="grid", sizes=(2, 4, 4, 2))  # a grid latent has three sizes
    with pytest.raises(OcclabError):
        D.DiTConfig(rollout="pro", sizes=(2, 4, 4))
    with pytest.raises(OcclabError):
        D.token_layout("grid", (2, 4, 4), 2).to_map({"grid": torch.zeros(1, 3, 2, 4, 5)})


def test_grid_dit_is_zero_at_init_and_fits_one_latent():
    """The same DiT over a grid latent: dict in, dict out; the loss at fixed (t, noise) on one latent falls."""
    torch.manual_seed(0)
    model = D.DiT(D.dit_tiny(rollout="grid", sizes=(2, 4, 4), channels=8, width=64, heads=4, cond_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    latent = {"grid": torch.randn(1, 8, 2, 4, 4, generator=g).expand(8, -1, -1, -1, -1)}
    out = model(latent, torch.arange(8))
    assert out["grid"].shape == (8, 8, 2, 4, 4) and torch.count_nonzero(out["grid"]) == 0
    x0 = model.layout.to_map(latent)
    assert x0.shape == (8, 8, 4, 8)
    before, after = fit_one_latent(model, x0, g)
    assert after < 0.6 * before, (before, after)
