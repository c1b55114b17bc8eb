"""Axis-pair feature planes for any set of axes (K-Planes style): HexPlane ("txyz", 6 planes), triplane ("xyz", 3).

A plane is named by its two axes in the order they appear in `axes` ("tx", "xy", ...) and stored as a tensor
(B, C, size_a, size_b). Everything here is computed from shapes; nothing is learned.

- `axis_pairs`, `plane_shapes`, `reduce_sizes`, `latent_floats`, `compression_ratio`: bookkeeping.
- `expand`: broadcast every plane over its missing axes and combine them (Hadamard product or sum) into a
  dense (B, C, *sizes) volume (DynamicCity's Expansion & Squeeze decoder).
- `voxel_centres`, `sample`: bilinear look-up of every plane at continuous coordinates (query decoders).
- HexPlane -> one 2D map and back, for the DiT (DynamicCity Tab. 5): padded rollout (`rollout`/`unroll`, rows
  [xy | xz | tx^T], [ty | tz | 0], [yz^T | 0 | 0]), vertical concatenation (`vconcat`), direct unfold
  (`unfold`/`fold`), their cell and padding-patch masks, and `TokenLayout`, which wraps the three.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from occlab.errors import OcclabError

HEXPLANE_AXES = "txyz"
TRIPLANE_AXES = "xyz"
OPS = ("hadamard", "sum")


def axis_pairs(axes: str) -> list[str]:
    """The plane names of `axes`: every pair in order, e.g. "txyz" -> ["tx","ty","tz","xy","xz","yz"]."""
    if len(set(axes)) != len(axes) or len(axes) < 2:
        raise OcclabError(f"axes must be at least two distinct letters, got {axes!r}")
    return ["".join(pair) for pair in itertools.combinations(axes, 2)]


def plane_shapes(sizes: Mapping[str, int], axes: str = HEXPLANE_AXES) -> dict[str, tuple[int, int]]:
    """Spatial shape (size_a, size_b) of every plane of `axes`, from the per-axis sizes."""
    missing = [a for a in axes if a not in sizes]
    if missing:
        raise OcclabError(f"plane_shapes: no size for axes {missing} (sizes {dict(sizes)})")
    return {name: (int(sizes[name[0]]), int(sizes[name[1]])) for name in axis_pairs(axes)}


def reduce_sizes(sizes: Mapping[str, int], rates: Mapping[str, int]) -> dict[str, int]:
    """Per-axis sizes divided by per-axis rates (axes without a rate keep their size); must divide exactly."""
    out = {}
    for axis, n in sizes.items():
        r = int(rates.get(axis, 1))
        if r < 1 or n % r:
            raise OcclabError(f"axis {axis!r} of size {n} is not divisible by its rate {r}")
        out[axis] = n // r
    return out


def latent_floats(sizes: Mapping[str, int], axes: str = HEXPLANE_AXES, channels: int = 1) -> int:
    """Number of floats in the planes of `axes` at `sizes` with `channels` channels each."""
    return channels * sum(a * b for a, b in plane_shapes(sizes, axes).values())


def compression_ratio(input_sizes: Mapping[str, int], latent_sizes: Mapping[str, int], channels: int,
                      axes: str | None = None) -> float:
    """C.R. = input voxels / latent floats (DESIGN §4), e.g. CarlaSC T=16, C=16, rates 2,2,2,2 -> 23.14."""
    from occlab.metrics.recon import compression_ratio as _ratio  # the one definition of the kit

    axes = axes or "".join(input_sizes)
    shapes = [(channels, a, b) for a, b in plane_shapes(latent_sizes, axes).values()]
    return _ratio([input_sizes[a] for a in axes], shapes)


def combine(features: Sequence[torch.Tensor], op: str = "hadamard") -> torch.Tensor:
    """Combine broadcastable feature tensors by Hadamard product ("hadamard") or sum ("sum")."""
    if op not in OPS:
        raise OcclabError(f"unknown plane combination {op!r}; expected one of {OPS}")
    out = features[0]
    for f in features[1:]:
        out = out * f if op == "hadamard" else out + f
    return out


def sizes_of(planes: Mapping[str, torch.Tensor], axes: str = HEXPLANE_AXES) -> dict[str, int]:
    """Per-axis sizes read off a set of planes (B, C, a, b), checking that the planes agree."""
    sizes: dict[str, int] = {}
    for name in axis_pairs(axes):
        if name not in planes:
            raise OcclabError(f"missing plane {name!r}; got {sorted(planes)}")
        for axis, n in zip(name, planes[name].shape[-2:]):
            if sizes.setdefault(axis, int(n)) != n:
                raise OcclabError(f"plane {name!r} has size {n} on axis {axis!r}, another plane has {sizes[axis]}")
    return {a: sizes[a] for a in axes}


def expand(planes: Mapping[str, torch.Tensor], axes: str = HEXPLANE_AXES, op: str = "hadamard") -> torch.Tensor:
    """Broadcast each plane (B, C, a, b) over the axes it lacks and combine: -> (B, C, *sizes in `axes` order)."""
    sizes = sizes_of(planes, axes)
    views = []
    for name in axis_pairs(axes):
        p = planes[name]  # (B, C, a, b)
        shape = [sizes[a] if a in name else 1 for a in axes]
        views.append(p.reshape(*p.shape[:2], *shape))  # e.g. "ty": (B, C, T, 1, Y, 1)
    return combine(views, op).expand(*views[0].shape[:2], *sizes.values())  # (B, C, T, X, Y, Z)


def voxel_centres(sizes: Mapping[str, int], axes: str = HEXPLANE_AXES, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised coordinates (N, len(axes)) of every cell centre of a grid, N = prod(sizes), C order.

    Convention of grid_sample with align_corners=False: -1 and 1 are the outer edges of the grid, so centre i
    of an axis of n cells is (2i + 1) / n - 1, and the same physical point on a plane downsampled by any rate.
    """
    ticks = [(2 * torch.arange(sizes[a], device=device, dtype=dtype) + 1) / sizes[a] - 1 for a in axes]
    grid = torch.meshgrid(*ticks, indexing="ij")  # len(axes) x (n_a, n_b, ...)
    return torch.stack(grid, dim=-1).reshape(-1, len(axes))  # (N, len(axes))


