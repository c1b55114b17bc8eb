"""occlab.render: PyVista scenes, BEV plots and class statistics on a small hand-made scene."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from occlab.classes import CLASS_ID, IGNORE, PALETTE
from occlab.data.geometry import get_geometry
from occlab.data.sequence import BOX_FIELDS, Sequence
from occlab.errors import OcclabError

SIZE = (320, 240)
ROAD, BUILDING, POLE, VEHICLE = (CLASS_ID[n] for n in ("road", "building", "pole", "vehicle"))
POLE_IJ = (70, 64)  # x = +2.6 m (ahead), y = 0.2 m


def scene(vehicle_x: int | None = None) -> np.ndarray:
    """CarlaSC grid: a road layer, a 20x20x6 building ahead-right, a 1-voxel pole of 5, 128 ignored voxels."""
    labels = np.zeros((128, 128, 8), np.uint8)
    labels[:, :, 0] = ROAD
    labels[80:100, 20:40, 1:7] = BUILDING  # x in [6.4, 14.4) m ahead, y in [-17.6, -9.6) m (right)
    labels[POLE_IJ[0], POLE_IJ[1], 1:6] = POLE
    labels[0, :, 7] = IGNORE
    if vehicle_x is not None:
        labels[vehicle_x:vehicle_x + 10, 70:75, 1:4] = VEHICLE
    return labels


def sequence(frames: int = 3) -> Sequence:
    """A few frames with a vehicle moving forward and its boxes."""
    labels = np.stack([scene(30 + 8 * t) for t in range(frames)])
    boxes = np.zeros((frames, len(BOX_FIELDS)), np.float32)
    g = get_geometry("carlasc")
    for t in range(frames):  # frame, cls, cx, cy, cz, l, w, h, yaw, track
        boxes[t] = (t, VEHICLE, g.min_bound[0] + (35 + 8 * t) * 0.4, g.min_bound[1] + 72.5 * 0.4, -1.0,
                    4.0, 2.0, 1.1, 0.0, 1)
    return Sequence(labels, np.ones(labels.shape, bool), np.tile(np.eye(4), (frames, 1, 1)), boxes=boxes,
                    geometry="carlasc")


def near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    """Pixels within `tol` of a colour in every channel."""
    return (np.abs(img[..., :3].astype(int) - np.asarray(rgb)) <= tol).all(-1)


def test_import_is_light():
    code = "import sys, occlab.render; print('pyvista' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_voxel_mesh_faces_and_colours():
    from occlab.render.scene import voxel_mesh

    labels = np.zeros((128, 128, 8), np.uint8)
    labels[POLE_IJ[0], POLE_IJ[1], 1:6] = POLE
    mesh = voxel_mesh(labels, "carlasc")
    assert mesh.n_cells == 5 * 4 + 2  # a 5-voxel column shows 4 sides each and 2 caps
    assert (mesh.cell_data["rgb"] == PALETTE[POLE]).all()
    g = get_geometry("carlasc")
    lo = np.asarray(g.min_bound) + np.asarray(POLE_IJ + (1,)) * np.asarray(g.voxel_size)
    assert np.allclose(mesh.bounds[::2], lo, atol=1e-5)
    mask = np.ones(labels.shape, bool)
    mask[..., 3:] = False
    assert voxel_mesh(labels, "carlasc", mask=mask).n_cells == 2 * 4 + 2
    centre = np.asarray(mesh.center)
    outward = ((mesh.cell_centers().points - centre) * mesh.cell_normals).sum(1)
    assert (outward > 0).all()  # faces wound outwards (the renderer culls back faces)
    assert voxel_mesh(np.zeros_like(labels)).n_cells == 0
    road = np.zeros((128, 128, 8), np.uint8)
    road[..., 0] = ROAD
    assert voxel_mesh(road, "carlasc").n_cells == 128 + 128 + 2 + 2  # runs along y merged into one quad each
    full = voxel_mesh(scene(), "carlasc")
    assert set(np.unique(full.cell_data["label"])) == {ROAD, BUILDING, POLE}
    vis = (scene() != 0) & (scene() != IGNORE)
    padded, area = np.pad(vis, 1), 0.0
    for axis in range(3):  # merged quads cover exactly the exposed voxel faces
        face = np.prod(np.delete(np.asarray(g.voxel_size), axis))
        for side in (slice(2, None), slice(None, -2)):
            index = [slice(1, -1)] * 3
            index[axis] = side
            area += (vis & ~padded[tuple(index)]).sum() * face
    assert np.isclose(full.area, area, rtol=1e-5)


def test_render_frame_png(tmp_path):
    import imageio.v3 as iio

    from occlab.render.scene import render_frame

    out = tmp_path / "sub" / "frame.png"
    img = render_frame(scene(), "carlasc", camera="bev", out=out, window_size=SIZE)
    assert img.shape == (SIZE[1], SIZE[0], 3) and img.dtype == np.uint8
    png = iio.imread(out)[..., :3]
    assert np.array_equal(png, img)
    assert img.std() > 20
    assert near(img, PALETTE[ROAD]).mean() > 0.2  # the road covers much of the top view
    assert near(img, PALETTE[BUILDING]).any()
    empty = render_frame(np.zeros((128, 128, 8), np.uint8), window_size=SIZE)
    assert empty.shape == img.shape
    for camera in ("oblique", "ego"):
        other = render_frame(scene(), camera=camera, window_size=SIZE)
        assert other.std() > 20 and near(other, PALETTE[ROAD]).any()


def test_render_sequence_gif_and_mp4(tmp_path):
    import imageio.v2
    import imageio.v3 as iio

    from occlab.render.scene import render_sequence

    gif = render_sequence(sequence(3), out=tmp_path / "seq.gif", camera="bev", window_size=SIZE)
    frames = iio.imread(gif, index=None)
    assert frames.shape[0] == 3 and frames.shape[1:3] == (SIZE[1], SIZE[0])
    mp4 = render_sequence(sequence(3).labels, "carlasc", out=tmp_path / "seq.mp4", window_size=SIZE)
    assert mp4.stat().st_size > 1000
    reader = imageio.v2.get_reader(mp4)
    assert reader.count_frames() == 3 and tuple(reader.get_meta_data()["size"]) == SIZE
    reader.close()
    with pytest.raises(OcclabError, match="expected a file ending in .gif, .mp4"):
        render_sequence(sequence(3), out=tmp_path / "seq.avi")


def test_bev_image_orientation_and_palette():
    from occlab.render.bev import UNOBSERVED, bev_image

    img = bev_image(scene())
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    # building: ahead (x > 0) and right (y < 0) -> upper half, right half of the image
    assert tuple(img[127 - 90, 127 - 30]) == PALETTE[BUILDING]
    rows, cols = np.nonzero((img == PALETTE[BUILDING]).all(-1))
    assert rows.max() < 64 and cols.min() >= 64
    assert tuple(img[127 - POLE_IJ[0], 127 - POLE_IJ[1]]) == PALETTE[POLE]
    assert tuple(img[64, 64]) == PALETTE[ROAD]
    assert bev_image(np.stack([scene(), scene()])).shape == (2, 128, 128, 3)
    mask = np.zeros((128, 128, 8), bool)
    mask[:, 64:] = True  # only the left half (y > 0) was seen -> image left half
    masked = bev_image(scene(), mask)
    assert (masked[:, 64:] == UNOBSERVED).all()
    seen = (masked[:, :64] == PALETTE[ROAD]).all(-1)
    assert seen.sum() == 128 * 64 - 1 and not seen[127 - POLE_IJ[0], 127 - POLE_IJ[1]]  # road, and the pole


def test_class_counts_and_stats_plot():
    import matplotlib.pyplot as plt

    from occlab.render.bev import class_counts, plot_class_stats

    labels = scene()
    counts = class_counts(labels)
    expected = {"road": 128 * 128, "building": 20 * 20 * 6, "pole": 5}
    expected["free"] = 128 * 128 * 8 - 128 - sum(expected.values())
    assert counts == {name: expected.get(name, 0) for name in counts} and len(counts) == 12
    fig = plot_class_stats(labels)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    total = sum(expected.values())
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names[:7] == ["free", "building", "barrier", "other", "pedestrian", "pole", "road"]
    assert np.allclose(heights, [100 * expected.get(n, 0) / total for n in names])
    assert ax.get_yscale() == "log"
    plt.close(fig)
    with pytest.raises(OcclabError, match="outside 0..10"):
        class_counts(np.full((2, 2, 2), 11, np.uint8), num_classes=11)


def test_plot_bev_panels_boxes_legend():
    import matplotlib.pyplot as plt

    from occlab.render.bev import plot_bev

    seq = sequence(5)
    fig = plot_bev(seq)
    assert [a.get_title() for a in fig.axes] == ["frame 0", "frame 2", "frame 4"]
    assert len(fig.axes[0].lines) == 2  # one box outline and the ego marker
    y, x = fig.axes[0].lines[0].get_data()
    assert np.isclose(x.max() - x.min(), 4.0) and np.isclose(y.max() - y.min(), 2.0)
    assert fig.axes[0].get_xlim()[0] > fig.axes[0].get_xlim()[1]  # y grows to the left
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["building", "pole", "road", "vehicle"]
    plt.close(fig)
    with pytest.raises(OcclabError, match="out of range"):
        plot_bev(seq, frames=(0, 9))
    fig, ax = plt.subplots()
    assert plot_bev(seq.labels, ax=ax, geometry="carlasc", legend=False) is fig
    assert ax.get_title() == "frame 0"
    plt.close(fig)


def test_view_file_outputs_and_errors(tmp_path):
    import imageio.v3 as iio

    from occlab.render.scene import view_file

    path = sequence(3).save(tmp_path / "seq.npz")
    png = view_file(path, frame=2, camera="bev", out=tmp_path / "v.png", window_size=SIZE)
    assert iio.imread(png).shape[:2] == (SIZE[1], SIZE[0])
    gif = view_file(path, frame=1, out=tmp_path / "one.gif", window_size=SIZE)
    assert iio.imread(gif, index=None).shape[0] == 1
    with pytest.raises(OcclabError, match=r"unknown output type '\.jpg'.*\.png.*\.gif.*\.mp4"):
        view_file(path, out=tmp_path / "v.jpg")
    with pytest.raises(OcclabError, match=r"frame 3 is out of range.*3 frames \(0\.\.2\)"):
        view_file(path, frame=3, out=tmp_path / "v.png")
    with pytest.raises(OcclabError, match="unknown camera 'side'"):
        view_file(path, camera="side", out=tmp_path / "v.png")
    other = tmp_path / "other.npz"
    np.savez(other, semantics=np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(OcclabError, match="not an occlab npz"):
        view_file(other, out=tmp_path / "v.png")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(OcclabError, match="not a readable npz"):
        view_file(text, out=tmp_path / "v.png")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OcclabError, match="cannot write"):
        view_file(path, out=blocker / "v.png")


@pytest.mark.skipif(importlib.util.find_spec("trame") is not None, reason="trame is installed")
def test_show_trame_backend_needs_trame():
    from occlab.render.scene import show

    with pytest.raises(OcclabError, match=r"needs trame.*pyvista\[jupyter\]"):
        show(sequence(1), backend="trame")


def test_show_widget_rerenders():
    from occlab.render.scene import show

    box = show(sequence(2), camera="bev", window_size=SIZE)
    (slider, menu), image = box.children[0].children, box.children[1]
    first = image.value
    assert first[:4] == b"\x89PNG"
    slider.value = 1
    assert image.value != first
    menu.value = "oblique"
    assert image.value[:4] == b"\x89PNG"


def test_real_occ3d_frame_maps_and_renders(tmp_path):
    """The real Occ3D-nuScenes frame, mapped to occlab classes by its manifest, renders with its classes."""
    from pathlib import Path

    from occlab.data.manifest import class_table, load_manifest
    from occlab.render.scene import render_frame

    with np.load(Path(__file__).parent / "fixtures/occ3d_nuscenes/labels.npz") as z:
        raw, camera = z["semantics"], z["mask_camera"].astype(bool)
    lut, names = class_table(load_manifest("occ3d_nuscenes"))
    labels = lut[raw].astype(np.uint8)
    assert (labels == CLASS_ID["road"]).sum() == (raw == 11).sum()
    img = render_frame(labels, "occ3d", camera="bev", out=tmp_path / "real.png", mask=camera, window_size=SIZE)
    assert (tmp_path / "real.png").stat().st_size > 0 and img.std() > 20
    assert near(img, PALETTE[ROAD]).mean() > 0.05 and near(img, PALETTE[CLASS_ID["vegetation"]]).any()
