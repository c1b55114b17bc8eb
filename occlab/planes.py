"""Axis-pair feature planes for any set of axes (K-Planes style): HexPlane ("txyz", 6 planes), triplane ("xyz", 3).

A plane is named by its two axes in the order they appear in `axes` ("tx", "xy", ...) and stored as a tensor
(B, C, size_a, size_b). Everything here is computed from shapes; nothing is learned.

- `axis_pairs`, `plane_shapes`, `reduce_sizes`, `latent_floats`, `compression_ratio`: bookkeeping.
- `expand`: broadcast every plane over its missing axes and combine them (Hadamard product or sum) into a
  dense (B, C, *sizes) volume (DynamicCity's Expansion & Squeeze decoder).
- `voxel_centres`, `sample`: bilinear look-up of every plane at continuous coordinates (query decoders).
- Padded rollout (PRO) of a HexPlane into one square map and its inverse: reserved section at the end.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

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
# Padded rollout (PRO, DESIGN §3 HexPlane DiT): reserved.
# A later issue adds here `rollout(planes, sizes) -> (B, C, X+T+Z, Y+Z+T)` (rows [xy | xz | tx^T],
# [ty | tz | 0], [yz^T | 0 | 0]), its inverse `unroll(map, sizes) -> planes` and `rollout_mask(sizes)`,
# computed from shapes like everything above. Not implemented yet on purpose.
# ---------------------------------------------------------------------------------------------------------
