"""X-Scene triplane diffusion (Yang et al., 2025, §3.2 and App. A.2): a conditional denoiser over the latent
triplane of the X-Scene VAE (occlab.models.xscene), with the layout map added to the first features, 3D boxes
by cross-attention and classifier-free guidance by dropping all conditions together (p = 0.25).

Triplane -> one 2D map (`TriplaneLayout`, computed from the plane shapes and `planes.axis_pairs(axes)`): for
axes "abc" the planes ab, ac, bc are laid out as rows [ab | ac], [bc^T | 0], a (A+C) x (B+C) map, square when
A = B; for "xyz" the paper's "unified square feature map by zero-padding the uncovered corners" (App. A.2,
h in R^{(X_h+Z_h) x (Y_h+Z_h) x C_h}, Occ3D 116 x 116 x 16): xy and xz share their rows (x), xy and yz^T their
columns (y), the corner Z_h x Z_h is padding.

Denoiser: we chose our DiT over this rollout (`TriplaneDiT`) rather than the released triplane-aware UNet.
- The paper's own description of its denoiser is the rollout plus "attention applied across this tensor to
  capture inter-plane correlations"; the released network (a Stable-Diffusion UNet2DConditionModel, channels
  64-512, with per-plane convolutions and attention over the rollout) gets its cross-plane mixing only from
  its attention layers. A DiT attends across the whole rollout in every block, so every plane sees the
  other two at every depth, and its patches never straddle two planes (sizes multiples of the patch), so no
  convolution has to be made plane-aware.
- Like with like: DynamicCity's HexPlane DiT (occlab.models.dit, checked against the released DiT-DC/2) is
  the other generator of X-Scene Tab. 2 / DynamicCity Tab. 2 in this kit; the same backbone (patch embed,
  fixed 2D sin-cos positions, adaLN-Zero blocks, zero-initialised final layer, epsilon prediction) makes the
  comparison one of representation and conditioning, not of network families. Its blocks are reused here.
- Padding patches (the Z_h x Z_h corner: 64 of 3,364 patches at Occ3D) are dropped before the transformer,
  so no compute goes to them, and the epsilon loss is masked to plane cells.
- Box cross-attention fits a transformer block directly (PixArt-alpha order: self-attention, cross-attention,
  MLP); outpainting (occlab.outpaint) only needs a mask on the map, which is layout-agnostic.
The cost: no multi-scale features; attention is quadratic in tokens (3,300 at Occ3D with patch 2, fine on a
GPU; patch 4 if memory is short).

Conditions (each switched on by the config):
- layout: a BEV map (B, K, X, Y) float (one-hot or soft) or (B, X, Y) integer classes (one-hot here, ids >= K
  give zeros), at any resolution: a small ConvNet E_layout (3x3 conv, SiLU, area-resize to the xy block,
  3x3 conv, SiLU), patchified and projected (zero-initialised, ControlNet-style) and added to the xy block's
  patch tokens, i.e. to the first features of the network (§3.2 "additive spatial conditioning"). The
  released map condition is also a rollout holding the BEV in its xy area.
- boxes: 8 corners (B, M, 8, 3), normalised to [-1, 1] over the chunk's grid, Fourier-encoded (x, sin 2^f pi x,
  cos 2^f pi x, f < box_freqs; released MagicDrive embedder: 4 frequencies, corners "all-xyz") -> MLP, plus
  a class embedding (B, M) -> concatenated -> MLP -> box tokens, attended by cross-attention in every block.
  Padding boxes (class < 0 or `box_mask` False) and dropped boxes are replaced by learned null position and
  class features, as MagicDrive / the released code do, so no attention mask is needed and "no boxes" is one
  well-defined input. `boxes_condition` builds them from occlab box rows (BOX_FIELDS), padded to `max_boxes`.
- classifier-free guidance: in training every sample drops all its conditions together with p = cond_dropout
  (0.25, the released `drop_cond_ratio`): layout contribution zero, every box null. occlab.diffusion.cfg_model
  runs the guided conditional / unconditional passes with `drop`.
The paper's text embedding (T5, concatenated to the box tokens) and perspective maps belong to the image and
LLM branches, out of scope here.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from occlab import planes as P
from occlab.errors import OcclabError
from occlab.models.blocks import count_parameters
from occlab.models.dit import Attention, FinalLayer, PlaneMapInput, TimestepEmbedder, modulate, sincos_2d
from occlab.planes import Block, pad_to_multiple, patch_padding, patchify, unpatchify

AXES = P.TRIPLANE_AXES  # "xyz"
CONDITIONS = ("layout", "boxes")
NUM_CLASSES_OCC3D_RAW = 18  # free + the 17 Occ3D-nuScenes classes (as occlab.models.xscene)
MAX_BOXES = 64  # boxes per scene after padding (as occlab.data.windows.MAX_BOXES)
# Columns of occlab box rows (occlab.data.BOX_FIELDS: frame, cls, cx, cy, cz, l, w, h, yaw, track); models
# import no data code, a test checks that these agree.
BOX_CLS, BOX_CENTER, BOX_SIZE, BOX_YAW = 1, slice(2, 5), slice(5, 8), 8


# ---------------------------------------------------------------------------------------------------------
# Triplane <-> one 2D map
# ---------------------------------------------------------------------------------------------------------

def triplane_sizes(shapes: Mapping, axes: str = AXES) -> dict[str, int]:
    """Per-axis sizes read off plane shapes {name: (a, b)} (or (C, a, b)) of `axis_pairs(axes)`, checked."""
    if len(axes) != 3:
        raise OcclabError(f"a triplane has three axes, got {axes!r}")
    sizes: dict[str, int] = {}
    for name in P.axis_pairs(axes):
        if name not in shapes:
            raise OcclabError(f"missing plane {name!r}; got {sorted(shapes)}")
        for axis, n in zip(name, tuple(shapes[name])[-2:]):
            if sizes.setdefault(axis, int(n)) != int(n):
                raise OcclabError(f"plane {name!r} has size {n} on axis {axis!r}, another plane has {sizes[axis]}")
    return {a: sizes[a] for a in axes}


def triplane_blocks(shapes: Mapping, axes: str = AXES) -> tuple[list[Block], tuple[int, int]]:
    """Rollout of a triplane: rows [ab | ac], [bc^T | 0] for axes "abc"; map (A + C, B + C)."""
    s = triplane_sizes(shapes, axes)
    ab, ac, bc = P.axis_pairs(axes)
    A, B, C = (s[a] for a in axes)
    return [Block(ab, 0, 0, A, B), Block(ac, 0, B, A, C), Block(bc, A, 0, C, B, True)], (A + C, B + C)


class TriplaneLayout:
    """How a triplane {name: (B, C, a, b)} becomes one (B, C, H, W) map of p x p patches, and back.

    `to_map` / `from_map` are exact inverses on the plane cells (`from_map` returns views of the map);
    `cell_mask` (H, W) True on plane cells; `grid` the patch grid (ceil(H/p), ceil(W/p)); `padding` (gh, gw)
    True for pure-padding patches; `partial` whether some patch mixes plane cells and padding (sizes that
    are not multiples of p; the map is then zero-padded at its right and bottom).
    """

    def __init__(self, shapes: Mapping, patch: int = 1, axes: str = AXES):
        if int(patch) < 1:
            raise OcclabError(f"patch size must be positive, got {patch}")
        self.axes, self.patch, self.names = axes, int(patch), P.axis_pairs(axes)
        self.shapes = {n: tuple(int(v) for v in tuple(shapes[n])[-2:]) for n in self.names if n in shapes}
        self.sizes = triplane_sizes(self.shapes, axes)
        self.blocks, self.map_shape = triplane_blocks(self.shapes, axes)
        self.cell_mask = P.block_mask(self.blocks, self.map_shape)
        p = self.patch
        self.grid = (-(-self.map_shape[0] // p), -(-self.map_shape[1] // p))
        self.padding = patch_padding(self.cell_mask, p)
        self.partial = P.has_partial_patches(self.cell_mask, p)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """Patches holding plane cells (the transformer's tokens once padding is dropped)."""
        return self.num_patches - int(self.padding.sum())

    def to_map(self, planes: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: (..., a, b)} -> (..., H, W), padding zero."""
        return P.place_blocks(planes, self.blocks, self.map_shape)

    def from_map(self, m: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., H, W) -> {name: (..., a, b)} (views of the map); inverse of `to_map`."""
        return P.take_blocks(m, self.blocks, self.map_shape, self.names)

    def first_patches(self) -> torch.Tensor:
        """Patch indices (row-major into `grid`) of the first plane (xy), row-major over its own patch grid."""
        a, b = self.shapes[self.names[0]]
        ga, gb = -(-a // self.patch), -(-b // self.patch)
        rows, cols = torch.meshgrid(torch.arange(ga), torch.arange(gb), indexing="ij")
        return (rows * self.grid[1] + cols).reshape(-1)


def triplane_rollout(planes: Mapping[str, torch.Tensor], axes: str = AXES) -> torch.Tensor:
    """{name: (B, C, a, b)} -> (B, C, A + C, B + C) (see `triplane_blocks`)."""
    return TriplaneLayout({n: tuple(planes[n].shape[-2:]) for n in P.axis_pairs(axes) if n in planes},
                          1, axes).to_map(planes)


def triplane_unroll(m: torch.Tensor, shapes: Mapping, axes: str = AXES) -> dict[str, torch.Tensor]:
    """Inverse of `triplane_rollout` (views of the map)."""
    return TriplaneLayout(shapes, 1, axes).from_map(m)


# ---------------------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------------------

def box_corners(centers: torch.Tensor, sizes: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Oriented boxes -> their 8 corners (..., 8, 3): (+-l/2, +-w/2, +-h/2) (x slowest, as itertools.product),
    rotated by yaw about z, plus the centre. centers, sizes (..., 3) = (cx, cy, cz), (l, w, h); yaw (...)."""
    signs = torch.tensor(list(itertools.product((-0.5, 0.5), repeat=3)), dtype=centers.dtype,
                         device=centers.device)  # (8, 3)
    local = sizes.unsqueeze(-2) * signs  # (..., 8, 3)
    c, s = torch.cos(yaw).unsqueeze(-1), torch.sin(yaw).unsqueeze(-1)  # (..., 1)
    x = c * local[..., 0] - s * local[..., 1]
    y = s * local[..., 0] + c * local[..., 1]
    return torch.stack([x, y, local[..., 2]], dim=-1) + centers.unsqueeze(-2)


def normalise_points(points: torch.Tensor, min_bound, max_bound) -> torch.Tensor:
    """Points (..., 3) in the grid's frame -> [-1, 1] over the grid's extent (the VAE's query convention)."""
    lo = torch.as_tensor(min_bound, dtype=points.dtype, device=points.device)
    hi = torch.as_tensor(max_bound, dtype=points.dtype, device=points.device)
    return 2 * (points - lo) / (hi - lo) - 1


def boxes_condition(rows: torch.Tensor, min_bound, max_bound, max_boxes: int = MAX_BOXES
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """occlab box rows (B, M, 10) (BOX_FIELDS; padding rows have cls -1) of one frame -> the denoiser's
    ("boxes" (B, max_boxes, 8, 3) corners normalised over [min_bound, max_bound), "box_classes" (B, max_boxes)
    long, -1 = padding). Boxes whose centre lies outside the grid in x or y are left out (a crop or a chunk
    keeps its boxes in the frame of the full scene); the first `max_boxes` valid ones are kept, in order."""
    if rows.dim() != 3 or rows.shape[-1] <= BOX_YAW:
        raise OcclabError(f"box rows must be (B, M, {BOX_YAW + 1}+) in BOX_FIELDS order, got {tuple(rows.shape)}")
    rows = rows.float()
    lo = torch.as_tensor(min_bound, dtype=rows.dtype, device=rows.device)
    hi = torch.as_tensor(max_bound, dtype=rows.dtype, device=rows.device)
    centre = rows[..., BOX_CENTER]
    inside = ((centre[..., :2] >= lo[:2]) & (centre[..., :2] < hi[:2])).all(-1)
    valid = (rows[..., BOX_CLS] >= 0) & inside  # (B, M)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :max_boxes]  # valid rows first
    picked = rows.gather(1, order[..., None].expand(-1, -1, rows.shape[-1]))  # (B, <= max_boxes, F)
    keep = valid.gather(1, order)  # (B, <= max_boxes)
    if keep.shape[1] < max_boxes:  # pad to max_boxes
        picked = F.pad(picked, (0, 0, 0, max_boxes - keep.shape[1]))
        keep = F.pad(keep, (0, max_boxes - keep.shape[1]), value=False)
    corners = normalise_points(box_corners(picked[..., BOX_CENTER], picked[..., BOX_SIZE], picked[..., BOX_YAW]),
                               lo, hi)
    corners = corners * keep[..., None, None].to(corners.dtype)
    classes = torch.where(keep, picked[..., BOX_CLS].long(), torch.full_like(keep, -1, dtype=torch.long))
    return corners, classes


def fourier_features(x: torch.Tensor, freqs: int) -> torch.Tensor:
    """(..., D) -> (..., D * (1 + 2 * freqs)): [x, sin(2^f pi x), cos(2^f pi x) for f < freqs] (MagicDrive)."""
    parts = [x]
    for f in range(freqs):
        parts += [torch.sin((2.0 ** f) * math.pi * x), torch.cos((2.0 ** f) * math.pi * x)]
    return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------------------

@dataclass
class TriplaneDiTConfig:
    """All sizes of the triplane denoiser. Defaults: the Occ3D latent of the paper's VAE (100 x 100 x 16, C 16)
    with DynamicCity's DiT-DC/2 widths (depth 16, width 384, 8 heads, patch 2)."""

    channels: int = 16  # C of every latent plane
    sizes: tuple[int, int, int] = (100, 100, 16)  # latent sizes along `axes` (X', Y', Z')
    axes: str = AXES
    patch_size: int = 2
    depth: int = 16
    width: int = 384
    heads: int = 8
    mlp_ratio: float = 4.0
    drop_padding: bool = True  # drop pure-padding patches before the transformer
    layout_cond: bool = True
    layout_channels: int = NUM_CLASSES_OCC3D_RAW  # K of a float BEV map, or classes of an integer one
    layout_hidden: int = 32  # width of E_layout
    box_cond: bool = True
    box_classes: int = NUM_CLASSES_OCC3D_RAW  # class ids of the boxes (occlab label ids)
    box_freqs: int = 4  # Fourier frequencies of the corners (released MagicDrive embedder: 4)
    max_boxes: int = MAX_BOXES  # padding of `boxes_condition` (the model takes any count)
    cond_dropout: float = 0.25  # all conditions of a sample dropped together, in training

    def __post_init__(self):
        self.sizes = tuple(int(v) for v in self.sizes)
        if len(self.axes) != 3 or len(self.sizes) != 3 or min(self.sizes) < 1:
            raise OcclabError(f"sizes must be three positive latent sizes along axes {self.axes!r}, got {self.sizes}")
        if self.width % self.heads or self.width % 4:
            raise OcclabError(f"width {self.width} must be divisible by {self.heads} heads and by 4 (2D sin-cos)")
        for name in ("channels", "patch_size", "depth", "layout_channels", "layout_hidden", "box_classes",
                     "max_boxes"):
            if int(getattr(self, name)) < 1:
                raise OcclabError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.box_freqs < 0:
            raise OcclabError(f"box_freqs must be at least 0, got {self.box_freqs}")
        if not 0 <= self.cond_dropout < 1:
            raise OcclabError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")

    @property
    def latent_sizes(self) -> dict[str, int]:
        return dict(zip(self.axes, self.sizes))

    def plane_shapes(self) -> dict[str, tuple[int, int]]:
        """{plane: (a, b)} of the latent triplane."""
        return P.plane_shapes(self.latent_sizes, self.axes)

    def layout(self) -> TriplaneLayout:
        return TriplaneLayout(self.plane_shapes(), self.patch_size, self.axes)

    @property
    def conditions(self) -> list[str]:
        return [n for n, on in zip(CONDITIONS, (self.layout_cond, self.box_cond)) if on]


def triplane_dit_paper(sizes=(100, 100, 16), channels: int = 16, **kw) -> TriplaneDiTConfig:
    """Occ3D latent (100 x 100 x 16, C 16; map 116 x 116), DiT-DC/2 widths: depth 16, width 384, 8 heads."""
    return TriplaneDiTConfig(sizes=tuple(sizes), channels=channels, **kw)


def triplane_dit_small(sizes=(16, 16, 8), channels: int = 8, **kw) -> TriplaneDiTConfig:
    """Study size (latent of `xscene_small` at 32 x 32 x 8): depth 6, width 192, 3 heads of 64, patch 2."""
    kw = {"depth": 6, "width": 192, "heads": 3, "layout_hidden": 16, **kw}
    return TriplaneDiTConfig(sizes=tuple(sizes), channels=channels, **kw)


def triplane_dit_tiny(sizes=(8, 8, 8), channels: int = 4, **kw) -> TriplaneDiTConfig:
    """Unit tests and smoke runs (latent of `xscene_tiny` at 16 x 16 x 8): depth 2, width 32, 2 heads."""
    kw = {"depth": 2, "width": 32, "heads": 2, "layout_hidden": 8, "box_freqs": 2, "max_boxes": 8, **kw}
    return TriplaneDiTConfig(sizes=tuple(sizes), channels=channels, **kw)


PRESETS = {"paper": triplane_dit_paper, "small": triplane_dit_small, "tiny": triplane_dit_tiny}


def config_for_vae(vae_config, preset: str = "small", **kw) -> TriplaneDiTConfig:
    """A denoiser preset sized for the latent of an X-Scene VAE config (its latent sizes, channels, classes)."""
    if preset not in PRESETS:
        raise OcclabError(f"unknown triplane DiT preset {preset!r}; expected one of {sorted(PRESETS)}")
    s = vae_config.latent_sizes
    kw = {"layout_channels": vae_config.num_classes, "box_classes": vae_config.num_classes, **kw}
    return PRESETS[preset](sizes=tuple(s[a] for a in AXES), channels=vae_config.latent_channels, **kw)


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------

class CrossAttention(nn.Module):
    """Multi-head attention of tokens (B, N, D) to a context (B, M, D); output projection zero-initialised."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class TriplaneDiTBlock(nn.Module):
    """adaLN-Zero DiT block with box cross-attention between self-attention and MLP (PixArt-alpha order):
    x + gate * Attn(mod(LN x)); x + CrossAttn(LN x, boxes); x + gate * MLP(mod(LN x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cross: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if cross else None
        self.cross = CrossAttention(dim, heads) if cross else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross is not None and context is not None:
            x = x + self.cross(self.norm_cross(x), context)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)


class LayoutEmbedder(nn.Module):
    """E_layout: BEV (B, K, H, W) -> 3x3 conv, SiLU, area-resize to the xy block (X', Y'), 3x3 conv, SiLU ->
    p x p patches -> Linear (zero-initialised) -> (B, patches of the xy block, D)."""

    def __init__(self, channels: int, hidden: int, width: int, size: tuple[int, int], patch: int):
        super().__init__()
        self.size, self.patch = size, patch
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.proj = nn.Linear(patch * patch * hidden, width)

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        e = F.silu(self.conv_in(bev))  # (B, h, H, W) at the map's own resolution
        if tuple(e.shape[-2:]) != tuple(self.size):
            e = F.adaptive_avg_pool2d(e, self.size)  # (B, h, X', Y'): area resize
        e = F.silu(self.conv(e))
        return self.proj(patchify(pad_to_multiple(e, self.patch), self.patch))  # (B, gx * gy, D)


class BoxEmbedder(nn.Module):
    """Boxes -> tokens: Fourier(8 corners) -> MLP, class embedding; padding / dropped boxes take the learned
    null features; concatenated -> MLP -> (B, M, D) (the released MagicDrive-style ContinuousBBox embedder)."""

    def __init__(self, classes: int, freqs: int, width: int):
        super().__init__()
        self.freqs = freqs
        self.position = nn.Sequential(nn.Linear(8 * 3 * (1 + 2 * freqs), width), nn.SiLU(), nn.Linear(width, width))
        self.classes = nn.Embedding(classes, width)
        self.null_position = nn.Parameter(torch.zeros(width))
        self.null_class = nn.Parameter(torch.zeros(width))
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, corners: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """corners (B, M, 8, 3) in [-1, 1], classes (B, M) long, valid (B, M) bool -> (B, M, D)."""
        pos = self.position(fourier_features(corners.flatten(-2), self.freqs))  # (B, M, D)
        cls = self.classes(classes.clamp(0, self.classes.num_embeddings - 1))
        v = valid[..., None]
        pos = torch.where(v, pos, self.null_position.to(pos.dtype))
        cls = torch.where(v, cls, self.null_class.to(cls.dtype))
        return self.out(torch.cat([pos, cls], dim=-1))


class TriplaneDiT(PlaneMapInput, nn.Module):
    """Triplane denoiser: forward(x, t, cond=None, drop=None) -> epsilon prediction shaped like x.

    x: the rollout map (B, C, H, W) (`TriplaneLayout.to_map`) or a planes dict {name: (B, C, a, b)}.
    t: (B,) timesteps. cond: {"layout": (B, K, X, Y) float or (B, X, Y) integer, "boxes": (B, M, 8, 3) corners in
    [-1, 1], "box_classes": (B, M) long (-1 = padding), optional "box_mask": (B, M) bool}; enabled conditions
    that are absent are null. drop: None (training: each sample drops all its conditions with p = cond_dropout;
    eval: none), a bool (every sample), a (B,) bool tensor (all conditions of those samples), or a dict
    {"layout" | "boxes": (B,) bool}. Outputs on padding cells are exactly zero.
    """

    input_name = "triplane DiT"  # how shape errors name the model

    def __init__(self, config: TriplaneDiTConfig):
        super().__init__()
        self.config = c = config
        self.layout = lay = config.layout()
        p, D = c.patch_size, c.width
        keep = (~lay.padding).reshape(-1).nonzero().squeeze(1) if c.drop_padding else torch.arange(lay.num_patches)
        self.register_buffer("keep", keep, persistent=False)  # (N,) kept patch indices, row-major
        self.drops_padding = c.drop_padding and bool(lay.padding.any())
        gw = lay.grid[1]
        self.register_buffer("pos_embed", sincos_2d(D, keep // gw, keep % gw), persistent=False)  # (N, D)
        self.register_buffer("cell_mask", lay.cell_mask.float(), persistent=False)  # (H, W)
        slot = torch.full((lay.num_patches,), -1, dtype=torch.long)
        slot[keep] = torch.arange(len(keep))
        self.register_buffer("xy_tokens", slot[lay.first_patches()], persistent=False)

        self.x_embedder = nn.Linear(p * p * c.channels, D)  # = Conv2d(C, D, p, stride p) on the kept patches
        self.t_embedder = TimestepEmbedder(D)
        xy = lay.shapes[lay.names[0]]
        self.layout_embedder = (LayoutEmbedder(c.layout_channels, c.layout_hidden, D, xy, p)
                                if c.layout_cond else None)
        self.box_embedder = BoxEmbedder(c.box_classes, c.box_freqs, D) if c.box_cond else None
        self.blocks = nn.ModuleList([TriplaneDiTBlock(D, c.heads, c.mlp_ratio, c.box_cond) for _ in range(c.depth)])
        self.final_layer = FinalLayer(D, p, c.channels)
        self.initialize_weights()

    def initialize_weights(self):
        """As DiT: Xavier-uniform Linear weights, zero biases; timestep MLP N(0, 0.02); adaLN modulations and the
        final linear zero (the model outputs 0 at init); the layout projection and the cross-attention outputs
        zero (conditions start without effect, ControlNet / adaLN-Zero style); null box features N(0, 0.02)."""
        def basic(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zero.append(block.adaLN_modulation[-1])
            if block.cross is not None:
                zero.append(block.cross.proj)
        if self.layout_embedder is not None:
            zero.append(self.layout_embedder.proj)
        for mod in zero:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)
        if self.box_embedder is not None:
            nn.init.normal_(self.box_embedder.classes.weight, std=0.02)
            nn.init.normal_(self.box_embedder.null_position, std=0.02)
            nn.init.normal_(self.box_embedder.null_class, std=0.02)

    # -- helpers ------------------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return int(self.keep.numel())

    def loss_mask(self) -> torch.Tensor:
        """(H, W) float, 1 on plane cells: the mask of the epsilon loss on maps (padding carries no target)."""
        return self.cell_mask

    def to_map(self, planes: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.layout.to_map(planes)

    def from_map(self, m: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.from_map(m)

    def _drops(self, batch: int, drop, device) -> dict[str, torch.Tensor]:
        names = self.config.conditions
        if drop is None:
            if self.training and self.config.cond_dropout > 0:
                together = torch.rand(batch, device=device) < self.config.cond_dropout  # all conditions at once
                return {n: together for n in names}
            drop = False
        if isinstance(drop, bool):
            return {n: torch.full((batch,), drop, dtype=torch.bool, device=device) for n in names}
        if isinstance(drop, Mapping):
            unknown = set(drop) - set(CONDITIONS)
            if unknown:
                raise OcclabError(f"unknown conditions in drop: {sorted(unknown)}; expected {CONDITIONS}")
            none = torch.zeros(batch, dtype=torch.bool, device=device)
            return {n: torch.as_tensor(drop[n], device=device).to(torch.bool).expand(batch) if n in drop else none
                    for n in names}
        drop = torch.as_tensor(drop, device=device).to(torch.bool).reshape(batch)
        return {n: drop for n in names}

    def _layout(self, bev: torch.Tensor, dtype) -> torch.Tensor:
        K = self.config.layout_channels
        if not bev.is_floating_point():  # (B, H, W) classes -> one-hot; ids >= K (ignore) give zeros
            bev = bev.long()[:, None] == torch.arange(K, device=bev.device)[None, :, None, None]
        if bev.dim() != 4 or bev.shape[1] != K:
            raise OcclabError(f"layout must be (B, {K}, H, W) float or (B, H, W) integer, got {tuple(bev.shape)}")
        return self.layout_embedder(bev.to(dtype))  # (B, xy patches, D)

    def _box_tokens(self, cond: Mapping, keep: torch.Tensor, batch: int, device, dtype) -> torch.Tensor:
        corners, classes = cond.get("boxes"), cond.get("box_classes")
        if corners is None:  # no boxes: one null box
            corners = torch.zeros(batch, 1, 8, 3, device=device, dtype=dtype)
            classes = torch.full((batch, 1), -1, dtype=torch.long, device=device)
        if classes is None:
            raise OcclabError("boxes need their classes: give cond['box_classes'] (B, M) beside cond['boxes']")
        if corners.dim() != 4 or tuple(corners.shape[2:]) != (8, 3) or tuple(classes.shape) != corners.shape[:2]:
            raise OcclabError(f"boxes must be (B, M, 8, 3) with box_classes (B, M), got {tuple(corners.shape)} "
                              f"and {tuple(classes.shape)}")
        classes = classes.to(device).long()
        valid = (classes >= 0) & (classes < self.config.box_classes)
        if cond.get("box_mask") is not None:
            valid = valid & cond["box_mask"].to(device).bool()
        valid = valid & keep[:, None]
        return self.box_embedder(corners.to(device=device, dtype=dtype), classes, valid)  # (B, M, D)

    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, x, t: torch.Tensor, cond: Mapping | None = None, drop=None):
        cfg = self.config
        cond = dict(cond or {})
        unknown = set(cond) - {"layout", "boxes", "box_classes", "box_mask"}
        if unknown:
            raise OcclabError(f"unknown conditions {sorted(unknown)}; expected layout, boxes, box_classes, box_mask")
        as_planes = isinstance(x, Mapping)
        m = self._as_map(x)  # (B, C, H, W)
        B = m.shape[0]
        t = torch.as_tensor(t, device=m.device).reshape(-1).expand(B)
        h = self.x_embedder(self._tokens(m)) + self.pos_embed.to(m.dtype)  # (B, N, D)
        c = self.t_embedder(t).unsqueeze(1)  # (B, 1, D)
        drops = self._drops(B, drop, m.device)

        if self.layout_embedder is not None and cond.get("layout") is not None:
            emb = self._layout(cond["layout"].to(m.device), h.dtype)  # (B, xy patches, D)
            emb = emb * (~drops["layout"])[:, None, None].to(emb.dtype)
            h = h.index_add(1, self.xy_tokens, emb)  # added to the xy block's first features
        context = None
        if self.box_embedder is not None:
            context = self._box_tokens(cond, ~drops["boxes"], B, m.device, h.dtype)  # (B, M, D)

        for block in self.blocks:
            h = block(h, c, context)
        out = self.final_layer(h, c)  # (B, N, p * p * C)
        if self.drops_padding:  # dropped patches come back as zeros
            out = out.new_zeros(B, self.layout.num_patches, out.shape[-1]).index_copy(1, self.keep, out)
        H, W = self.layout.map_shape
        eps = unpatchify(out, self.layout.grid, cfg.patch_size)[..., :H, :W]
        if self.layout.partial or not self.drops_padding:  # padding cells carry no prediction
            eps = eps * self.cell_mask.to(eps.dtype)
        return self.layout.from_map(eps) if as_planes else eps


# ---------------------------------------------------------------------------------------------------------
# VAE latent <-> map, training loss
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_latent(vae, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Latent triplane of labels (B, X, Y, Z) under an X-Scene VAE: mu with a Gaussian head, else the planes."""
    enc = vae.encode(labels)
    return dict(enc["mu"] if enc.get("mu") is not None else enc["planes"])


@torch.no_grad()
def decode_labels(vae, planes: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Latent triplane -> labels (B, X, Y, Z) uint8 (argmax of the decoder on the whole grid)."""
    return vae.decode(dict(planes)).argmax(1).to(torch.uint8)


def diffusion_loss(model: TriplaneDiT, diffusion, x0, cond: Mapping | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Epsilon MSE of `model` on clean latents x0 (map or planes) at random timesteps, masked to plane cells
    (occlab.diffusion.Diffusion.loss); conditions dropped as the model's training mode says."""
    m = model._as_map(x0)
    return diffusion.loss(lambda x, t: model(x, t, cond), m, mask=model.loss_mask(), generator=generator)


def model_info(config: TriplaneDiTConfig) -> dict:
    """Parameter counts (total and by part), rollout shape, tokens and conditions."""
    model = TriplaneDiT(config)
    lay = model.layout
    parts = {name: count_parameters(mod) for name, mod in model.named_children()}
    return {
        "model": "xscene_dit",
        "parameters": count_parameters(model),
        "parameters_by_part": {k: v for k, v in parts.items() if v},
        "plane_shapes": {n: [config.channels, *ab] for n, ab in config.plane_shapes().items()},
        "map_shape": [config.channels, *lay.map_shape],
        "patch_grid": list(lay.grid),
        "patches": lay.num_patches,
        "padding_patches": int(lay.padding.sum()),
        "tokens": model.num_tokens,
        "conditions": config.conditions,
        "config": asdict(config),
    }


__all__ = ["AXES", "CONDITIONS", "MAX_BOXES", "PRESETS", "BoxEmbedder", "CrossAttention", "LayoutEmbedder",
           "TriplaneDiT", "TriplaneDiTBlock", "TriplaneDiTConfig", "TriplaneLayout", "box_corners",
           "boxes_condition", "config_for_vae", "decode_labels", "diffusion_loss", "encode_latent",
           "fourier_features", "model_info", "normalise_points", "triplane_blocks", "triplane_dit_paper",
           "triplane_dit_small", "triplane_dit_tiny", "triplane_rollout", "triplane_sizes", "triplane_unroll"]