def sample(planes: Mapping[str, torch.Tensor], coords: torch.Tensor, axes: str = HEXPLANE_AXES,
           op: str | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
    """Bilinear look-up of every plane at continuous coordinates.

    coords: (N, len(axes)) or (B, N, len(axes)) in [-1, 1] (see `voxel_centres`), ordered as `axes`.
    Returns {name: (B, C, N)}, or with `op` ("hadamard"/"sum") the combined (B, C, N).
    Outside [-1, 1] the border value is repeated.
    """
    first = planes[axis_pairs(axes)[0]]
    if coords.dim() == 2:
        coords = coords.unsqueeze(0).expand(first.shape[0], -1, -1)  # (B, N, len(axes))
    out = {}
    for name in axis_pairs(axes):
        i, j = axes.index(name[0]), axes.index(name[1])
        # grid_sample reads (x, y) = (column, row) = (axis b, axis a) of a (B, C, a, b) plane
        grid = torch.stack([coords[..., j], coords[..., i]], dim=-1).unsqueeze(2)  # (B, N, 1, 2)
        grid = grid.to(planes[name].dtype)
        feats = F.grid_sample(planes[name], grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[name] = feats.squeeze(-1)  # (B, C, N)
    return out if op is None else combine(list(out.values()), op)


def plane_floats(planes: Mapping[str, torch.Tensor]) -> int:
    """Floats per sample held by a set of planes (the denominator of the compression ratio)."""
    return sum(math.prod(p.shape[1:]) for p in planes.values())


# ---------------------------------------------------------------------------------------------------------
# HexPlane <-> one 2D map (DESIGN §3 HexPlane DiT; DynamicCity Tab. 5), computed from plane shapes
# ---------------------------------------------------------------------------------------------------------

AXES = HEXPLANE_AXES
PLANES = axis_pairs(AXES)  # ["tx", "ty", "tz", "xy", "xz", "yz"]
STACK_ORDER = ("xy", "xz", "yz", "tx", "ty", "tz")  # the released hexplane tuple order: vconcat and unfold
ROLLOUTS = ("pro", "unfold", "vconcat")


def axis_sizes(shapes: Mapping) -> dict[str, int]:
    """Per-axis sizes {t, x, y, z} read off plane shapes {name: (a, b)} (or (C, a, b)), checking agreement."""
    sizes: dict[str, int] = {}
    for name in PLANES:
        if name not in shapes:
            raise OcclabError(f"missing plane {name!r}; got {sorted(shapes)}")
        for axis, n in zip(name, tuple(shapes[name])[-2:]):
            if sizes.setdefault(axis, int(n)) != int(n):
                raise OcclabError(f"plane {name!r} has size {n} on axis {axis!r}, another plane has {sizes[axis]}")
    return {a: sizes[a] for a in AXES}


def shapes_of(planes: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """{name: (a, b)} of a set of planes (B, C, a, b)."""
    shapes = {n: tuple(int(v) for v in planes[n].shape[-2:]) for n in PLANES if n in planes}
    axis_sizes(shapes)  # raises on a missing plane or disagreeing sizes
    return shapes


@dataclass(frozen=True)
class Block:
    """Where one plane sits on a map: top-left (row, col) and extent; a transposed plane is stored as (b, a)."""

    name: str
    row: int
    col: int
    height: int
    width: int
    transposed: bool = False


def pro_blocks(shapes: Mapping) -> tuple[list[Block], tuple[int, int]]:
    """Padded rollout: rows [xy | xz | tx^T], [ty | tz | 0], [yz^T | 0 | 0]; map (X+T+Z, Y+Z+T)."""
    s = axis_sizes(shapes)
    T, X, Y, Z = s["t"], s["x"], s["y"], s["z"]
    blocks = [Block("xy", 0, 0, X, Y), Block("xz", 0, Y, X, Z), Block("tx", 0, Y + Z, X, T, True),
              Block("ty", X, 0, T, Y), Block("tz", X, Y, T, Z),
              Block("yz", X + T, 0, Z, Y, True)]
    return blocks, (X + T + Z, Y + Z + T)


def vconcat_blocks(shapes: Mapping) -> tuple[list[Block], tuple[int, int]]:
    """Vertical concatenation: planes stacked along the rows as they are, width = the widest plane."""
    axis_sizes(shapes)
    blocks, row = [], 0
    for name in STACK_ORDER:
        a, b = (int(v) for v in tuple(shapes[name])[-2:])
        blocks.append(Block(name, row, 0, a, b))
        row += a
    return blocks, (row, max(b.width for b in blocks))


def place_blocks(planes: Mapping[str, torch.Tensor], blocks: list[Block], size: tuple[int, int]) -> torch.Tensor:
    """Planes {name: (..., a, b)} placed on one (..., H, W) map as `blocks` say, padding zero."""
    first = planes[blocks[0].name]
    out = first.new_zeros(*first.shape[:-2], *size)  # (B, C, H, W), padding zero
    for b in blocks:
        p = planes[b.name].transpose(-1, -2) if b.transposed else planes[b.name]
        if tuple(p.shape[-2:]) != (b.height, b.width):
            raise OcclabError(f"plane {b.name!r} has shape {tuple(planes[b.name].shape[-2:])}, the layout "
                              f"expects {(b.width, b.height) if b.transposed else (b.height, b.width)}")
        out[..., b.row:b.row + b.height, b.col:b.col + b.width] = p
    return out


def take_blocks(m: torch.Tensor, blocks: list[Block], size: tuple[int, int],
                names: Sequence[str] = PLANES) -> dict[str, torch.Tensor]:
    """Inverse of `place_blocks`: {name: (..., a, b)} views of the map, in the order of `names`."""
    if tuple(m.shape[-2:]) != tuple(size):
        raise OcclabError(f"map of shape {tuple(m.shape[-2:])} does not match the layout's {tuple(size)}")
    out = {}
    for b in blocks:
        v = m[..., b.row:b.row + b.height, b.col:b.col + b.width]
        out[b.name] = v.transpose(-1, -2) if b.transposed else v
    return {n: out[n] for n in names}


def block_mask(blocks: list[Block], size: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool, True on the cells the blocks cover."""
    mask = torch.zeros(size, dtype=torch.bool)
    for b in blocks:
        mask[b.row:b.row + b.height, b.col:b.col + b.width] = True
    return mask  # (H, W), True on plane cells


def rollout(planes: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Padded rollout of a HexPlane {name: (B, C, a, b)} -> (B, C, X+T+Z, Y+Z+T), padding zero."""
    blocks, size = pro_blocks(shapes_of(planes))
    return place_blocks(planes, blocks, size)


def unroll(m: torch.Tensor, shapes: Mapping) -> dict[str, torch.Tensor]:
    """Inverse of `rollout`: (B, C, X+T+Z, Y+Z+T) -> {name: (B, C, a, b)} (views of the map)."""
    blocks, size = pro_blocks(shapes)
    return take_blocks(m, blocks, size)


def rollout_cell_mask(shapes: Mapping) -> torch.Tensor:
    """(X+T+Z, Y+Z+T) bool, True where the rollout holds a plane value (the released `get_rollout_mask`)."""
    return block_mask(*pro_blocks(shapes))


def vconcat(planes: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Vertical concatenation {name: (B, C, a, b)} -> (B, C, sum of heights, widest width), padding zero."""
    blocks, size = vconcat_blocks(shapes_of(planes))
    return place_blocks(planes, blocks, size)


def unvconcat(m: torch.Tensor, shapes: Mapping) -> dict[str, torch.Tensor]:
    """Inverse of `vconcat` (views of the map)."""
    blocks, size = vconcat_blocks(shapes)
    return take_blocks(m, blocks, size)


def vconcat_cell_mask(shapes: Mapping) -> torch.Tensor:
    """(sum of heights, widest width) bool, True where the vertical concatenation holds a plane value."""
    return block_mask(*vconcat_blocks(shapes))


def patch_padding(cell_mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(ceil(H/p), ceil(W/p)) bool: True for the patches of a map that hold no plane cell (pure padding)."""
    h, w = cell_mask.shape
    gh, gw = -(-h // patch), -(-w // patch)
    cells = F.pad(cell_mask.float(), (0, gw * patch - w, 0, gh * patch - h))[None, None]
    return F.max_pool2d(cells, patch)[0, 0] == 0


def has_partial_patches(cell_mask: torch.Tensor, patch: int) -> bool:
    """Whether some p x p patch of a map holds both plane cells and padding (sizes not multiples of p)."""
    full = F.avg_pool2d(pad_to_multiple(cell_mask.float(), patch)[None, None], patch)[0, 0]
    return bool(((full > 0) & (full < 1)).any())


def rollout_padding_mask(shapes: Mapping, patch: int) -> torch.Tensor:
    """Which p x p patches of the padded rollout are pure padding (dropped before the transformer)."""
    return patch_padding(rollout_cell_mask(shapes), patch)


def pad_to_multiple(m: torch.Tensor, patch: int) -> torch.Tensor:
    """Zero-pad the last two dims at the end up to multiples of `patch`."""
    h, w = m.shape[-2:]
    ph, pw = (-h) % patch, (-w) % patch
    return F.pad(m, (0, pw, 0, ph)) if ph or pw else m


def patchify(m: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W), H and W multiples of p -> (B, H/p * W/p, p * p * C), patches row-major."""
    return rearrange(m, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, gh * gw, p * p * C) -> (B, C, gh * p, gw * p); inverse of `patchify`."""
    return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch, q=patch)


def unfold_token_counts(shapes: Mapping, patch: int) -> dict[str, int]:
    """Tokens of each plane under direct unfold: ceil(a/p) * ceil(b/p), in `STACK_ORDER`."""
    axis_sizes(shapes)
    return {n: (-(-int(tuple(shapes[n])[-2]) // patch)) * (-(-int(tuple(shapes[n])[-1]) // patch))
            for n in STACK_ORDER}


def unfold(planes: Mapping[str, torch.Tensor], patch: int) -> torch.Tensor:
    """Direct unfold: each plane patchified alone (zero-padded to multiples of p), tokens concatenated in
    `STACK_ORDER` -> (B, N, p * p * C)."""
    shapes_of(planes)
    return torch.cat([patchify(pad_to_multiple(planes[n], patch), patch) for n in STACK_ORDER], dim=1)


def fold(tokens: torch.Tensor, shapes: Mapping, patch: int) -> dict[str, torch.Tensor]:
    """Inverse of `unfold`: (B, N, p * p * C) -> {name: (B, C, a, b)}."""
    counts = unfold_token_counts(shapes, patch)
    if tokens.shape[1] != sum(counts.values()):
        raise OcclabError(f"{tokens.shape[1]} tokens, the plane shapes give {sum(counts.values())}")
    out = {}
    for name, chunk in zip(STACK_ORDER, tokens.split(list(counts.values()), dim=1)):
        a, b = (int(v) for v in tuple(shapes[name])[-2:])
        grid = (-(-a // patch), -(-b // patch))
        out[name] = unpatchify(chunk, grid, patch)[..., :a, :b]
    return {n: out[n] for n in PLANES}


class TokenLayout:
    """How a HexPlane becomes one map of p x p patches for the DiT (kind "pro", "vconcat" or "unfold").

    `to_map` / `from_map` are exact inverses on the plane cells. `map_shape` is the map (H, W) (for unfold a
    grid of patches, each holding one plane patch); `grid` its patch grid (ceil(H/p), ceil(W/p));
    `cell_mask` (H, W) True on plane cells; `padding` (gh, gw) True for pure-padding patches.
    """

    def __init__(self, kind: str, shapes: Mapping, patch: int):
        if kind not in ROLLOUTS:
            raise OcclabError(f"rollout must be one of {ROLLOUTS}, got {kind!r}")
        if int(patch) < 1:
            raise OcclabError(f"patch size must be positive, got {patch}")
        self.kind, self.patch = kind, int(patch)
        self.shapes = {n: tuple(int(v) for v in tuple(shapes[n])[-2:]) for n in PLANES if n in shapes}
        self.sizes = axis_sizes(self.shapes)
        p = self.patch
        if kind == "unfold":
            self.blocks = None
            self.counts = unfold_token_counts(self.shapes, p)
            n = sum(self.counts.values())
            cols = math.ceil(math.sqrt(n))
            self.map_shape = (math.ceil(n / cols) * p, cols * p)
            ones = {name: torch.ones(1, 1, *ab) for name, ab in self.shapes.items()}
            self.cell_mask = self._tokens_to_map(unfold(ones, p))[0, 0] > 0
        else:
            self.blocks, self.map_shape = (pro_blocks if kind == "pro" else vconcat_blocks)(self.shapes)
            self.cell_mask = block_mask(self.blocks, self.map_shape)
        self.grid = (-(-self.map_shape[0] // p), -(-self.map_shape[1] // p))
        self.padding = patch_padding(self.cell_mask, p)
        self.partial = has_partial_patches(self.cell_mask, p)  # their padding cells are zeroed in the DiT

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_padding(self) -> int:
        return int(self.padding.sum())

    @property
    def num_tokens(self) -> int:
        """Patches that hold plane cells (the transformer's tokens when padding is dropped)."""
        return self.num_patches - self.num_padding

    def _tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        p, (h, w) = self.patch, self.map_shape
        slots = (h // p) * (w // p)
        tokens = F.pad(tokens, (0, 0, 0, slots - tokens.shape[1]))  # empty slots at the end
        return unpatchify(tokens, (h // p, w // p), p)

    def to_map(self, planes: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: (B, C, a, b)} -> (B, C, H, W)."""
        if self.kind == "unfold":
            if shapes_of(planes) != self.shapes:
                raise OcclabError(f"plane shapes {shapes_of(planes)} differ from the layout's {self.shapes}")
            return self._tokens_to_map(unfold(planes, self.patch))
        return place_blocks(planes, self.blocks, self.map_shape)

    def from_map(self, m: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, C, H, W) -> {name: (B, C, a, b)}; inverse of `to_map`."""
        if self.kind == "unfold":
            if tuple(m.shape[-2:]) != self.map_shape:
                raise OcclabError(f"map of shape {tuple(m.shape[-2:])} does not match the layout's {self.map_shape}")
            n = sum(self.counts.values())
            return fold(patchify(m, self.patch)[:, :n], self.shapes, self.patch)
        return take_blocks(m, self.blocks, self.map_shape)

    def xy_patches(self) -> torch.Tensor:
        """Indices (row-major into the patch grid) of the xy block's patches, ordered row-major over its own
        (ceil(X/p), ceil(Y/p)) patch grid. xy starts at the map origin in every layout."""
        gx, gy = -(-self.sizes["x"] // self.patch), -(-self.sizes["y"] // self.patch)
        if self.kind == "unfold":
            return torch.arange(gx * gy)
        rows, cols = torch.meshgrid(torch.arange(gx), torch.arange(gy), indexing="ij")
        return (rows * self.grid[1] + cols).reshape(-1)


def make_layout(kind: str, shapes: Mapping, patch: int) -> TokenLayout:
    """The token layout `kind` ("pro" | "unfold" | "vconcat") of planes of `shapes` {name: (a, b)}."""
    return TokenLayout(kind, shapes, patch)
