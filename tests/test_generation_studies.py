"""The generation studies behind notebooks 02 and 05: presets, summaries, claims and a smoke-sized run."""
import math

import numpy as np
import pandas as pd
import pytest

from occlab.errors import OcclabError
from occlab.report.claims import CLAIMS
from occlab.report.tables import read_protocol, write_table
from occlab.studies import generation as gen


def _table(pro: float, vconcat: float, unfold: float, std: float) -> pd.DataFrame:
    rows = pd.DataFrame([{"variant": v, "sample_seed": s, "fid_3d": f + (std if s else -std) / math.sqrt(2),
                          "is_3d": 1.0, "kid_3d": 0.1, "precision_3d": 0.5, "recall_3d": 0.5, "run_id": f"dit-{v}"}
                         for v, f in (("pro", pro), ("vconcat", vconcat), ("unfold", unfold)) for s in (0, 1)])
    return gen.summarize(rows).rename(columns=lambda c: c if c == "variant" else f"ours: {c}")


def test_presets_and_unknown_preset():
    assert gen.gen_size("smoke").samples < gen.gen_size("study").samples
    assert len(gen.gen_size("study").sample_seeds) >= 2  # the FID spread needs two sample seeds
    with pytest.raises(OcclabError, match="unknown preset"):
        gen.gen_size("huge")


def test_summarize_means_and_sample_seed_spread():
    t = _table(10.0, 20.0, 30.0, 1.0)
    pro = t[t.variant == "pro"].iloc[0]
    assert pro["ours: fid_3d"] == pytest.approx(10.0)
    assert pro["ours: fid_3d_std"] == pytest.approx(1.0)
    assert pro["ours: seeds"] == 2 and pro["ours: run_ids"] == "dit-pro"


def test_rollout_claims_hold_fail_or_are_inconclusive():
    by_id = lambda t: {c["id"]: c for c in gen.claims(t, "05_rollout_ablation", "study")}
    held = by_id(_table(10.0, 20.0, 30.0, 1.0))
    assert held["dc-t5-pro-vconcat"]["holds"] == "yes" and held["dc-t5-vconcat-unfold"]["holds"] == "yes"
    assert held["dc-t5-pro-vconcat"]["margin"] == pytest.approx(10.0)
    failed = by_id(_table(30.0, 20.0, 10.0, 1.0))
    assert failed["dc-t5-pro-vconcat"]["holds"] == "no"
    close = by_id(_table(19.0, 20.0, 30.0, 3.0))  # 1 apart, spread 3
    assert close["dc-t5-pro-vconcat"]["holds"] == "inconclusive"
    assert gen.claims(_table(10, 20, 30, 1), "05_rollout_ablation", "smoke")[0]["holds"] == "smoke"


def _methods_table(dynamiccity: float, occsora: float, std: float) -> pd.DataFrame:
    t = _table(dynamiccity, occsora, 99.0, std).replace({"pro": "dynamiccity", "vconcat": "occsora"})
    return t[t.variant != "unfold"]


def test_the_occsora_claim_compares_the_two_rows_with_the_sample_seed_spread():
    (c,) = gen.claims(_methods_table(10.0, 30.0, 1.0), "02_generation", "study")
    assert c["id"] == "dc-t2-dc-occsora" and c["holds"] == "yes" and c["margin"] == pytest.approx(20.0)
    assert c["ours"] == [pytest.approx(10.0), pytest.approx(30.0)] and c["seeds"] == 2
    assert gen.claims(_methods_table(30.0, 10.0, 1.0), "02_generation", "study")[0]["holds"] == "no"
    assert gen.claims(_methods_table(19.0, 20.0, 3.0), "02_generation", "study")[0]["holds"] == "inconclusive"
    only = _methods_table(10.0, 30.0, 1.0)
    (missing,) = gen.claims(only[only.variant != "occsora"], "02_generation", "study")
    assert missing["holds"] == "inconclusive" and missing["note"] == "not run at this preset"


def test_generation_claims_belong_to_the_generation_notebooks():
    owners = {c.id: c.notebook for c in CLAIMS if c.id.startswith(("dc-t5", "dc-t2"))}
    assert owners == {"dc-t5-pro-vconcat": "05_rollout_ablation", "dc-t5-vconcat-unfold": "05_rollout_ablation",
                      "dc-t2-dc-occsora": "02_generation"}


@pytest.mark.slow
def test_smoke_rollout_ablation_writes_the_table_and_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path / "cache"))
    rows, table = gen.rollout_ablation("smoke", progress=False)
    assert set(rows.variant) == {*gen.ROLLOUTS, "real train windows (reference)"}
    for col in ("ours: fid_3d", "ours: kid_3d", "ours: precision_3d", "ours: recall_3d", "ours: s_per_iter",
                "ours: fid_3d_std", "paper: CarlaSC fid 3D"):
        assert col in table
    assert np.isfinite(table["ours: fid_3d"]).all()
    ref = table[table.variant.str.startswith("real")].iloc[0]
    assert ref["ours: fid_3d"] < table[table.variant == "pro"].iloc[0]["ours: fid_3d"]  # real beats a 20-step DiT
    verdicts = gen.claims(table, "05_rollout_ablation", "smoke")
    assert [v["holds"] for v in verdicts] == ["smoke", "smoke"]
    labels = gen.sample_labels(gen.dit_checkpoint(rows.run_id.iloc[0]), 2, 3, seed=0)
    again = gen.sample_labels(gen.dit_checkpoint(rows.run_id.iloc[0]), 2, 3, seed=0)
    assert labels.dtype == np.uint8 and labels.shape[0] == 2 and (labels == again).all()  # fixed seed: same samples
    card = read_protocol(write_table(table, tmp_path, "rollout_ablation"))
    assert card["unstated"] == [], card["unstated"]  # a generation card states everything, the network included
    assert card["metric_network"].startswith("3D: f3d-synthetic_town-carlasc-16x16x8-v1") and card["frames"] == 4
    assert card["ground_truth_in_sampling"] == "never" and card["conditions"].startswith("none")
    assert set(card["runs"]) == set(rows.run_id.dropna())


@pytest.mark.slow
def test_smoke_methods_table_has_both_rows_and_extra_generators(tmp_path, monkeypatch):
    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path / "cache"))
    data = gen.train_vae("smoke", progress=False)[1]
    val = gen.real_labels(data, "val", 4)
    rows, table = gen.methods("smoke", spaces=("3d",), extra={"val copy": val}, progress=False)
    assert list(table.variant) == ["dynamiccity", "occsora", "val copy", "real train windows (reference)"]
    copy = table[table.variant == "val copy"].iloc[0]
    assert copy["ours: fid_3d"] == pytest.approx(0.0, abs=1e-3)  # the validation windows against themselves
    occsora = table[table.variant == "occsora"].iloc[0]
    assert np.isfinite(occsora["ours: fid_3d"]) and occsora["ours: run_ids"].startswith("dit-")
    assert occsora["ours: run_ids"] != table[table.variant == "dynamiccity"].iloc[0]["ours: run_ids"]
    assert rows[rows.variant == "occsora"].vae_run.iloc[0] != rows[rows.variant == "dynamiccity"].vae_run.iloc[0]
    assert "paper: CarlaSC fid 3D" in table
    (c,) = gen.claims(table, "02_generation", "smoke")
    assert c["holds"] == "smoke" and c["note"] == "" and None not in c["ours"]
