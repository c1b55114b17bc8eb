"""PyVista voxel scenes: coloured cubes, camera presets, PNG / GIF / MP4 output and a Jupyter viewer.

Ego frame: x forward, y left, z up; voxel (i,j,k) has its centre at min_bound + (idx + 0.5) * voxel_size.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import weakref
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np

if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # off-screen without X

if importlib.util.find_spec("triton") is not None:
    # torch may load triton lazily; its bundled LLVM crashes in its static initialisers if Mesa's llvmpipe
    # LLVM (loaded by VTK's first render) is already in the process. Loading triton first avoids the clash.
    import triton  # noqa: E402, F401

import pyvista as pv  # noqa: E402

from occlab.classes import CLASS_NAMES, FREE, IGNORE, PALETTE  # noqa: E402
from occlab.data.geometry import Geometry  # noqa: E402
from occlab.data.sequence import Sequence, load_sequence  # noqa: E402
from occlab.errors import OcclabError  # noqa: E402
from occlab.render.common import PALETTE_ARRAY, as_frames, present_classes, resolve_geometry  # noqa: E402

CAMERAS = ("oblique", "bev", "ego")
IMAGE_SUFFIXES = (".png",)
MOVIE_SUFFIXES = (".gif", ".mp4")
BACKGROUND = "white"


def _face_quads() -> list[tuple[int, int, np.ndarray]]:
    """For each of the 6 cube faces: (axis, side, 4 corner offsets in voxel units), wound outwards."""
    quads = []
    for axis in range(3):
        b, c = (axis + 1) % 3, (axis + 2) % 3
        for side in (0, 1):
            order = [(0, 0), (1, 0), (1, 1), (0, 1)] if side else [(0, 0), (0, 1), (1, 1), (1, 0)]
            quad = np.zeros((4, 3), np.int32)
            quad[:, axis] = side
            quad[:, b], quad[:, c] = zip(*order)
            quads.append((axis, side, quad))
    return quads


_QUADS = _face_quads()
_RUN_AXIS = {0: 1, 1: 0, 2: 1}  # faces normal to x or z are merged along y, faces normal to y along x


def visible_voxels(labels: np.ndarray, mask: np.ndarray | None = None,
                   hide: Seq[int] = (FREE, IGNORE)) -> np.ndarray:
    """Boolean (X,Y,Z): voxels drawn, i.e. not in `hide` and, with a mask, observed."""
    vis = ~np.isin(labels, np.asarray(hide, dtype=labels.dtype))
    return vis & mask if mask is not None else vis


def voxel_mesh(labels: np.ndarray, geometry: Geometry | str | None = None, mask: np.ndarray | None = None,
               hide: Seq[int] = (FREE, IGNORE)) -> pv.PolyData:
    """Coloured cubes as the faces that touch a hidden voxel or the border; mask hides unobserved voxels.

    Runs of same-class faces along one axis are merged into one quad, so flat areas cost few polygons.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise OcclabError(f"voxel_mesh expects labels of shape (X,Y,Z), got {labels.shape}")
    g = resolve_geometry(geometry, labels.shape)
    vis = visible_voxels(labels, None if mask is None else np.asarray(mask, bool), hide)
    key = np.where(vis, labels.astype(np.int16) + 1, 0)
    pad = np.pad(vis, 1)
    corners, face_labels = [], []
    for axis, side, quad in _QUADS:
        neighbour = [slice(1, -1)] * 3
        neighbour[axis] = slice(2, None) if side else slice(None, -2)
        run_axis = _RUN_AXIS[axis]
        faces = np.moveaxis(np.where(vis & ~pad[tuple(neighbour)], key, 0), run_axis, -1)
        padded = np.pad(faces, [(0, 0), (0, 0), (1, 1)])
        starts = np.argwhere((faces != 0) & (faces != padded[..., :-2]))  # C order: runs pair up with ends
        ends = np.argwhere((faces != 0) & (faces != padded[..., 2:]))
        first = np.empty_like(starts)
        first[:, [a for a in range(3) if a != run_axis]] = starts[:, :2]
        first[:, run_axis] = starts[:, 2]
        size = np.ones_like(first)
        size[:, run_axis] = ends[:, 2] - starts[:, 2] + 1
        corners.append(first[:, None, :] + quad * size[:, None, :])
        face_labels.append(labels[tuple(first.T)])
    corners_all = np.concatenate(corners).reshape(-1, 3)
    points = (corners_all * np.float32(g.voxel_size) + np.float32(g.min_bound)).astype(np.float32)
    lab = np.concatenate(face_labels)
    if not len(lab):
        return pv.PolyData()  # nothing to draw
    mesh = pv.PolyData.from_regular_faces(points, np.arange(len(points), dtype=np.int64).reshape(-1, 4))
    mesh.cell_data["label"] = lab
    mesh.cell_data["rgb"] = PALETTE_ARRAY[lab]
    return mesh


