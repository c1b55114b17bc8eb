"""Voxel grid geometries in the ego frame (DESIGN.md §2)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occlab.errors import OcclabError


@dataclass(frozen=True)
class Geometry:
    """A regular ego-centric voxel grid: `grid` cells of `voxel_size` metres starting at `min_bound`."""

    name: str
    grid: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    min_bound: tuple[float, float, float]
    ground_z: float  # ego-frame height of the road surface
    sensor_z: float  # ego-frame height of the lidar that defines visibility

    @property
    def max_bound(self) -> tuple[float, float, float]:
        return tuple(lo + n * v for lo, n, v in zip(self.min_bound, self.grid, self.voxel_size))

    def centers(self, axis: int) -> np.ndarray:
        """Ego-frame coordinates of the voxel centres along one axis (0 = x, 1 = y, 2 = z)."""
        n, v, lo = self.grid[axis], self.voxel_size[axis], self.min_bound[axis]
        return lo + (np.arange(n) + 0.5) * v

    def crop(self, shape: tuple[int, int, int]) -> "Geometry":
        """The centred crop in x and y, bottom layers in z (what `Sequence.crop` keeps)."""
        if tuple(shape) == self.grid:
            return self
        vx, vy, _ = self.voxel_size
        return Geometry(f"{self.name}-crop", tuple(int(s) for s in shape), self.voxel_size,
                        (-shape[0] * vx / 2, -shape[1] * vy / 2, self.min_bound[2]), self.ground_z, self.sensor_z)

    def heights(self) -> np.ndarray:
        """Height above the road surface of each z layer's centre, in metres."""
        return self.centers(2) - self.ground_z


GEOMETRIES: dict[str, Geometry] = {
    # CarlaSC cartesian: 128x128x8, 0.4 x 0.4 x 0.375 m, x,y in +-25.6 m, z in [-2, 1] m around the lidar.
    "carlasc": Geometry("carlasc", (128, 128, 8), (0.4, 0.4, 0.375), (-25.6, -25.6, -2.0),
                        ground_z=-1.8, sensor_z=0.0),
    # Occ3D: 200x200x16, 0.4 m, x,y in +-40 m, z in [-1, 5.4] m in the ego frame (origin near the ground).
    "occ3d": Geometry("occ3d", (200, 200, 16), (0.4, 0.4, 0.4), (-40.0, -40.0, -1.0),
                      ground_z=0.1, sensor_z=1.9),
    # SemanticKITTI SSC (and SSCBench-KITTI-360): 256x256x32, 0.2 m, in the lidar frame: x 0..51.2 m ahead (the
    # sensor is at the grid's edge, not its centre), y +-25.6 m, z -2..4.4 m; the lidar is 1.73 m above the road.
    "semantickitti": Geometry("semantickitti", (256, 256, 32), (0.2, 0.2, 0.2), (0.0, -25.6, -2.0),
                              ground_z=-1.73, sensor_z=0.0),
}


def get_geometry(name: str) -> Geometry:
    """Look a geometry up by name, with an error that lists the known ones."""
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise OcclabError(f"unknown geometry {name!r}; expected one of {', '.join(GEOMETRIES)}") from None
