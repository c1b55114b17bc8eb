"""X-Scene triplane diffusion: the triplane rollout, the conditioned denoiser, guidance, boxes (tiny sizes)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from occlab import planes as P
from occlab.diffusion import Diffusion, cfg_model
from occlab.errors import OcclabError
from occlab.models.xscene import XSceneVAE, xscene_paper, xscene_tiny
from occlab.models.xscene_diffusion import (
    BOX_CENTER,
    BOX_CLS,
    BOX_SIZE,
    BOX_YAW,
    PRESETS,
    TriplaneDiT,
    TriplaneDiTConfig,
    TriplaneLayout,
    box_corners,
    boxes_condition,
    config_for_vae,
    decode_labels,
    diffusion_loss,
    encode_latent,
    fourier_features,
    model_info,
    triplane_blocks,
    triplane_dit_tiny,
    triplane_rollout,
    triplane_unroll,
)

SIZES = (8, 8, 8)  # latent of xscene_tiny at 16 x 16 x 8
C = 4
K = 11



def tiny(**kw) -> TriplaneDiT:
    torch.manual_seed(0)
    return TriplaneDiT(triplane_dit_tiny(SIZES, C, layout_channels=K, box_classes=K, **kw))


def randomise(model: TriplaneDiT, seed: int = 1) -> TriplaneDiT:
    """Non-zero weights everywhere (the zero-initialised outputs would hide every effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def planes(batch=2, sizes=SIZES, channels=C, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, channels, *ab, generator=g)
            for n, ab in P.plane_shapes(dict(zip("xyz", sizes)), "xyz").items()}


def conditions(batch=2, boxes=3, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(1, K, (batch, boxes), generator=g)
    classes[:, -1] = -1  # one padding slot
    return {"layout": torch.randint(0, K, (batch, 16, 16), generator=g),
            "boxes": torch.rand(batch, boxes, 8, 3, generator=g) * 2 - 1, "box_classes": classes}


# ---------------------------------------------------------------------------------------------------------
# rollout
# ---------------------------------------------------------------------------------------------------------

def test_rollout_is_the_papers_square_map_at_occ3d():
    shapes = P.plane_shapes({"x": 100, "y": 100, "z": 16}, "xyz")
    blocks, size = triplane_blocks(shapes)
    assert size == (116, 116)  # (X_h + Z_h, Y_h + Z_h), App. A.2
    assert [(b.name, b.row, b.col, b.height, b.width, b.transposed) for b in blocks] == [
        ("xy", 0, 0, 100, 100, False), ("xz", 0, 100, 100, 16, False), ("yz", 100, 0, 16, 100, True)]
    lay = TriplaneLayout(shapes, 2)
    assert lay.grid == (58, 58) and int(lay.padding.sum()) == 64 and lay.num_tokens == 3300 and not lay.partial
    assert int(lay.cell_mask.sum()) == 100 * 100 + 2 * 100 * 16
    assert TriplaneLayout(P.plane_shapes({"x": 50, "y": 50, "z": 16}, "xyz"), 2).map_shape == (66, 66)


def test_rollout_round_trip_and_alignment():
    pl = planes(2, (6, 5, 3))
    m = triplane_rollout(pl)
    assert m.shape == (2, C, 9, 8)
    back = triplane_unroll(m, {n: p.shape for n, p in pl.items()})
    assert all(torch.equal(back[n], pl[n]) for n in pl)
    assert torch.equal(m[..., :6, :5], pl["xy"])  # xy and xz share the x rows, xy and yz^T the y columns
    assert torch.equal(m[..., :6, 5:], pl["xz"]) and torch.equal(m[..., 6:, :5], pl["yz"].transpose(-1, -2))
    assert not m[..., 6:, 5:].any()  # the uncovered corner is zero


def test_rollout_is_generic_over_axis_names_and_checks_shapes():
    shapes = P.plane_shapes({"u": 4, "v": 6, "w": 2}, "uvw")
    lay = TriplaneLayout(shapes, 1, "uvw")
    assert lay.map_shape == (6, 8) and lay.names == ["uv", "uw", "vw"]
    with pytest.raises(OcclabError, match="another plane"):
        TriplaneLayout({"xy": (4, 4), "xz": (5, 2), "yz": (4, 2)})
    with pytest.raises(OcclabError, match="three axes"):
        TriplaneLayout(P.plane_shapes({"t": 2, "x": 2, "y": 2, "z": 2}), 1, "txyz")


# ---------------------------------------------------------------------------------------------------------
# denoiser
# ---------------------------------------------------------------------------------------------------------

def test_zero_output_at_init_and_shapes_for_maps_and_planes():
    model = tiny().eval()
    pl = planes()
    m = model.to_map(pl)
    assert m.shape == (2, C, 16, 16) and model.num_tokens == 64 - 16
    with torch.no_grad():
        eps = model(m, torch.tensor([3, 7]), conditions())
        eps_planes = model(pl, torch.tensor([3, 7]), conditions())
    assert eps.shape == m.shape and not eps.any()  # adaLN-Zero
    assert {n: tuple(v.shape) for n, v in eps_planes.items()} == {n: tuple(v.shape) for n, v in pl.items()}


@pytest.mark.parametrize("sizes,kw", [((5, 6, 3), {}), (SIZES, {"drop_padding": False})])
def test_padding_cells_are_exactly_zero(sizes, kw):
    model = randomise(TriplaneDiT(triplane_dit_tiny(sizes, C, layout_channels=K, box_classes=K, **kw))).eval()
    assert model.layout.partial or not model.drops_padding
    x = model.to_map(planes(2, sizes))
    with torch.no_grad():
        eps = model(x, torch.tensor([1, 2]), conditions())
    assert eps.abs().sum() > 0 and not (eps * (1 - model.loss_mask())).any()


def test_guidance_off_conditions_have_no_effect():
    model = randomise(tiny()).eval()
    x, t = model.to_map(planes()), torch.tensor([10, 40])
    with torch.no_grad():
        a = model(x, t, conditions(seed=0), drop=True)
        b = model(x, t, conditions(seed=1), drop=True)
        none = model(x, t, None)
        padded = dict(conditions(seed=2))
        padded["box_classes"] = torch.full_like(padded["box_classes"], -1)
        no_boxes = model(x, t, {"layout": padded["layout"]}, drop={"layout": torch.tensor([False, False])})
        all_padding = model(x, t, padded, drop={"layout": torch.tensor([False, False])})
        with_cond = model(x, t, conditions(seed=0), drop=False)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, none, atol=1e-6)  # drop == absent == null
    assert torch.allclose(no_boxes, all_padding, atol=1e-6)  # padding boxes are null boxes
    assert (with_cond - a).abs().max() > 1e-3  # the conditions do act when kept


