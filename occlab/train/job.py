"""One training run in its own process: `python -m occlab.train.job JOB.json`.

The run cache starts every run this way, so that each run's peak memory is its own (a fresh process's peak
RSS on CPU) and a crash or an out-of-memory kill takes down the run, not the notebook that asked for it.
"""
from __future__ import annotations

import json
import sys

from occlab.errors import OcclabError


def main(path: str) -> int:
    from occlab.train.config import DataConfig, TrainConfig, from_dict
    from occlab.train.runs import build_model
    from occlab.train.trainer import train

    job = json.loads(open(path).read())
    spec, train_cfg = job["model"], from_dict(TrainConfig, job["train"])
    model = build_model(spec["name"], spec["config"], train_cfg.seed)
    train(model, spec, from_dict(DataConfig, job["data"]), train_cfg, job["out"],
          num_classes=spec["config"]["num_classes"], progress=job.get("progress", True))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except OcclabError as e:
        print(f"occlab: error: {e}", file=sys.stderr)
        sys.exit(2)
