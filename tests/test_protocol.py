"""Protocol cards: every table written through occlab.report.tables gets X.protocol.json, shown in the index."""
import json

import pandas as pd
import pytest

from occlab.report.html import write_index
from occlab.report.tables import (
    PROTOCOL_FIELDS,
    protocol_card,
    read_protocol,
    write_table,
)


def _runs_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    for rid, seed in (("dynamiccity-aaa", 0), ("dynamiccity-bbb", 1)):
        (root / rid).mkdir(parents=True)
        cfg = {"model": {"name": "dynamiccity"}, "train": {"seed": seed},
               "data": {"dataset": "synthetic_town", "geometry": "carlasc", "frames": 8, "crop": [32, 32, 8]}}
        (root / rid / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("OCCLAB_RUNS", str(root))
    return root


def test_every_table_gets_a_card_with_every_field(tmp_path):
    path = write_table(pd.DataFrame({"miou": [0.5]}), tmp_path, "t")
    card = read_protocol(path)
    assert path.with_name("t.protocol.json").is_file()
    assert set(PROTOCOL_FIELDS) - {"cost"} <= set(card)
    assert "cost" not in card  # no time or memory column: nothing to state
    assert card["ground_truth_in_sampling"] == "never"
    assert "split" in card["unstated"] and "ground_truth_in_sampling" not in card["unstated"]


def test_card_reads_the_runs_behind_the_numbers(tmp_path, monkeypatch):
    _runs_root(tmp_path, monkeypatch)
    df = pd.DataFrame({"variant": ["a", "b"], "run_ids": ["dynamiccity-aaa dynamiccity-bbb", "dynamiccity-aaa"]})
    card = read_protocol(write_table(df, tmp_path / "out", "t"))
    assert card["runs"] == ["dynamiccity-aaa", "dynamiccity-bbb"]
    assert card["dataset"] == "synthetic_town" and card["geometry"] == "carlasc crop 32x32x8"
    assert card["frames"] == 8 and card["seeds"] == [0, 1]
    beside = read_protocol(write_table(df.rename(columns={"run_ids": "ours: run_ids"}), tmp_path / "out", "b"))
    assert beside["runs"] == card["runs"]  # tables.beside prefixes our columns


def test_changing_the_protocol_changes_the_card(tmp_path):
    df = pd.DataFrame({"fid": [1.0]})
    df.attrs["protocol"] = {"split": "val", "mask": "none", "preset": "smoke", "samples": 4}
    first = read_protocol(write_table(df, tmp_path, "g"))
    second = read_protocol(write_table(df, tmp_path, "g", protocol={"mask": "camera", "conditions": ["layout"],
                                                                     "ground_truth_in_sampling": "layout map"}))
    assert first["mask"] == "none" and second["mask"] == "camera"
    assert second["conditions"] == ["layout"] and second["ground_truth_in_sampling"] == "layout map"
    assert first != second and second["split"] == "val"


def test_unknown_protocol_field_is_refused():
    with pytest.raises(ValueError, match="unknown protocol fields"):
        protocol_card(pd.DataFrame({"a": [1]}), {"maks": "camera"})


def test_a_table_mixing_metric_networks_is_refused(tmp_path):
    df = pd.DataFrame({"fid": [1.0, 2.0], "network_version": ["f3d-a@111", "f3d-a@222"]})
    with pytest.raises(ValueError, match="different metric networks"):
        write_table(df, tmp_path, "g")
    assert not (tmp_path / "g.csv").exists()
    card = read_protocol(write_table(df.iloc[:1], tmp_path, "g"))
    assert card["metric_network"] == "f3d-a@111"


def test_index_shows_the_card_under_the_table(tmp_path):
    nb = tmp_path / "01_x"
    write_table(pd.DataFrame({"miou": [0.5]}), nb, "with_card", protocol={"mask": "visibility"})
    pd.DataFrame({"miou": [0.1]}).to_csv(nb / "bare.csv", index=False)
    results = {"preset": "smoke", "notebooks": [{"name": "01_x", "status": "ok", "seconds": 1.0,
                                                 "files": ["01_x/with_card.csv", "01_x/with_card.protocol.json",
                                                           "01_x/bare.csv"]}]}
    page = write_index(tmp_path, results).read_text()
    table_at, card_at = page.index("with_card.csv"), page.index("with_card.protocol.json")
    assert table_at < card_at and "visibility" in page
    assert "no protocol card for this table" in page
    assert "Other files" not in page  # the card is not listed again as a loose file


def test_reconstruction_studies_state_their_protocol(tmp_path):
    """The VAE studies' tables carry split, classes, mask and preset, so their cards leave none of them unstated."""
    from occlab.studies.vae import recon_protocol

    runs, table = recon_protocol("study", pd.DataFrame({"miou": [0.3]}), pd.DataFrame({"miou": [0.3]}))
    card = read_protocol(write_table(table, tmp_path, "t"))
    assert card["preset"] == "study" and card["split"] == "val" and card["horizon"].startswith("none")
    assert not {"split", "classes_miou", "classes_iou", "mask", "preset", "horizon", "samples", "metric_network",
                "conditions"} & set(card["unstated"])
    assert runs.attrs["protocol"] == table.attrs["protocol"]


def test_generation_studies_state_every_field(tmp_path):
    """The cards of notebooks 02/05 (DiT samples), 07 (triplane diffusion, outpainting seams) and 08 (conditioned
    samples) state every protocol field, the metric network by name and checksum, and what of the ground truth
    entered sampling."""
    from occlab.metrics.generation import default_weights
    from occlab.studies import applications, triplane
    from occlab.studies.generation import generation_protocol
    from occlab.train.config import DataConfig

    data = DataConfig(frames=4, crop=(16, 16, 8))
    weights = default_weights("3d", data.dataset, data.crop, data.geometry)
    cards = {"generation": generation_protocol("smoke", data, ("3d",), weights),
             "diffusion": triplane.diffusion_protocol("smoke", data, 4, triplane.DIFFUSION_CONDITIONS),
             "commands": applications.protocol("smoke", {"data": data, "vae_run": "v", "dit_run": "d"},
                                               "the command alone")}
    for name, card in cards.items():
        table = pd.DataFrame({"fid": [1.0], "run_id": ["dit-x"]})  # runs come from the table's run column
        written = read_protocol(write_table(table, tmp_path, name, protocol=card))
        assert written["unstated"] == [], (name, written["unstated"])
        assert written["geometry"] == "carlasc crop 16x16x8"
    assert cards["generation"]["metric_network"].startswith("3D: f3d-synthetic_town-carlasc-16x16x8-v1")
    assert cards["generation"]["ground_truth_in_sampling"] == "never"
    assert "layout" in cards["diffusion"]["ground_truth_in_sampling"]  # conditions from val frames are declared
    seams = {"agreement": 0.5, "stats": {}, "real_stats": {}, "protocol": {"preset": "smoke", "frames": 1}}
    assert triplane.seam_table(seams).attrs["protocol"] == {"preset": "smoke", "frames": 1}