def test_each_condition_acts_on_its_own():
    model = randomise(tiny()).eval()
    x, t = model.to_map(planes()), torch.tensor([5, 5])
    base = conditions(seed=0)
    other_layout = {**base, "layout": conditions(seed=3)["layout"]}
    other_boxes = {**base, "boxes": conditions(seed=3)["boxes"]}
    with torch.no_grad():
        ref = model(x, t, base)
        assert (model(x, t, other_layout) - ref).abs().max() > 1e-4
        assert (model(x, t, other_boxes) - ref).abs().max() > 1e-4
        onehot = (base["layout"][:, None] == torch.arange(K)[None, :, None, None]).float()
        assert torch.allclose(model(x, t, {**base, "layout": onehot}), ref, atol=1e-5)  # classes == one-hot
    ablated = randomise(tiny(layout_cond=False, box_cond=False)).eval()
    assert ablated.layout_embedder is None and ablated.box_embedder is None
    with torch.no_grad():
        assert torch.equal(ablated(x, t, base), ablated(x, t, None))


def test_training_drops_all_conditions_together_with_p_one_quarter():
    model = randomise(tiny())
    n = 200
    x = model.to_map(planes(n))
    t = torch.full((n,), 20)
    cond = {k: v[:1].expand(n, *v.shape[1:]) for k, v in conditions(1).items()}
    with torch.no_grad():
        model.eval()
        full, null = model(x, t, cond, drop=False), model(x, t, cond, drop=True)
        half = model(x, t, cond, drop={"layout": torch.ones(n, dtype=torch.bool)})  # boxes kept, layout dropped
        model.train()
        torch.manual_seed(0)
        mixed = model(x, t, cond)
    is_full = (mixed - full).flatten(1).abs().amax(1) < 1e-5
    is_null = (mixed - null).flatten(1).abs().amax(1) < 1e-5
    assert bool((is_full ^ is_null).all())  # never one condition without the other
    assert not torch.allclose(half, null, atol=1e-4) and not torch.allclose(half, full, atol=1e-4)
    assert 0.15 < is_null.float().mean().item() < 0.35


