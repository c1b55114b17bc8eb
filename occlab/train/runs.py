"""The run cache: every trained model is stored under a key derived from its whole configuration.

The key hashes the model name and config, the data and training configs (minus what does not change the
result beyond rounding: device, threads, workers, logging cadence) and the source of the model's code, so
notebooks that need the same model train it once, a finished run is reused, and an interrupted one resumes.
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
RUN_FORMAT = 2  # 2: a run's initial weights are drawn from its seed (format 1 runs drew them from torch's own)


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
    payload = json.dumps({"model": spec, "data": to_dict(data), "train": train_part, "format": RUN_FORMAT},
                         sort_keys=True)
    return f"{spec['name']}-{hashlib.sha1(payload.encode()).hexdigest()[:12]}"


def build_model(name: str, config_dict: dict, seed: int | None = None):
    """Instantiate a registered model from its JSON config; with `seed`, its initial weights are drawn from it.

    A training run passes its seed: torch seeds a new process's generator at random, so unseeded weights would
    differ between two runs of one configuration. The caller's global RNG is left as it was.
    """
    import torch

    registry = model_registry()
    if name not in registry:
        raise OcclabError(f"unknown model {name!r}; expected one of {', '.join(registry)}")
    cfg_cls, model_cls = registry[name][:2]
    config = from_dict(cfg_cls, config_dict)
    if seed is None:
        return model_cls(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


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
    write_provenance(run.path, data)
    if not isolate:
        from occlab.train.trainer import train as run_training

        model = build_model(name, spec["config"], train.seed)
        run_training(model, spec, data, train, run.path, config.num_classes, progress)
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


# ---- the registry: provenance of every run, listing, summaries and reproduction --------------------------------
DATA_CODE = ("occlab.data.town", "occlab.data.windows")  # the synthetic town is defined by its generator's code


def code_revision() -> str:
    """`git describe --always --dirty` of the kit's checkout, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10, check=False, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def data_fingerprint(data: DataConfig, max_files: int = 20000) -> str:
    """A hash of what a run trains on: the data config, plus the generator's source (synthetic town) or the names
    and sizes of the files under data_root (a real dataset; at most `max_files` files, in sorted order)."""
    h = hashlib.sha1(json.dumps(to_dict(data), sort_keys=True).encode())
    if data.data_root:
        root = Path(data.data_root)
        for i, f in enumerate(sorted(p for p in root.rglob("*") if p.is_file())):
            if i >= max_files:
                break
            h.update(f"{f.relative_to(root)}:{f.stat().st_size}".encode())
    else:
        for name in DATA_CODE:
            mod = importlib.import_module(name)
            files = [Path(mod.__file__)]
            if Path(mod.__file__).name == "__init__.py":
                files = sorted(Path(mod.__file__).parent.rglob("*.py"))
            for f in files:
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def write_provenance(path: Path, data: DataConfig) -> dict:
    """provenance.json of a run folder (code revision, data fingerprint, date, python/torch); kept if present."""
    import datetime
    import platform

    import torch

    file = Path(path) / "provenance.json"
    if file.is_file():
        return json.loads(file.read_text())
    info = {"code_revision": code_revision(), "data_fingerprint": data_fingerprint(data),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": str(torch.__version__)}
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(info, indent=2))
    return info


def list_runs(root: str | os.PathLike | None = None) -> list[Run]:
    """Every run folder (one with a config.json) under the runs root, oldest first."""
    base = Path(root) if root else runs_dir()
    found = [Run(p.name, p) for p in base.glob("*") if (p / "config.json").is_file()]
    return sorted(found, key=lambda r: (r.path / "config.json").stat().st_mtime)


FINAL_KEYS = ("miou", "iou", "tail_loss", "loss")


def final_metrics(run: Run) -> dict:
    """The headline numbers of a finished run: validation mIoU / IoU, or a final loss ({} if unfinished)."""
    if not run.finished:
        return {}
    m = run.metrics
    src = m.get("val") if isinstance(m.get("val"), dict) else m
    return {k: src[k] for k in FINAL_KEYS if isinstance(src.get(k), (int, float))}


def summary(run: Run) -> dict:
    """One row of `occlab runs list`: id, model, config summary, finished, final metrics, date."""
    import datetime

    cfg = run.config
    data, train = cfg.get("data", {}), cfg.get("train", {})
    crop = data.get("crop")
    conf = (f"{data.get('dataset', '?')} {data.get('geometry', '')} "
            f"{'x'.join(map(str, crop)) if crop else 'full'} T={data.get('frames', '?')} "
            f"steps={train.get('steps', '?')} seed={train.get('seed', '?')}")
    when = datetime.datetime.fromtimestamp((run.path / "config.json").stat().st_mtime, datetime.timezone.utc)
    return {"id": run.id, "model": cfg.get("model", {}).get("name", "?"), "config": conf,
            "finished": run.finished, "final": final_metrics(run), "date": when.strftime("%Y-%m-%d %H:%M")}


def loss_summary(run: Run) -> dict:
    """First, minimum and last training loss and the number of logged steps (from log.csv)."""
    import csv

    log = run.path / "log.csv"
    if not log.is_file():
        return {}
    with open(log) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss") not in (None, "")]
    if not losses:
        return {}
    return {"steps_logged": len(losses), "first": losses[0], "min": min(losses), "last": losses[-1]}


def show(run: Run) -> dict:
    """Everything `occlab runs show` prints: config, provenance, loss curve summary, final metrics."""
    prov = run.path / "provenance.json"
    return {"id": run.id, "path": str(run.path), "config": run.config,
            "provenance": json.loads(prov.read_text()) if prov.is_file() else "not recorded (run predates it)",
            "loss": loss_summary(run), "finished": run.finished, "final": final_metrics(run)}


def reproduce(run_id: str, scratch: str | os.PathLike, root: str | os.PathLike | None = None,
              progress: bool = False, isolate: bool = True) -> dict:
    """Retrain a run from its recorded config into `scratch` and compare its final metrics with the recorded ones.

    Returns {"id", "scratch", "recorded", "reproduced", "difference"} (difference = reproduced - recorded).
    """
    run = find_run(run_id, root)
    if not run.finished:
        raise OcclabError(f"run {run_id} has no metrics.json yet (unfinished): nothing to compare; finish it first")
    cfg = run.config
    name = cfg["model"]["name"]
    cfg_cls = model_registry()[name][0]
    new = train_or_load(name, from_dict(cfg_cls, cfg["model"]["config"]), from_dict(DataConfig, cfg["data"]),
                        from_dict(TrainConfig, cfg["train"]), root=scratch, progress=progress, isolate=isolate)
    recorded, reproduced = final_metrics(run), final_metrics(new)
    diff = {k: reproduced[k] - recorded[k] for k in recorded if k in reproduced}
    if new.id != run.id:  # the model's code changed since: the key differs, say so
        diff["note"] = f"the config now hashes to {new.id} (model code changed since the run)"
    return {"id": run.id, "scratch": str(new.path), "recorded": recorded, "reproduced": reproduced,
            "difference": diff}
