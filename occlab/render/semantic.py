"""Batched torch semantic renders of occupancy (no display): the images behind the 2D generation metrics.

Every view colours a pixel with the occlab PALETTE (occlab.classes) of the first occupied voxel it sees;
free (0) and ignored (255) voxels are empty, and a pixel that sees nothing is white (the colour of free).
Inputs are integer labels (B,X,Y,Z) or (B,T,X,Y,Z) on any device; outputs are float RGB in [0, 1],
(B,3,H,W) or (B,T,3,H,W).

- `bev`: the top-most occupied class of each column, oriented like occlab.render.bev: row 0 is the front
  (largest x), column 0 the far left (largest y), so pixel [r, c] shows column (X-1-r, Y-1-c).
- `perspective`: pinhole cameras at the ego (the grid centre in x, y), `height` metres above the road surface
  of the geometry (CarlaSC z = -1.8 m, Occ3D z = 0.1 m; a smaller grid is taken as the crop that
  Sequence.crop makes, centred in x, y and keeping the bottom layers: `crop_geometry`; for "spread" crops the
  camera stands at the crop's centre, not at the ego), ray-marched
  in steps of half the smallest voxel side up to where each ray leaves the grid. CAMERAS: `front` looks
  along +x, `rear` along -x, `left` along +y, `right` along -y; all pitched 10 degrees down, 90 degrees of
  horizontal field of view, square pixels. `shade` darkens a hit linearly with its distance (0 = pure palette,
  0.3 = 30% darker at the farthest point of the grid) so that depth shows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from occlab.classes import FREE, IGNORE, PALETTE
from occlab.data.geometry import GEOMETRIES, Geometry, get_geometry
from occlab.errors import OcclabError


@dataclass(frozen=True)
class Camera:
    """A pinhole camera at the ego: yaw 0 looks along +x, 90 along +y (left); pitch < 0 looks down."""

    name: str
    yaw: float
    pitch: float = -10.0
    hfov: float = 90.0
    height: float = 1.6  # metres above the road surface


CAMERAS: dict[str, Camera] = {c.name: c for c in (Camera("front", 0.0), Camera("rear", 180.0),
                                                   Camera("left", 90.0), Camera("right", -90.0))}
VIEWS = ("bev", "front", "rear")  # the views of the 2D generation metrics


def crop_geometry(geometry: Geometry | str | None, shape: tuple[int, int, int]) -> Geometry:
    """The geometry of a grid of `shape`: a named one (default: the one with this grid, else the one with this
    many z layers, else CarlaSC), cropped like Sequence.crop (Geometry.crop) when the grid is smaller."""
    shape = tuple(int(n) for n in shape)
    if geometry is None:
        geometry = next((g for g in GEOMETRIES.values() if g.grid == shape),
                        next((g for g in GEOMETRIES.values() if g.grid[2] == shape[2]), GEOMETRIES["carlasc"]))
    elif isinstance(geometry, str):
        geometry = get_geometry(geometry.removesuffix("-crop"))
    return geometry.crop(shape)


def palette(device: torch.device | str = "cpu") -> torch.Tensor:
    """(256, 3) float RGB in [0, 1]: class colours; free, ignore and unknown ids are white."""
    table = torch.ones(256, 3)
    table[: len(PALETTE)] = torch.tensor(PALETTE, dtype=torch.float32) / 255
    return table.to(device)


def _flatten(labels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(N,X,Y,Z) labels and the leading shape ((B,) or (B,T)) to restore."""
    if not isinstance(labels, torch.Tensor):
        raise OcclabError(f"expected a torch tensor of labels, got {type(labels).__name__}")
    if labels.ndim not in (4, 5) or labels.is_floating_point():
        raise OcclabError(f"expected integer labels of shape (B,X,Y,Z) or (B,T,X,Y,Z), got {labels.dtype} "
                          f"{tuple(labels.shape)}")
    lead = tuple(labels.shape[:-3])
    return labels.reshape(-1, *labels.shape[-3:]), lead


def _occupied(labels: torch.Tensor) -> torch.Tensor:
    """True where a voxel is neither free nor ignored."""
    return (labels != FREE) & (labels != IGNORE)


