"""Visibility from the ego lidar by a polar shadow sweep, exact enough and about a millisecond a frame.

Every occupied voxel above the ground layer blocks a range of elevation angles (seen from the sensor) for
everything farther away in its azimuth. Elevation is quantised into 64 bins, kept as the bits of one
uint64 per voxel column, so "which elevations are blocked at this column" is one OR over z, and "what is
blocked by anything closer" is one cumulative OR along each polar ray. A voxel is visible when the bin of
its most exposed point (the face nearest the sensor's height) is not blocked by anything closer than one
voxel. The ground does not occlude the ground (the road is seen at grazing angles), and layers below the
road surface are never visible.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from occlab.data.geometry import Geometry

BINS = 64
SLOPE_SCALE = 0.02  # bins are uniform in asinh(slope / SLOPE_SCALE): fine near the horizon, coarse below
AZIMUTHS = 720
RADIAL_STEP = 0.2


@dataclass(frozen=True)
class ShadowTables:
    """Everything about the sweep that depends only on the geometry."""

    blocks: np.ndarray  # (X, Y, Z) uint64: elevation bits a voxel would block
    test_bit: np.ndarray  # (X, Y, Z) uint64: the bit of each voxel's most exposed point
    polar_index: np.ndarray  # (A, R) flat column index sampled by each polar cell (-1 outside the grid)
    lookup: np.ndarray  # (X, Y) flat (A*R) index of each column's "closer than one voxel" shadow cell
    occluder_layers: np.ndarray  # (Z,) bool: layers above the ground layer
    below_ground: np.ndarray  # (Z,) bool: layers under the road surface (never visible)


def _bin(slope: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Elevation bin (0..BINS-1) of slopes, uniform in asinh(slope / SLOPE_SCALE)."""
    u = (np.arcsinh(slope / SLOPE_SCALE) - lo) / (hi - lo)
    return np.clip((u * BINS).astype(np.int64), 0, BINS - 1)


@lru_cache(maxsize=4)
def shadow_tables(geometry: Geometry) -> ShadowTables:
    """Precompute the sweep's tables for a geometry (cached)."""
    xs, ys, zc = geometry.centers(0), geometry.centers(1), geometry.centers(2)
    dz, vx = geometry.voxel_size[2], geometry.voxel_size[0]
    dist = np.maximum(np.hypot(xs[:, None], ys[None, :]), vx / 2)  # (X, Y)
    rel_lo, rel_hi = zc - dz / 2 - geometry.sensor_z, zc + dz / 2 - geometry.sensor_z
    max_slope = max(abs(rel_lo).max(), abs(rel_hi).max()) / (vx / 2)
    lo, hi = -np.arcsinh(max_slope / SLOPE_SCALE), np.arcsinh(max_slope / SLOPE_SCALE)
    # bins blocked by a voxel: every bin whose centre lies between its bottom and top slopes
    centre = (np.arange(BINS) + 0.5) / BINS * (hi - lo) + lo
    s_lo = np.arcsinh(rel_lo[None, None, :] / dist[..., None] / SLOPE_SCALE)
    s_hi = np.arcsinh(rel_hi[None, None, :] / dist[..., None] / SLOPE_SCALE)
    first = np.searchsorted(centre, s_lo)  # first bin centre >= bottom
    last = np.searchsorted(centre, s_hi, side="right")  # one past the last centre <= top
    width = np.clip(last - first, 0, BINS)
    ones = np.where(width >= 64, np.uint64(~np.uint64(0)), (np.uint64(1) << width.astype(np.uint64)) - np.uint64(1))
    blocks = np.where(width > 0, ones << np.minimum(first, 63).astype(np.uint64), np.uint64(0)).astype(np.uint64)
    # the most exposed point of a voxel: the face nearest the sensor height
    exposed = np.clip(0.0, rel_lo + 1e-3, rel_hi - 1e-3)
    test_bit = np.uint64(1) << _bin(exposed[None, None, :] / dist[..., None], lo, hi).astype(np.uint64)
    # polar cells
    rmax = float(dist.max()) + vx
    radii = (np.arange(int(np.ceil(rmax / RADIAL_STEP))) + 0.5) * RADIAL_STEP
    az = (np.arange(AZIMUTHS) + 0.5) / AZIMUTHS * 2 * np.pi - np.pi
    px = radii[None, :] * np.cos(az)[:, None]
    py = radii[None, :] * np.sin(az)[:, None]
    ix = np.floor((px - geometry.min_bound[0]) / vx).astype(np.int64)
    iy = np.floor((py - geometry.min_bound[1]) / geometry.voxel_size[1]).astype(np.int64)
    nx, ny, _ = geometry.grid
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    polar_index = np.where(inside, ix * ny + iy, -1)
    # each column reads the shadow cast by polar cells at least one voxel closer than itself
    col_az = np.arctan2(ys[None, :], xs[:, None])
    a = np.clip(((col_az + np.pi) / (2 * np.pi) * AZIMUTHS).astype(np.int64), 0, AZIMUTHS - 1)
    r = np.clip(np.floor((dist - vx) / RADIAL_STEP).astype(np.int64), -1, len(radii) - 1)
    lookup = np.where(r >= 0, a * len(radii) + r, -1)
    heights = geometry.heights()
    return ShadowTables(blocks, test_bit, polar_index, lookup, heights >= 0, heights < -dz)


def visibility(labels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Visible voxels (X, Y, Z) bool of one frame of labels (X, Y, Z) seen from the ego sensor."""
    tab = shadow_tables(geometry)
    occupied = (labels != 0) & tab.occluder_layers
    blocked = np.bitwise_or.reduce(np.where(occupied, tab.blocks, np.uint64(0)), axis=-1).ravel()  # (X*Y,)
    polar = np.where(tab.polar_index >= 0, blocked[tab.polar_index], np.uint64(0))  # (A, R)
    shadow = np.bitwise_or.accumulate(polar, axis=1).ravel()
    col_shadow = np.where(tab.lookup >= 0, shadow[tab.lookup], np.uint64(0))  # (X, Y)
    visible = (col_shadow[..., None] & tab.test_bit) == 0
    visible &= ~tab.below_ground
    return visible
