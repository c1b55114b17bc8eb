"""Frozen, versioned metric networks: the committed ones, their checksums, versions in results, clear errors."""
import json

import numpy as np
import pytest

from occlab.cli import main
from occlab.errors import OcclabError
from occlab.metrics import networks
from occlab.metrics.generation import compare_results, default_weights, network_version

COMMITTED = {name: networks.version_name("f3d", "synthetic_town", "carlasc", grid)
             for name, grid in networks.PRESET_GRIDS.items()}
COMMITTED_2D = {name: networks.version_name("f2d", "synthetic_town", "carlasc", grid)
                for name, grid in networks.PRESET_GRIDS.items()}
RECIPES = {"f3d": (networks.RECIPE, networks.RECIPE["features"]),
           "f2d": (networks.RECIPE_F2D, networks.RECIPE_F2D["widths"][-1])}  # (recipe, feature dimension)
BOTH = [(kind, preset) for kind in RECIPES for preset in sorted(networks.PRESET_GRIDS)]


def _name(kind: str, preset: str) -> str:
    return (COMMITTED if kind == "f3d" else COMMITTED_2D)[preset]


@pytest.mark.parametrize("kind,preset", BOTH)
def test_committed_networks_match_their_checksums(kind, preset):
    net = networks.find(_name(kind, preset))
    assert net.committed
    net.verify()  # sha256 of weights.pt == manifest
    m = net.manifest
    recipe, d = RECIPES[kind]
    assert m["kind"] == kind and m["recipe"] == recipe and m["grid"] == list(networks.PRESET_GRIDS[preset])
    ref = net.reference()
    assert ref["mean"].shape == (d,) and ref["cov"].shape == (d, d) and ref["count"] == m["reference_split"]["count"]
    assert np.allclose(ref["cov"], ref["cov"].T)


def test_committed_networks_are_small():
    """Four networks (f3d and f2d for the smoke and study grids): a few MB, so everyone scores with the same bytes."""
    total = sum(p.stat().st_size for p in networks.COMMITTED.rglob("*") if p.is_file())
    assert total < 6 * 2**20


@pytest.mark.parametrize("kind,preset", BOTH)
def test_default_weights_is_the_committed_network(kind, preset):
    grid = networks.PRESET_GRIDS[preset]
    space = "3d" if kind == "f3d" else "2d"
    assert default_weights(space, "synthetic_town", grid, "carlasc") == networks.find(_name(kind, preset)).weights


def test_changed_weights_are_refused(tmp_path, monkeypatch):
    src = networks.find(COMMITTED["smoke"]).path
    dst = tmp_path / "networks" / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    (dst / "weights.pt").write_bytes((dst / "weights.pt").read_bytes() + b"x")
    net = networks.Network(src.name, dst)
    with pytest.raises(OcclabError, match="sha256"):
        net.verify()


def test_unknown_version_is_a_clear_error():
    with pytest.raises(OcclabError, match="unknown metric network version 'f3d-nowhere-v9'"):
        networks.find("f3d-nowhere-v9")


def test_mixed_network_versions_are_refused():
    res = {"fid": 1.0, "network_version": network_version(networks.find(COMMITTED["smoke"]).weights)}
    assert res["network_version"].startswith(COMMITTED["smoke"] + "@")
    assert compare_results(res, dict(res)) == res["network_version"]
    other = {**res, "network_version": "f3d-synthetic_town-carlasc-16x16x8-v2@000000000000"}
    with pytest.raises(OcclabError, match="different metric networks"):
        compare_results(res, other)
    with pytest.raises(OcclabError, match="no network_version"):
        compare_results(res, {"fid": 1.0})


def test_eval_gen_compare_refuses_another_version(tmp_path, capsys):
    for what in ("real", "fake"):
        (tmp_path / what).mkdir()
        for i in range(6):
            lab = np.random.default_rng(i + (what == "fake") * 10).integers(0, 11, (1, 16, 16, 8), dtype=np.uint8)
            np.savez(tmp_path / what / f"{i}.npz", labels=lab)
    args = ["eval", "gen", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--geometry",
            "carlasc", "--frame-stride", "1", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["network_version"] == network_version(networks.find(COMMITTED["smoke"]).weights)
    (tmp_path / "same.json").write_text(json.dumps(res))
    (tmp_path / "other.json").write_text(json.dumps({**res, "network_version": "f3d-x-v1@123"}))
    assert main(args + ["--compare", str(tmp_path / "same.json")]) == 0
    assert json.loads(capsys.readouterr().out)["compared_with"]["network_version"] == res["network_version"]
    assert main(args + ["--compare", str(tmp_path / "other.json")]) == 2
    assert "different metric networks" in capsys.readouterr().err


def test_metrics_list_shows_committed_networks(capsys):
    assert main(["metrics", "list", "--json"]) == 0
    listed = {n["name"]: n for n in json.loads(capsys.readouterr().out)}
    assert set(COMMITTED.values()) <= set(listed)
    assert all(listed[n]["committed"] for n in COMMITTED.values())


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_rerunning_the_recipe_lands_near_the_committed_reference(tmp_path, kind):
    """Retrain the smoke-grid network by its recipe (3-5 min each on 2 cores) and compare reference statistics.

    Bitwise equality is not expected across machines (float order in spconv's CPU kernels, BLAS); the rerun's
    feature mean and covariance trace must land within networks.TOLERANCE (relative) of the committed ones.
    """
    ref = networks.find(_name(kind, "smoke")).reference()
    net = networks.build(grid=networks.PRESET_GRIDS["smoke"], kinds=(kind,), root=tmp_path, progress=False)[0]
    d = networks.compare_reference(ref, net.reference())
    assert d["count"][0] == d["count"][1]
    assert d["mean_rel"] < networks.TOLERANCE["mean_rel"] and d["trace_rel"] < networks.TOLERANCE["trace_rel"], d