def bev(labels: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Top-down colour image of the top-most occupied class per column: (B,[T,]3,X,Y), or resized to `size`."""
    flat, lead = _flatten(labels)
    z = flat.shape[-1]
    occ = _occupied(flat)
    height = torch.arange(1, z + 1, device=flat.device, dtype=torch.int16)
    top = (occ * height).amax(-1)  # 0 where the column is empty, else 1 + index of the top-most voxel
    cls = flat.gather(-1, (top.long() - 1).clamp(min=0)[..., None])[..., 0].long()
    cls = torch.where(top > 0, cls, FREE)
    img = palette(flat.device)[cls].flip(1, 2).permute(0, 3, 1, 2)  # front up, left left
    if size is not None:
        img = _resize(img, size)
    return img.reshape(*lead, *img.shape[1:])


def _resize(img: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of (N,3,H,W) images (no-op at the same size)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(img.shape[-2:]) == size:
        return img
    return F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


@lru_cache(maxsize=32)
def _rays(camera: Camera, geometry: Geometry, size: tuple[int, int], device: str) -> tuple[torch.Tensor, ...]:
    """Per ray-march step the flat voxel index of every pixel ((S, H*W), -1 outside) and its distance ratio."""
    h, w = size
    vs = torch.tensor(geometry.voxel_size, dtype=torch.float64)
    lo = torch.tensor(geometry.min_bound, dtype=torch.float64)
    grid = torch.tensor(geometry.grid, dtype=torch.float64)
    hi = lo + grid * vs
    origin = torch.tensor([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, geometry.ground_z + camera.height],
                          dtype=torch.float64)
    tx = math.tan(math.radians(camera.hfov) / 2)
    u = ((torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1) * tx  # right
    v = (1 - (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2) * tx * h / w  # up
    yaw, pitch = math.radians(camera.yaw), math.radians(camera.pitch)
    fwd = torch.tensor([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)],
                       dtype=torch.float64)
    right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0], dtype=torch.float64)
    up = torch.linalg.cross(right, fwd)
    d = fwd + u[None, :, None] * right + v[:, None, None] * up  # (H, W, 3)
    d = (d / d.norm(dim=-1, keepdim=True)).reshape(-1, 3)
    with torch.no_grad():  # exit distance of each ray from the box (slab method; the origin is inside)
        inv = 1 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        t_exit = torch.maximum((lo - origin) * inv, (hi - origin) * inv).amin(-1)
    step = float(vs.min()) / 2
    t = (torch.arange(math.ceil(float(t_exit.max()) / step), dtype=torch.float64) + 0.5) * step  # (S,)
    pts = origin + t[:, None, None] * d[None]  # (S, P, 3)
    ijk = torch.floor((pts - lo) / vs).long()
    inside = ((ijk >= 0) & (ijk < grid.long())).all(-1) & (t[:, None] < t_exit[None])
    flat = (ijk[..., 0] * geometry.grid[1] + ijk[..., 1]) * geometry.grid[2] + ijk[..., 2]
    flat = torch.where(inside, flat, -1)
    ratio = (t / float(t_exit.max())).float()
    return flat.to(device), ratio.to(device), inside.sum(0).to(device)


def perspective(labels: torch.Tensor, camera: str | Camera = "front", size: int | tuple[int, int] = 128,
                geometry: Geometry | str | None = None, shade: float = 0.3, chunk: int = 48) -> torch.Tensor:
    """Ray-marched colour image from a fixed camera (module docstring): (B,[T,]3,H,W) float in [0, 1]."""
    flat, lead = _flatten(labels)
    cam = CAMERAS.get(camera) if isinstance(camera, str) else camera
    if cam is None:
        raise OcclabError(f"unknown camera {camera!r}; expected one of {', '.join(CAMERAS)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    geo = crop_geometry(geometry, tuple(flat.shape[1:]))
    index, ratio, inside = _rays(cam, geo, size, str(flat.device))
    n, p = flat.shape[0], index.shape[1]
    vox = torch.cat([flat.reshape(n, -1), torch.zeros(n, 1, dtype=flat.dtype, device=flat.device)], 1)
    index = torch.where(index < 0, vox.shape[1] - 1, index)  # outside the grid -> an extra free voxel
    cls = torch.zeros(n, p, dtype=torch.long, device=flat.device)
    depth = torch.ones(n, p, device=flat.device)
    done = torch.zeros(n, p, dtype=torch.bool, device=flat.device)
    alive = torch.arange(p, device=flat.device)  # rays still in the grid and not yet hit in some sample
    for s0 in range(0, index.shape[0], chunk):
        v = vox[:, index[s0:s0 + chunk][:, alive]]  # (N, k, A)
        occ = _occupied(v)
        hit = occ.any(1) & ~done[:, alive]
        first = occ.to(torch.uint8).argmax(1)  # the first occupied step of the chunk
        cls[:, alive] = torch.where(hit, v.gather(1, first[:, None])[:, 0].long(), cls[:, alive])
        depth[:, alive] = torch.where(hit, ratio[s0:s0 + chunk][first], depth[:, alive])
        done[:, alive] |= hit
        alive = alive[~done[:, alive].all(0) & (inside[alive] > s0 + chunk)]
        if alive.numel() == 0:
            break
    rgb = palette(flat.device)[torch.where(done, cls, FREE)]
    rgb = torch.where(done[..., None], rgb * (1 - shade * depth[..., None]), rgb)
    img = rgb.reshape(n, *size, 3).permute(0, 3, 1, 2)
    return img.reshape(*lead, *img.shape[1:])


def render_views(labels: torch.Tensor, views: tuple[str, ...] = VIEWS, size: int = 128,
                 geometry: Geometry | str | None = None) -> torch.Tensor:
    """Every view of each sample at one square size: (B, V, 3, size, size) float in [0, 1] (V = len(views))."""
    flat, lead = _flatten(labels)
    if not views:
        raise OcclabError("render_views needs at least one view")
    out = []
    for name in views:
        if name == "bev":
            out.append(bev(flat, size))
        elif name in CAMERAS:
            out.append(perspective(flat, name, size, geometry))
        else:
            raise OcclabError(f"unknown view {name!r}; expected 'bev' or one of {', '.join(CAMERAS)}")
    img = torch.stack(out, 1)
    return img.reshape(*lead, *img.shape[1:])


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """Float RGB in [0, 1] to uint8 (what image feature extractors take)."""
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


__all__ = ["CAMERAS", "VIEWS", "Camera", "bev", "crop_geometry", "palette", "perspective", "render_views", "to_uint8"]
