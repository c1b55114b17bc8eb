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


def test_step_cost_times_the_variants_side_by_side(tmp_path):
    """step_cost: one row per variant with a positive median step time and its round-to-round spread, and the
    peak memory of a fresh `occlab bench step` process of that variant; its card states how, leaving nothing
    unstated, and the summary table's card names the same measurement."""
    import torch

    from occlab.report.tables import read_protocol, write_table
    from occlab.studies import vae

    variants = [{"encoder": "avgpool", "decoder": "ess"}, {"encoder": "projection", "decoder": "query"}]
    threads = torch.get_num_threads()
    cost = vae.step_cost(variants, "smoke", rounds=2, progress=False)
    assert torch.get_num_threads() == threads
    assert list(cost.encoder) == ["avgpool", "projection"] and list(cost.decoder) == ["ess", "query"]
    assert (cost.s_per_iter > 0).all() and (cost.s_per_iter_std >= 0).all() and set(cost.rounds) == {2}
    assert ((cost.peak_mem_gib > 0.1) & (cost.peak_mem_gib < 8)).all()
    with pytest.raises(OcclabError, match="fusion"):
        vae.step_cost([{"fusion": "sep"}], "smoke", memory=False, progress=False)
    runs = pd.DataFrame([{**v, "seed": 0, "miou": 0.3, "iou": 0.5, "run_id": f"r{i}"} for i, v in enumerate(variants)])
    table = vae.with_cost(vae.summarize(runs, ["encoder", "decoder"], metrics=("miou", "iou")), cost,
                          ["encoder", "decoder"])
    assert table.s_per_iter.tolist() == cost.s_per_iter.tolist()
    runs, cost, table = vae.cost_protocol("smoke", runs, cost, table)
    card = read_protocol(write_table(cost, tmp_path, "cost"))
    assert card["unstated"] == [] and "alternating in one process" in card["cost"]
    assert card["geometry"] == "carlasc crop 16x16x8" and card["frames"] == 4
    assert read_protocol(write_table(table, tmp_path, "t"))["cost"] == card["cost"]
    assert "training log" in read_protocol(write_table(runs.assign(s_per_iter=1.0), tmp_path, "r"))["cost"]