def test_cfg_model_combines_the_two_passes():
    model = randomise(tiny()).eval()
    x, t, cond = model.to_map(planes()), torch.tensor([3, 9]), conditions()
    with torch.no_grad():
        c, u = model(x, t, cond, drop=False), model(x, t, cond, drop=True)
        assert torch.allclose(cfg_model(model, cond, 1.0)(x, t), c, atol=1e-6)
        assert torch.allclose(cfg_model(model, cond, 0.0)(x, t), u, atol=1e-6)
        assert torch.allclose(cfg_model(model, cond, 2.5)(x, t), u + 2.5 * (c - u), atol=1e-5)


def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    vae = XSceneVAE(xscene_tiny((16, 16, 8), num_classes=K)).eval()
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(4, 16, 16, 8, dtype=torch.long)
    labels[:, :, :8, 0], labels[:, :, 8:, 0] = 6, 8  # road, sidewalk
    for b in range(4):
        i = int(torch.randint(0, 12, (1,), generator=g))
        labels[b, i:i + 4, 10:14, 1:4] = 1  # a building at a different place per scene
    x0 = TriplaneDiT(triplane_dit_tiny(SIZES, C)).to_map(encode_latent(vae, labels))
    cond = {"layout": labels.amax(-1), "boxes": torch.zeros(4, 1, 8, 3), "box_classes": torch.full((4, 1), -1)}
    diffusion = Diffusion(100)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    fixed_t = torch.tensor([10, 30, 60, 90])
    fixed_noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))

    def held_out():
        model.eval()
        with torch.no_grad():
            loss = diffusion.loss(lambda x, t: model(x, t, cond), x0, t=fixed_t, noise=fixed_noise,
                                  mask=model.loss_mask())
        model.train()
        return loss.item()

    before = held_out()
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        loss = diffusion_loss(model, diffusion, x0, cond, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    assert after < 0.5 * before, (before, after)


def test_latent_helpers_round_trip_through_the_vae():
    torch.manual_seed(0)
    vae = XSceneVAE(xscene_tiny((16, 16, 8), num_classes=K)).eval()
    labels = torch.randint(0, K, (2, 16, 16, 8))
    lat = encode_latent(vae, labels)
    assert all(torch.equal(lat[n], vae.encode(labels)["mu"][n]) for n in lat)
    out = decode_labels(vae, lat)
    assert out.dtype == torch.uint8 and out.shape == (2, 16, 16, 8)
    assert torch.equal(out.long(), vae.decode(lat).argmax(1))


# ---------------------------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------------------------

def test_box_columns_are_the_datasets_box_fields():
    from occlab.data import BOX_FIELDS

    assert BOX_FIELDS[BOX_CLS] == "cls" and BOX_FIELDS[BOX_YAW] == "yaw"
    assert BOX_FIELDS[BOX_CENTER] == ("cx", "cy", "cz") and BOX_FIELDS[BOX_SIZE] == ("l", "w", "h")


def test_box_corners_rotate_about_the_centre():
    c = box_corners(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 2.0, 1.0]), torch.tensor(0.0))
    assert c.shape == (8, 3)
    assert torch.allclose(c.min(0).values, torch.tensor([-1.0, 1.0, 2.5]))
    assert torch.allclose(c.max(0).values, torch.tensor([3.0, 3.0, 3.5]))
    r = box_corners(torch.zeros(3), torch.tensor([4.0, 2.0, 1.0]), torch.tensor(math.pi / 2))
    assert torch.allclose(r.abs().amax(0), torch.tensor([1.0, 2.0, 0.5]), atol=1e-6)  # l now along y
    assert fourier_features(torch.zeros(2, 3), 4).shape == (2, 27)


