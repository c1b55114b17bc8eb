"""The "grid" token layout: a video-like latent (C, T', X', Y') (OccSora's tokenizer) as one map for the DiT.

OccSora's own generator (Wang et al., 2024) is a diffusion transformer over the tokenizer's 4D latent, the
continuous code vectors of its scene tokens (the paper text is not in shared/papers; DESIGN §3). We keep the kit's
one DiT (HexPlane machinery: one 2D map of p x p patches, 2D sin-cos positions) and lay the T' frames side by side,

    (B, C, T', X', Y') -> (B, C, X', T' * Y')    ("b c t x y -> b c x (t y)")

so that a patch never mixes cells of two frames when p divides Y', and the position embedding's column says
frame and y together. The map has no padding cells (patches past the map edge are dropped as the HexPlane
layouts' padding is). `GridLayout` has `TokenLayout`'s interface (occlab.planes), so the DiT, the latent
dataset and the sampler take it unchanged; `token_layout` picks the layout of a DiT config.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from einops import rearrange

from occlab.errors import OcclabError
from occlab.planes import AXES, ROLLOUTS, TokenLayout, has_partial_patches, patch_padding, plane_shapes

GRID = "grid"  # the layout name, and the latent kind of OccSora's tokenizer
LATENT_NAME = "grid"  # the latent dict's one entry {"grid": (B, C, T', X', Y')}


class GridLayout(TokenLayout):
    """How a latent grid (C, T', X', Y') becomes one map (C, X', T' * Y') of p x p patches (see module doc).

    A TokenLayout with its own map: it sets the attributes TokenLayout's patch counts (num_patches, num_padding,
    num_tokens) read, and its own to_map / from_map / xy_patches."""

    kind = GRID

    def __init__(self, sizes: Sequence[int], patch: int):
        sizes = tuple(int(v) for v in sizes)
        if len(sizes) != 3 or min(sizes) < 1:
            raise OcclabError(f"a grid latent has sizes (T', X', Y'), got {sizes}")
        if int(patch) < 1:
            raise OcclabError(f"patch size must be positive, got {patch}")
        self.patch = p = int(patch)
        self.sizes = dict(zip("txy", sizes))
        T, X, Y = sizes
        self.shapes = {LATENT_NAME: (X, T * Y)}
        self.map_shape = (X, T * Y)
        self.cell_mask = torch.ones(self.map_shape, dtype=torch.bool)  # (H, W): every cell is a latent cell
        self.grid = (-(-self.map_shape[0] // p), -(-self.map_shape[1] // p))
        self.padding = patch_padding(self.cell_mask, p)  # (gh, gw): none, the map edge is padded by the DiT
        self.partial = has_partial_patches(self.cell_mask, p)

    def to_map(self, latent: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{"grid": (B, C, T', X', Y')} -> (B, C, X', T' * Y')."""
        g = latent[LATENT_NAME]
        want = tuple(self.sizes.values())
        if g.dim() != 5 or tuple(g.shape[2:]) != want:
            raise OcclabError(f"grid latent must be (B, C, {', '.join(map(str, want))}), got {tuple(g.shape)}")
        return rearrange(g, "b c t x y -> b c x (t y)")

    def from_map(self, m: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, C, X', T' * Y') -> {"grid": (B, C, T', X', Y')}; inverse of `to_map`."""
        if tuple(m.shape[-2:]) != self.map_shape:
            raise OcclabError(f"map of shape {tuple(m.shape[-2:])} does not match the grid layout's {self.map_shape}")
        return {LATENT_NAME: rearrange(m, "b c x (t y) -> b c t x y", t=self.sizes["t"])}

    def xy_patches(self) -> torch.Tensor:
        """Indices (row-major into the patch grid) of frame 0's patches, row-major over its (ceil(X'/p), ceil(Y'/p))
        patch grid: where a BEV layout condition is added (as on the HexPlane's xy block)."""
        gx, gy = -(-self.sizes["x"] // self.patch), -(-self.sizes["y"] // self.patch)
        rows, cols = torch.meshgrid(torch.arange(gx), torch.arange(gy), indexing="ij")
        return (rows * self.grid[1] + cols).reshape(-1)


def token_layout(rollout: str, sizes: Sequence[int], patch: int) -> TokenLayout:
    """The token layout of a DiT: "grid" for a latent grid (sizes (T', X', Y')), else a HexPlane layout ("pro" |
    "unfold" | "vconcat", sizes (T', X', Y', Z'))."""
    if rollout == GRID:
        return GridLayout(sizes, patch)
    if rollout not in ROLLOUTS:
        raise OcclabError(f"rollout must be one of {(*ROLLOUTS, GRID)}, got {rollout!r}")
    return TokenLayout(rollout, plane_shapes(dict(zip(AXES, sizes)), AXES), patch)


__all__ = ["GRID", "GridLayout", "LATENT_NAME", "token_layout"]
