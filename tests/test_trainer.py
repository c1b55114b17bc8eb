"""The shared trainer: learning, exact resumption, divergence stop, DDP, the run cache, eval from the CLI."""
import csv
import json
import os
import socket

import pytest
import torch

from occlab.cli import main
from occlab.errors import OcclabError
from occlab.models import DynamicCity, dynamiccity_tiny
from occlab import checkpoint
from occlab.train.config import DataConfig, TrainConfig
from occlab.train.losses import OccupancyLoss
from occlab.train.runs import build_model, model_spec, train_or_load
from occlab.train.trainer import TrainingDiverged, evaluate, train

GRID, FRAMES = (16, 16, 8), 4


def setup(steps=8, **train_kw):
    cfg = dynamiccity_tiny(GRID, FRAMES)
    data = DataConfig(frames=FRAMES, crop=GRID, train_sequences=2, val_sequences=1)
    return cfg, data, TrainConfig(steps=steps, ckpt_every=4, **train_kw)


def run(out, steps=8, **kw):
    cfg, data, tc = setup(steps, **kw)
    torch.manual_seed(0)
    return train(DynamicCity(cfg), model_spec("dynamiccity", cfg), data, tc, out, progress=False)


def losses(out):
    with open(out / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(autouse=True)
def town_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OCCLAB_CACHE", str(tmp_path_factory.getbasetemp() / "town"))


def test_overfit_one_sequence_beats_chance(tmp_path):
    cfg, data, tc = setup(steps=80, lr=3e-3, kl_weight=0.0)
    data.train_sequences = 1
    model = DynamicCity(cfg)
    res = train(model, model_spec("dynamiccity", cfg), data, tc, tmp_path, progress=False)
    from occlab.data import make_dataset

    seen = make_dataset("synthetic_town", split="train", **data.source_options("train"))
    m = evaluate(model, seen, "cpu", cfg.num_classes)
    assert res.metrics["final_loss"] < 0.6 * losses(tmp_path)[0]
    assert m.miou > 0.35 and m.iou > 0.7  # chance (uniform guesses) is below 0.1 mIoU
    meta = json.loads((tmp_path / "metrics.json").read_text())
    assert meta["steps"] == 80 and meta["params"] > 0 and meta["s_per_iter"] > 0


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    straight = run(tmp_path / "straight")
    calls = {"n": 0}
    forward = OccupancyLoss.forward

    def interrupting(self, out, labels):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return forward(self, out, labels)

    monkeypatch.setattr(OccupancyLoss, "forward", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    assert checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")["step"] == 5
    monkeypatch.setattr(OccupancyLoss, "forward", forward)
    resumed = run(tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)
    assert resumed.miou == pytest.approx(straight.miou, abs=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = OccupancyLoss.forward

    def exploding(self, out, labels):
        parts = forward(self, out, labels)
        calls["n"] += 1
        if calls["n"] == 6:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(OccupancyLoss, "forward", exploding)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 6"):
        run(tmp_path)
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 4


def _ddp_worker(rank, port, out, cache):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OCCLAB_CACHE=cache)
    torch.set_num_threads(1)
    run(out, steps=4)
    torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(port, tmp_path, os.environ["OCCLAB_CACHE"]), nprocs=2)
    meta = json.loads((tmp_path / "metrics.json").read_text())
    assert meta["steps"] == 4 and 0 <= meta["val"]["miou"] <= 1
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 4


def test_run_cache_trains_once(tmp_path):
    cfg, data, tc = setup(steps=3)
    first = train_or_load("dynamiccity", cfg, data, tc, root=tmp_path, progress=False)  # in a child process
    assert first.metrics["steps"] == 3 and first.metrics["peak_mem_gib"] > 0
    stamp = (first.path / "metrics.json").stat().st_mtime_ns
    again = train_or_load("dynamiccity", cfg, data, tc, root=tmp_path, progress=False)
    assert again.id == first.id and (again.path / "metrics.json").stat().st_mtime_ns == stamp
    tc.device, tc.threads = "cpu", 1  # not part of the key
    assert train_or_load("dynamiccity", cfg, data, tc, root=tmp_path, progress=False).id == first.id
    tc.lr = 2e-3
    other = train_or_load("dynamiccity", cfg, data, tc, root=tmp_path, progress=False, isolate=False)
    assert other.id != first.id and other.finished


def test_a_run_repeats_exactly_in_a_fresh_process(tmp_path):
    """Two child processes train one configuration to the same losses and metrics (weights drawn from the seed,
    not from torch's per-process random seed)."""
    cfg, data, tc = setup(steps=3, threads=1)
    a, b = (train_or_load("dynamiccity", cfg, data, tc, root=tmp_path / r, progress=False) for r in "ab")

    def logged(run):
        with open(run.path / "log.csv") as f:
            return [{k: v for k, v in r.items() if k != "s_per_iter"} for r in csv.DictReader(f)]

    assert logged(a) == logged(b) and a.metrics["val"] == b.metrics["val"]


def test_build_model_draws_its_weights_from_the_seed():
    cfg = dynamiccity_tiny(GRID, FRAMES)
    spec = model_spec("dynamiccity", cfg)
    first = build_model("dynamiccity", spec["config"], seed=5).state_dict()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    again = build_model("dynamiccity", spec["config"], seed=5).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator is left alone
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = build_model("dynamiccity", spec["config"], seed=6).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_failing_isolated_run_reports_its_error(tmp_path):
    cfg, data, tc = setup(steps=2)
    data.frames = 200  # longer than any town sequence: the child stops with a clear error
    with pytest.raises(OcclabError, match="failed"):
        train_or_load("dynamiccity", cfg, data, tc, root=tmp_path, progress=False)


def test_eval_vae_from_the_command_line(tmp_path, capsys):
    run(tmp_path, steps=2)
    assert main(["eval", "vae", "--ckpt", str(tmp_path / "checkpoint.pt"), "--split", "val", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"miou", "iou", "per_class"} and 0 <= out["miou"] <= 1
    assert "road" in out["per_class"]
