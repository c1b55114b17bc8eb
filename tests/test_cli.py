"""The command line: exact forms used by the issues, one-line errors for bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest

from occlab.cli import main


def run(*argv):
    return subprocess.run([sys.executable, "-m", "occlab", *argv], capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    out = run("--help").stdout
    for name in ("data", "view", "reproduce", "eval"):
        assert name in out


def test_data_sample_writes_the_documented_keys(tmp_path):
    out = tmp_path / "s.npz"
    assert main(["data", "sample", "synthetic", "--geometry", "carlasc", "--frames", "3", "--seed", "5",
                 "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z["labels"].shape == (3, 128, 128, 8) and z["labels"].dtype == np.uint8
        assert z["mask"].dtype == bool and z["mask"].shape == z["labels"].shape
        assert z["poses"].shape == (3, 4, 4) and int(z["command"]) in range(4)
        assert z["boxes"].shape[1] == 10


@pytest.mark.parametrize("argv,expected", [
    (["reproduce", "--preset", "huge"], "invalid choice: 'huge'"),
    (["data", "sample", "synthetic", "--geometry", "kitti", "--out", "x.npz"], "invalid choice: 'kitti'"),
    (["data", "sample", "synthetic", "--frames", "500", "--out", "x.npz"], "frames must be in 1..128"),
    (["data", "sample", "synthetic", "--frames", "2", "--out", "/proc/nope/x.npz"], "cannot write /proc/nope/x.npz"),
])
def test_bad_input_is_one_line_without_traceback(argv, expected):
    res = run(*argv)
    assert res.returncode == 2
    assert expected in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_eval_recon_json(tmp_path, capsys):
    gt = np.zeros((2, 4, 4, 2), np.uint8)
    gt[:, :2] = 6
    np.savez(tmp_path / "gt.npz", labels=gt)
    np.savez(tmp_path / "pred.npz", labels=gt)
    assert main(["eval", "recon", "--pred", str(tmp_path / "pred.npz"), "--gt", str(tmp_path / "gt.npz"),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["miou"] == 1.0 and res["iou"] == 1.0 and res["per_class"]["road"] == 1.0


def test_eval_recon_names_a_missing_file(tmp_path):
    res = run("eval", "recon", "--pred", str(tmp_path / "none.npz"), "--gt", str(tmp_path / "none.npz"))
    assert res.returncode == 2 and "none.npz" in res.stderr


def test_view_writes_a_png_and_rejects_a_non_occlab_file(tmp_path):
    npz = tmp_path / "s.npz"
    assert main(["data", "sample", "synthetic", "--frames", "2", "--out", str(npz)]) == 0
    assert main(["view", str(npz), "--frame", "1", "--camera", "bev", "--out", str(tmp_path / "v.png")]) == 0
    assert (tmp_path / "v.png").stat().st_size > 1000
    np.savez(tmp_path / "other.npz", points=np.zeros(3))
    res = run("view", str(tmp_path / "other.npz"), "--out", str(tmp_path / "x.png"))
    assert res.returncode == 2 and "not an occlab npz" in res.stderr and "Traceback" not in res.stderr
