"""Where one `occlab bench step` workload spends its time: torch.profiler over one step after a warm-up.

    .venv/bin/python benchmarks/profile_step.py [occlab bench step options, e.g. --small] [--rows 25] [--shapes]

Takes the options of `occlab bench step` (model, size, paths, precision, threads), builds the same workload
(occlab.bench.step_fn), runs one warm-up step, profiles the next and prints the operators by self CPU time
(`--shapes`: grouped by input shapes, to tell which convolution or attention a line is).
"""
import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from occlab import cli
from occlab.bench import step_fn


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--rows", type=int, default=25)
    own.add_argument("--shapes", action="store_true")
    mine, rest = own.parse_known_args()
    spec = cli.bench_spec(cli.build_parser().parse_args(["bench", "step", *rest]))
    device = torch.device(spec.device)
    if device.type == "cpu":
        torch.set_num_threads(spec.threads)
    torch.manual_seed(0)
    _, step = step_fn(spec, device)
    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=mine.shapes) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages(group_by_input_shape=mine.shapes).table(sort_by=sort, row_limit=mine.rows))
    print(f"spec: {spec}", file=sys.stderr)


if __name__ == "__main__":
    main()