def _extent(g: Geometry) -> float:
    """Half width of the grid in x / y (metres), the scale of the camera presets."""
    return float(max(abs(v) for v in (*g.min_bound[:2], *g.max_bound[:2])))


def set_camera(plotter: pv.Plotter, geometry: Geometry, camera: str = "oblique") -> None:
    """Camera presets: oblique (3/4 from behind-above), bev (top-down, parallel, x up), ego (behind the ego)."""
    if camera not in CAMERAS:
        raise OcclabError(f"unknown camera {camera!r}; expected one of {', '.join(CAMERAS)}")
    r, zg = _extent(geometry), geometry.ground_z
    cam = plotter.camera
    if camera == "bev":
        width, height = plotter.window_size
        shift = min(0.5 * r, max(0.0, 1.02 * r * width / height - r))  # grid to the left, room for the legend
        plotter.camera_position = [(0.0, -shift, zg + 4 * r), (0.0, -shift, zg), (1.0, 0.0, 0.0)]
        plotter.enable_parallel_projection()
        cam.parallel_scale = 1.02 * r
    else:
        plotter.disable_parallel_projection()
        if camera == "oblique":
            plotter.camera_position = [(-1.25 * r, 0.85 * r, zg + 1.15 * r), (0.05 * r, -0.05 * r, zg),
                                       (0.0, 0.0, 1.0)]
            cam.view_angle = 40.0
        else:
            plotter.camera_position = [(-0.3 * r, 0.0, zg + 0.3 * r), (0.5 * r, 0.0, zg), (0.0, 0.0, 1.0)]
            cam.view_angle = 60.0
    plotter.reset_camera_clipping_range()


def ego_marker(geometry: Geometry) -> pv.PolyData:
    """A flat arrow at the ego origin pointing forward (+x), lying just above the road: a car's length (4.4 m),
    shorter in small crops so that it covers at most a sixth of the view."""
    length = min(4.4, _extent(geometry) / 3)
    arrow = pv.Arrow(start=(-length / 2, 0.0, 0.0), direction=(1.0, 0.0, 0.0), scale=length, tip_length=0.35,
                     tip_radius=0.22, shaft_radius=0.09)
    return arrow.scale((1.0, 1.0, 0.3)).translate((0.0, 0.0, geometry.ground_z + 0.8))


def add_class_legend(plotter: pv.Plotter, classes: Seq[int]) -> None:
    """Replace the plotter's legend by one entry per class: a palette swatch and the name in black."""
    classes = [int(c) for c in classes if 0 < c < len(PALETTE)]
    if plotter.legend is not None:
        plotter.remove_legend()
    if not classes:
        return
    legend = plotter.add_legend([[CLASS_NAMES[c], PALETTE[c]] for c in classes], bcolor="white",
                                background_opacity=0.85)
    width, height = 0.2, min(0.96, 0.045 * len(classes))
    legend.SetPosition(0.99 - width, 0.99 - height)  # upper right corner, in viewport fractions
    legend.SetPosition2(width, height)
    for i, c in enumerate(classes):  # the icon carries the colour, so the text can be black and readable
        swatch = pv.ImageData(dimensions=(8, 8, 1))
        swatch.point_data["rgb"] = np.tile(np.asarray(PALETTE[c], np.uint8), (64, 1))
        legend.SetEntryIcon(i, swatch)
        legend.SetEntrySymbol(i, pv.PolyData())
        legend.SetEntryColor(i, 0.0, 0.0, 0.0)


def plot_frame(plotter: pv.Plotter, labels: np.ndarray, geometry: Geometry | str | None = None,
               camera: str = "oblique", legend: bool | Seq[int] = True, mask: np.ndarray | None = None,
               ego: bool = True, render: bool = True) -> pv.PolyData:
    """Draw one frame on `plotter`, replacing the previous one; legend: a list of ids, or False to keep it."""
    labels = np.asarray(labels)
    g = resolve_geometry(geometry, labels.shape)
    mesh = voxel_mesh(labels, g, mask)
    suppressed, plotter.suppress_rendering = plotter.suppress_rendering, True  # render once, at the end
    try:
        if mesh.n_cells:
            plotter.add_mesh(mesh, scalars="rgb", rgb=True, name="voxels", reset_camera=False, culling="back",
                             ambient=0.35, diffuse=0.75, specular=0.0, show_scalar_bar=False)
        else:
            plotter.remove_actor("voxels")
        if ego:
            plotter.add_mesh(ego_marker(g), color="black", name="ego", reset_camera=False)
        if legend is not False:
            if legend is True:
                legend = present_classes(labels if mask is None else np.where(mask, labels, FREE))
            add_class_legend(plotter, legend)
        set_camera(plotter, g, camera)
    finally:
        plotter.suppress_rendering = suppressed
    if render:
        plotter.render()
    return mesh


