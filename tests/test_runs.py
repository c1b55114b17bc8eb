"""The run registry: provenance of every run, `occlab runs list/show/reproduce`, clear errors."""
import json

import pytest

from occlab.cli import main
from occlab.errors import OcclabError
from occlab.studies.vae import vae_setup
from occlab.train import runs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A smoke DynamicCity run (8 steps at 16x16x8, 4 frames) trained in-process."""
    root = tmp_path_factory.mktemp("runs")
    cfg, data, train = vae_setup("dynamiccity", "smoke")
    return runs.train_or_load("dynamiccity", cfg, data, train, root=root, progress=False, isolate=False), root


def test_every_run_records_code_revision_and_data_fingerprint(tiny_run):
    run, _ = tiny_run
    prov = json.loads((run.path / "provenance.json").read_text())
    assert prov["code_revision"] and prov["torch"]
    assert len(prov["data_fingerprint"]) == 16


def test_data_fingerprint_follows_the_data_config():
    _, data, _ = vae_setup("dynamiccity", "smoke")
    _, other, _ = vae_setup("dynamiccity", "study")
    assert runs.data_fingerprint(data) == runs.data_fingerprint(data)
    assert runs.data_fingerprint(data) != runs.data_fingerprint(other)


def test_data_fingerprint_of_a_real_root_sees_its_files(tmp_path):
    _, data, _ = vae_setup("dynamiccity", "smoke")
    data.data_root = str(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"1234")
    before = runs.data_fingerprint(data)
    (tmp_path / "b.bin").write_bytes(b"5")
    assert runs.data_fingerprint(data) != before


def test_runs_list_and_show(tiny_run, capsys):
    run, root = tiny_run
    assert main(["runs", "list", "--root", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == [run.id]
    assert rows[0]["model"] == "dynamiccity" and rows[0]["finished"] and "miou" in rows[0]["final"]
    assert "16x16x8" in rows[0]["config"]
    assert main(["runs", "show", run.id, "--root", str(root)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["data"]["crop"] == [16, 16, 8]
    assert shown["provenance"]["data_fingerprint"]
    assert shown["loss"]["steps_logged"] == 8 and shown["loss"]["first"] > 0


def test_unknown_run_id_is_a_clear_error(tmp_path, capsys):
    assert main(["runs", "show", "dynamiccity-000000000000", "--root", str(tmp_path)]) == 2
    assert "no run 'dynamiccity-000000000000'" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_retrains_and_compares(tiny_run, tmp_path):
    run, root = tiny_run
    res = runs.reproduce(run.id, tmp_path / "scratch", root, isolate=False)
    assert res["reproduced"].keys() == res["recorded"].keys() and "miou" in res["difference"]
    assert res["scratch"].startswith(str(tmp_path / "scratch"))
    assert res["difference"]["iou"] == 0 and res["difference"]["miou"] == 0  # same config, seed, threads: same run


def test_reproduce_of_an_unknown_run_is_a_clear_error(tmp_path):
    with pytest.raises(OcclabError, match="no run 'nope'"):
        runs.reproduce("nope", tmp_path / "s2", tmp_path)
