"""A flyover of a large (outpainted) occupancy map: one voxel mesh, a camera gliding over it, GIF or MP4 off screen.

The map (X, Y, Z) is placed with its corner at the origin (metres = voxel index * voxel_size); the camera
flies along the map's diagonal from one corner to the other, `height` metres above the ground, looking
`ahead` metres forward and down to the ground.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from occlab.data.geometry import Geometry
from occlab.errors import OcclabError
from occlab.render.common import present_classes
from occlab.render.scene import (
    MOVIE_SUFFIXES,
    _output_path,
    add_class_legend,
    new_plotter,
    voxel_mesh,
)


def map_geometry(shape, voxel_size=(0.4, 0.4, 0.4)) -> Geometry:
    """The geometry of a map of `shape` (X, Y, Z) voxels with its corner at the origin."""
    return Geometry("map", tuple(int(v) for v in shape), tuple(float(v) for v in voxel_size), (0.0, 0.0, 0.0),
                    0.0, 1.8)


def flyover_path(shape, voxel_size=(0.4, 0.4, 0.4), frames: int = 48, height: float | None = None,
                 ahead: float | None = None) -> list[tuple[tuple, tuple, tuple]]:
    """`frames` camera positions [(position, focal point, view up)] along the map's diagonal (metres)."""
    if frames < 2:
        raise OcclabError(f"a flyover needs at least 2 frames, got {frames}")
    ext = np.asarray(shape[:2], float) * np.asarray(voxel_size[:2], float)
    height = float(height if height is not None else 0.35 * ext.max())
    ahead = float(ahead if ahead is not None else 0.3 * ext.max())
    start, end = 0.1 * ext, 0.9 * ext
    direction = (end - start) / np.linalg.norm(end - start)
    out = []
    for s in np.linspace(0.0, 1.0, frames):
        p = start + s * (end - start) - 0.15 * ahead * direction
        f = p + ahead * direction
        out.append(((float(p[0]), float(p[1]), height), (float(f[0]), float(f[1]), 0.0), (0.0, 0.0, 1.0)))
    return out


def render_flyover(labels: np.ndarray, out: str | os.PathLike = "flyover.gif", voxel_size=(0.4, 0.4, 0.4),
                   frames: int = 48, fps: float = 12, window_size: tuple[int, int] = (640, 480),
                   height: float | None = None, legend: bool = True) -> Path:
    """Fly over a large map (X, Y, Z) of labels: GIF or MP4 by the suffix of `out` -> its path."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise OcclabError(f"a flyover needs one map (X, Y, Z), got shape {labels.shape}")
    path = _output_path(out, MOVIE_SUFFIXES)
    mesh = voxel_mesh(labels, map_geometry(labels.shape, voxel_size))
    plotter = new_plotter(window_size)
    try:
        if mesh.n_cells:
            plotter.add_mesh(mesh, scalars="rgb", rgb=True, name="voxels", culling="back", ambient=0.35,
                             diffuse=0.75, specular=0.0, show_scalar_bar=False)
        if legend:
            add_class_legend(plotter, present_classes(labels))
        plotter.camera.view_angle = 60.0
        if path.suffix.lower() == ".gif":
            plotter.open_gif(str(path), fps=fps)
        else:
            plotter.open_movie(str(path), framerate=max(1, round(fps)), quality=7)
        for pose in flyover_path(labels.shape, voxel_size, frames, height):
            plotter.camera_position = list(pose)
            plotter.reset_camera_clipping_range()
            plotter.write_frame()
    finally:
        plotter.close()
    return path


__all__ = ["flyover_path", "map_geometry", "render_flyover"]