def new_plotter(window_size: tuple[int, int] = (960, 720)) -> pv.Plotter:
    """An off-screen plotter with the kit's background and lights."""
    plotter = pv.Plotter(off_screen=True, window_size=list(window_size), lighting="three lights")
    plotter.set_background(BACKGROUND)
    return plotter


def _output_path(out: str | os.PathLike, suffixes: Seq[str]) -> Path:
    """Check the suffix of `out` and that its folder exists or can be made and is writable."""
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        raise OcclabError(f"{out}: unknown output type {out.suffix or '(none)'!r}; expected a file ending in "
                          f"{', '.join(suffixes)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OcclabError(f"cannot write {out}: {e.strerror or e}; choose a writable output folder") from None
    if not os.access(out.parent, os.W_OK) or out.is_dir():
        raise OcclabError(f"cannot write {out}: the folder {out.parent} is not writable or the path is a "
                          f"folder; choose a writable output file")
    return out


def render_frame(labels: np.ndarray | Sequence, geometry: Geometry | str | None = None, camera: str = "oblique",
                 out: str | os.PathLike | None = None, window_size: tuple[int, int] = (960, 720),
                 mask: np.ndarray | bool | None = None, frame: int = 0, legend: bool = True) -> np.ndarray:
    """Render one frame ((X,Y,Z), or `frame` of a Sequence / (T,X,Y,Z)) to an (H,W,3) uint8 image; PNG if `out`."""
    f = as_frames(labels, geometry, mask)
    if not 0 <= frame < len(f.labels):
        raise OcclabError(f"frame {frame} is out of range: the input has {len(f.labels)} frames "
                          f"(0..{len(f.labels) - 1})")
    path = _output_path(out, IMAGE_SUFFIXES) if out is not None else None
    plotter = new_plotter(window_size)
    try:
        plot_frame(plotter, f.labels[frame], f.geometry, camera, legend,
                   None if f.mask is None else f.mask[frame])
        return _screenshot(plotter, path)
    finally:
        plotter.close()


def _screenshot(plotter: pv.Plotter, path: Path | None) -> np.ndarray:
    """The plotter's image (H,W,3) uint8, also written as PNG when `path` is given."""
    img = np.asarray(plotter.screenshot(return_img=True))[..., :3].copy()
    if path is not None:
        import imageio.v3 as iio

        iio.imwrite(path, img)
    return img


def render_side_by_side(frames: Seq[np.ndarray], titles: Seq[str], geometry: Geometry | str | None = None,
                        camera: str = "oblique", out: str | os.PathLike | None = None,
                        window_size: tuple[int, int] = (640, 480), masks: Seq[np.ndarray | None] | None = None,
                        ego: bool = True) -> np.ndarray:
    """Frames (X,Y,Z) rendered with the same camera and one shared legend, side by side, titled; PNG if `out`.

    `ego=False` for crops that are not centred on the ego (no ego marker)."""
    path = _output_path(out, IMAGE_SUFFIXES) if out is not None else None
    masks = list(masks) if masks is not None else [None] * len(frames)
    legend = present_classes(np.stack([np.asarray(f) for f in frames]))
    plotter = pv.Plotter(off_screen=True, window_size=[window_size[0] * len(frames), window_size[1]],
                         shape=(1, len(frames)), lighting="three lights")
    try:
        for i, (labels, title) in enumerate(zip(frames, titles)):
            plotter.subplot(0, i)
            plotter.set_background(BACKGROUND)
            plot_frame(plotter, labels, geometry, camera, legend if i == len(frames) - 1 else False, masks[i],
                       ego=ego, render=False)
            plotter.add_text(title, position="upper_left", font_size=12, color="black")
        return _screenshot(plotter, path)
    finally:
        plotter.close()


def render_sequence(data: Sequence | np.ndarray, geometry: Geometry | str | None = None,
                    out: str | os.PathLike = "sequence.gif", camera: str = "oblique", fps: float = 10,
                    window_size: tuple[int, int] = (640, 480), mask: np.ndarray | bool | None = None,
                    legend: bool = True) -> Path:
    """Render every frame with one off-screen plotter into a GIF or MP4 (by the suffix of `out`)."""
    f = as_frames(data, geometry, mask)
    path = _output_path(out, MOVIE_SUFFIXES)
    if camera not in CAMERAS:
        raise OcclabError(f"unknown camera {camera!r}; expected one of {', '.join(CAMERAS)}")
    shown = f.labels if f.mask is None else np.where(f.mask, f.labels, FREE)
    classes = present_classes(shown) if legend else False
    plotter = new_plotter(window_size)
    try:
        if path.suffix.lower() == ".gif":
            plotter.open_gif(str(path), fps=fps)
        else:
            plotter.open_movie(str(path), framerate=max(1, round(fps)), quality=7)
        for t in range(len(f.labels)):
            plot_frame(plotter, f.labels[t], f.geometry, camera, classes if t == 0 else False,
                       None if f.mask is None else f.mask[t], render=False)  # write_frame renders
            plotter.write_frame()
    finally:
        plotter.close()
    return path


def show(data: Sequence | np.ndarray, geometry: Geometry | str | None = None, camera: str = "oblique",
         frame: int | None = None, mask: np.ndarray | bool | None = None,
         window_size: tuple[int, int] = (768, 576), backend: str = "widgets") -> Any:
    """Interactive view in Jupyter: a frame slider + camera menu over static renders, or a PyVista backend."""
    f = as_frames(data, geometry, mask)
    t0 = 0 if frame is None else frame
    if not 0 <= t0 < len(f.labels):
        raise OcclabError(f"frame {t0} is out of range: the input has {len(f.labels)} frames "
                          f"(0..{len(f.labels) - 1})")
    frame_mask = (lambda t: None) if f.mask is None else (lambda t: f.mask[t])
    if backend != "widgets":  # a PyVista jupyter backend: "static", or "trame" / "client" / "server" / "html"
        if backend != "static" and importlib.util.find_spec("trame") is None:
            raise OcclabError(f"PyVista backend {backend!r} needs trame: install 'pyvista[jupyter]', or use "
                              f"backend='widgets' (frame slider over static renders) or 'static'")
        plotter = pv.Plotter(notebook=True, window_size=list(window_size), lighting="three lights")
        plotter.set_background(BACKGROUND)
        plot_frame(plotter, f.labels[t0], f.geometry, camera, True, frame_mask(t0))
        return plotter.show(jupyter_backend=backend, return_viewer=True)
    import imageio.v3 as iio
    import ipywidgets as w

    plotter = new_plotter(window_size)
    classes = present_classes(f.labels)
    image = w.Image(format="png", width=window_size[0], height=window_size[1])
    slider = w.IntSlider(value=t0, min=0, max=len(f.labels) - 1, description="frame",
                         disabled=len(f.labels) == 1, continuous_update=False)
    menu = w.Dropdown(options=list(CAMERAS), value=camera, description="camera")

    def redraw(_: Any = None) -> None:
        plot_frame(plotter, f.labels[slider.value], f.geometry, menu.value, classes, frame_mask(slider.value))
        image.value = iio.imwrite("<bytes>", np.asarray(plotter.screenshot(return_img=True))[..., :3],
                                  extension=".png")

    slider.observe(redraw, names="value")
    menu.observe(redraw, names="value")
    redraw()
    box = w.VBox([w.HBox([slider, menu]), image])
    weakref.finalize(box, plotter.close)
    return box


def view_file(path: str | os.PathLike, frame: int | None = None, camera: str = "oblique",
              out: str | os.PathLike = "view.png", mask: bool = False,
              window_size: tuple[int, int] = (960, 720)) -> Path:
    """Render an occlab npz: PNG (frame, default 0) or GIF / MP4 (all frames, or only `frame`) by out's suffix."""
    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES + MOVIE_SUFFIXES:
        raise OcclabError(f"{out}: unknown output type {out.suffix or '(none)'!r}; expected --out FILE.png, "
                          f"FILE.gif or FILE.mp4")
    if camera not in CAMERAS:
        raise OcclabError(f"unknown camera {camera!r}; expected one of {', '.join(CAMERAS)}")
    seq = load_sequence(path)
    if frame is not None and not 0 <= frame < seq.frames:
        raise OcclabError(f"frame {frame} is out of range: {path} has {seq.frames} frames (0..{seq.frames - 1})")
    if out.suffix.lower() in IMAGE_SUFFIXES:
        render_frame(seq, None, camera, out, window_size, mask, frame or 0)
        return out
    data = seq if frame is None else seq.slice(np.array([frame]))
    return render_sequence(data, None, out, camera, window_size=window_size, mask=mask)
