"""Study helpers behind notebooks 01 and 06 (no training here: the notebooks' smoke runs train)."""
import pandas as pd
import pytest

from occlab.errors import OcclabError
from occlab.studies import reconstruction as rec
from occlab.studies.vae import vae_setup


def test_the_encoder_ablation_compares_at_nearly_equal_compression():
    planar = vae_setup("sep4d", "study")[0]
    dense = vae_setup("sep4d", "study", encoder="conv3d_se", latent_channels=rec.equal_ratio_channels("study"))[0]
    # planes: 65536 voxels / (8 x (16*16 + 2*16*4 + 2*4*16 + 4*4)) = 15.52; dense C=1: 65536 / (16*16*4*4) = 16
    assert planar.compression_ratio() == pytest.approx(15.52, abs=0.01)
    assert dense.compression_ratio() == 16.0


def test_frames_per_preset():
    assert rec.frames_of("paper") == (4, 8, 16, 32, 64) and rec.frames_of("study")[-1] == 16
    with pytest.raises(OcclabError, match="unknown preset 'fast'"):
        rec.frames_of("fast")


def test_per_class_puts_the_papers_rows_beside_ours_as_fractions():
    runs = pd.DataFrame([{"model": "sep4d", "frames": 8, "seed": s, "miou": 0.5 + s / 10, "iou_road": 0.9,
                          "iou_building": 0.2 * s} for s in (0, 1)])
    table = rec.per_class(runs)
    ours = table[table.source == "ours"].iloc[0]
    assert ours.method == "SEP-4D" and ours.miou == pytest.approx(0.55) and ours.building == pytest.approx(0.1)
    paper = table[(table.source == "paper (CarlaSC)") & (table.method == "SEP-4D")].iloc[0]
    assert paper.frames == 8 and paper.miou == pytest.approx(0.8533) and paper.road == pytest.approx(0.98542)
    assert set(table.frames) == {8}  # only the lengths we ran


def test_figures_show_the_richest_of_the_first_windows():
    import torch

    from occlab.studies.vae import richest_window

    def window(classes):  # labels (T, X, Y, Z) holding `classes`, one frame visible everywhere
        labels = torch.tensor(classes, dtype=torch.uint8).reshape(1, -1, 1, 1)
        return {"labels": labels, "mask": torch.ones_like(labels)}

    windows = [window([0, 6, 6]), window([0, 6, 8]), window([0, 1, 6, 8]), window([0, 1, 6, 8])]
    assert richest_window(windows) == 2 and richest_window(windows, candidates=2) == 1
