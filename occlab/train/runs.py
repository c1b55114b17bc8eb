"""The run cache: every trained model is stored under a key derived from its whole configuration.

The key hashes the model name and config, the data and training configs (minus what does not change the
result: device, threads, workers, logging cadence) and the source of the model's code, so notebooks that need
the same model train it once, a finished run is reused, and an interrupted one resumes.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from occlab.errors import OcclabError
from occlab.train.config import DataConfig, TrainConfig, from_dict, to_dict

NOT_IN_KEY = ("device", "threads", "num_workers", "ckpt_every", "val_every")
SHARED_MODEL_CODE = ("occlab.models.blocks", "occlab.planes")


def runs_dir() -> Path:
    """Where runs live: $OCCLAB_RUNS, default ~/.cache/occlab/runs."""
    return Path(os.environ.get("OCCLAB_RUNS", Path.home() / ".cache" / "occlab" / "runs"))


def model_registry() -> dict:
    """name -> (config class, model class, module) of every model the trainer knows."""
    from occlab.models import MODELS

    return MODELS


def code_version(name: str) -> str:
    """Hash of the source of a model's module and the shared blocks it is built from."""
    _, model_cls = model_registry()[name][:2]
    modules = [inspect.getmodule(model_cls).__name__, *SHARED_MODEL_CODE]
    text = b"".join(Path(inspect.getsourcefile(importlib.import_module(m))).read_bytes() for m in modules)
    return hashlib.sha1(text).hexdigest()[:10]


def model_spec(name: str, config) -> dict:
    """The JSON-able identity of a model: name, config, code version."""
    return {"name": name, "config": to_dict(config), "code": code_version(name)}


def run_key(spec: dict, data: DataConfig, train: TrainConfig) -> str:
    """A stable id of a run: model name plus a hash of everything that determines its result."""
    train_part = {k: v for k, v in to_dict(train).items() if k not in NOT_IN_KEY}
    payload = json.dumps({"model": spec, "data": to_dict(data), "train": train_part}, sort_keys=True)
    return f"{spec['name']}-{hashlib.sha1(payload.encode()).hexdigest()[:12]}"


def build_model(name: str, config_dict: dict):
    """Instantiate a registered model from its JSON config."""
    registry = model_registry()
    if name not in registry:
        raise OcclabError(f"unknown model {name!r}; expected one of {', '.join(registry)}")
    cfg_cls, model_cls = registry[name][:2]
    return model_cls(from_dict(cfg_cls, config_dict))


def load_trained(ckpt: str | os.PathLike, split: str = "val"):
    """(model in eval mode, its num_classes, the windows of `split`) from a trainer checkpoint."""
    from occlab import checkpoint
    from occlab.data import make_dataset

    state = checkpoint.load(ckpt)
    info = state["model_info"]
    model = build_model(info["name"], info["config"])
    model.load_state_dict(state["model"])
    data = from_dict(DataConfig, state["data"])
    dataset = make_dataset(data.dataset, data.data_root, split, **data.source_options(split))
    return model.eval(), info["config"]["num_classes"], dataset


@dataclass
class Run:
    """A run folder of the cache: its id, path and (when finished) metrics."""

    id: str
    path: Path

    @property
    def finished(self) -> bool:
        return (self.path / "metrics.json").is_file()

    @property
    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


def train_or_load(name: str, config, data: DataConfig, train: TrainConfig, root: str | os.PathLike | None = None,
                  progress: bool = True, isolate: bool = True) -> Run:
    """The finished run of this configuration: reused when cached, resumed when interrupted, else trained.

    With `isolate` the run trains in a child process (`python -m occlab.train.job`), so its peak memory is
    its own and a crash cannot take the caller down.
    """
    spec = model_spec(name, config)
    key = run_key(spec, data, train)
    run = Run(key, (Path(root) if root else runs_dir()) / key)
    if run.finished:
        return run
    if not isolate:
        from occlab.train.trainer import train as run_training

        run_training(build_model(name, spec["config"]), spec, data, train, run.path, config.num_classes, progress)
        return run
    run.path.mkdir(parents=True, exist_ok=True)
    job = run.path / "job.json"
    job.write_text(json.dumps({"model": spec, "data": to_dict(data), "train": to_dict(train),
                               "out": str(run.path), "progress": progress}, indent=2))
    proc = subprocess.Popen([sys.executable, "-m", "occlab.train.job", str(job)], stderr=subprocess.PIPE)
    tail = b""
    for chunk in iter(lambda: proc.stderr.read1(4096), b""):  # show the child's progress, keep its last words
        sys.stderr.write(chunk.decode(errors="replace"))
        sys.stderr.flush()
        tail = (tail + chunk)[-4000:]
    if proc.wait() != 0 or not run.finished:
        last = "\n".join(tail.decode(errors="replace").replace("\r", "\n").strip().splitlines()[-12:])
        raise OcclabError(f"run {key} failed (exit {proc.returncode}); its folder is {run.path}:\n{last}")
    return run


def find_run(run_id: str, root: str | os.PathLike | None = None) -> Run:
    """A run by id, with an error listing a few known ids when it does not exist."""
    base = Path(root) if root else runs_dir()
    run = Run(run_id, base / run_id)
    if not (run.path / "config.json").is_file():
        known = sorted(p.name for p in base.glob("*") if (p / "config.json").is_file())[:5]
        raise OcclabError(f"no run {run_id!r} under {base}; known runs include: {', '.join(known) or 'none'}")
    return run