def test_boxes_condition_normalises_filters_and_pads():
    rows = torch.zeros(1, 4, 10)
    rows[0, :, BOX_CLS] = torch.tensor([10.0, -1.0, 4.0, 10.0])
    rows[0, 0, 2:9] = torch.tensor([0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0])  # centred unit-ish box
    rows[0, 2, 2:9] = torch.tensor([5.0, -5.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    rows[0, 3, 2:9] = torch.tensor([50.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])  # outside the grid: left out
    corners, classes = boxes_condition(rows, (-10.0, -10.0, -2.0), (10.0, 10.0, 2.0), max_boxes=3)
    assert corners.shape == (1, 3, 8, 3) and classes.tolist() == [[10, 4, -1]]
    assert torch.allclose(corners[0, 0].amin(0), torch.tensor([-0.1, -0.1, -0.5]))
    assert torch.allclose(corners[0, 1].mean(0), torch.tensor([0.5, -0.5, 0.5]))
    assert not corners[0, 2].any()
    more, cls2 = boxes_condition(rows, (-10.0, -10.0, -2.0), (10.0, 10.0, 2.0), max_boxes=1)
    assert cls2.tolist() == [[10]] and torch.equal(more[0, 0], corners[0, 0])


@pytest.mark.parametrize("geometry", ["carlasc", "occ3d"])
def test_town_items_condition_the_denoiser(geometry, tmp_path_factory, monkeypatch):
    from occlab.data import get_geometry, make_dataset

    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path_factory.getbasetemp() / "town"))
    item = make_dataset("synthetic_town", split="train", frames=1, geometry=geometry, num_sequences=1, seq_len=1)[0]
    geo = get_geometry(geometry)
    corners, classes = boxes_condition(item["boxes"][:1], geo.min_bound, geo.max_bound, 16)  # frame 0
    assert (classes >= 0).any() and corners.abs().max() <= 1.5
    X, Y, _ = geo.grid
    model = randomise(TriplaneDiT(triplane_dit_tiny(SIZES, C, layout_channels=12, box_classes=12))).eval()
    cond = {"layout": item["layout"][:1], "boxes": corners, "box_classes": classes}  # BEV at full resolution
    assert cond["layout"].shape == (1, X, Y)
    with torch.no_grad():
        eps = model(model.to_map(planes(1)), torch.tensor([4]), cond)
        null = model(model.to_map(planes(1)), torch.tensor([4]), cond, drop=True)
    assert torch.isfinite(eps).all() and (eps - null).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------
# config, presets
# ---------------------------------------------------------------------------------------------------------

def test_presets_info_and_sizing_from_the_vae():
    assert set(PRESETS) == {"paper", "small", "tiny"}
    info = model_info(triplane_dit_tiny(SIZES, C))
    json.dumps(info)
    assert info["map_shape"] == [C, 16, 16] and info["tokens"] == 48 and info["padding_patches"] == 16
    assert sum(info["parameters_by_part"].values()) == info["parameters"]
    assert info["conditions"] == ["layout", "boxes"]
    cfg = config_for_vae(xscene_paper((200, 200, 16), downsample=4), "tiny")
    assert cfg.sizes == (50, 50, 16) and cfg.channels == 16 and cfg.layout_channels == cfg.box_classes == 18
    paper = config_for_vae(xscene_paper(), "paper")
    assert paper.layout().map_shape == (116, 116) and paper.cond_dropout == 0.25
    with pytest.raises(OcclabError, match="preset"):
        config_for_vae(xscene_paper(), "huge")


@pytest.mark.parametrize("field,value", [("width", 30), ("cond_dropout", 1.0), ("sizes", (4, 4)),
                                         ("depth", 0), ("box_freqs", -1)])
def test_bad_config_names_the_problem(field, value):
    with pytest.raises(OcclabError, match=field.split("_")[0] if field != "sizes" else "sizes"):
        TriplaneDiTConfig(**{field: value})


def test_bad_inputs_are_named():
    model = tiny()
    with pytest.raises(OcclabError, match="triplane DiT input"):
        model(torch.zeros(1, C, 15, 16), torch.tensor([1]))
    with pytest.raises(OcclabError, match="box_classes"):
        model(torch.zeros(1, C, 16, 16), torch.tensor([1]), {"boxes": torch.zeros(1, 2, 8, 3)})
    with pytest.raises(OcclabError, match="unknown conditions"):
        model(torch.zeros(1, C, 16, 16), torch.tensor([1]), {"command": torch.zeros(1)})
