"""Issue #10's GPU checks and figures in one prepared run, for a session that is lent a GPU (15 minutes of device
time: run this once, read the table, give the machine back).

    python benchmarks/gpu_check.py [--out DIR] [--steps 5] [--quick]

On the device machine (torch without the kit's other dependencies): first, here, `bash benchmarks/gpu_deps.sh`
copies the two pure-Python packages that `occlab bench` needs besides torch and numpy (einops, tqdm) into
.gpu_deps/; then run with `carry=[".gpu_deps"]` and `PYTHONPATH=.gpu_deps python benchmarks/gpu_check.py --out $OUT`.

1. Correctness on CUDA (fp32, TF32 off): the DynamicCity VAE's fast path against its reference path (loss and
   every gradient), the CUDA loss against the CPU loss on the same weights and input, Lovász-softmax on CUDA
   against its float-sort reference.
2. `occlab bench step --device cuda --json` for the issue's GPU workloads (each in a fresh process: the
   allocator's peak): VAE train T = 16 (fp16 as the released code, and fp32), T = 64, T = 128 with activation
   checkpointing, DiT-DC/2 at batch 16, encode+decode at batch 8 (sequences/s). Prints the table beside the
   issue's targets and writes gpu_check.json to --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

# (label, bench arguments, issue #10 target)
WORKLOADS = [
    ("VAE train T=16 fp16", ["--frames", "16", "--precision", "fp16"], "<= 0.040 s, <= 1.6 GiB"),
    ("VAE train T=16 fp32", ["--frames", "16"], ""),
    ("VAE train T=64 fp16", ["--frames", "64", "--precision", "fp16"], "<= 0.12 s, <= 6 GiB"),
    ("VAE train T=128 fp16 checkpoint", ["--frames", "128", "--precision", "fp16", "--checkpoint"], "<= 24 GiB"),
    ("DiT-DC/2 train batch 16 fp16", ["--model", "dynamiccity-dit", "--batch", "16", "--precision", "fp16"],
     "<= 0.045 s"),
    ("VAE encode+decode T=16 batch 8 fp16", ["--task", "encode-decode", "--batch", "8", "--precision", "fp16"],
     ">= 80 sequences/s"),
]


def correctness(device: torch.device) -> dict:
    """Fast vs reference path on CUDA, CUDA vs CPU, Lovász vs its reference: the largest differences."""
    from occlab.models.dynamiccity import Compute, DynamicCity, dynamiccity_tiny
    from occlab.train.losses import OccupancyLoss, lovasz_softmax, lovasz_softmax_reference

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    grid, frames = (16, 16, 8), 4
    torch.manual_seed(0)
    model = DynamicCity(dynamiccity_tiny(grid, frames, attn_dropout=0.0, dropout=0.0))
    labels = torch.randint(0, 11, (2, frames, *grid), generator=torch.Generator().manual_seed(1))
    weights = torch.linspace(0.5, 2.0, 11)

    def step(dev: torch.device, compute: Compute):
        m = model.to(dev)
        m.compute = compute
        m.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the Gaussian heads' noise
        loss = OccupancyLoss(weights.to(dev), fused=compute.fast)(m(labels.to(dev)), labels.to(dev))["loss"]
        loss.backward()
        return loss.item(), {n: p.grad.detach().cpu().clone() for n, p in m.named_parameters()}

    def largest_gap(a: dict, b: dict) -> float:
        scale = max(g.abs().max().item() for g in a.values())
        return max((a[n] - b[n]).abs().max().item() for n in a) / scale

    fast_loss, fast = step(device, Compute())
    ref_loss, ref = step(device, Compute(fast=False))
    cpu_loss, cpu = step(torch.device("cpu"), Compute())
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50000, 11, generator=g).to(device)
    target = torch.randint(0, 10, (50000,), generator=g).to(device)
    target[:100] = 255
    lovasz = lovasz_softmax(logits.softmax(-1), target).item()
    lovasz_ref = lovasz_softmax_reference(logits.softmax(-1), target).item()
    return {"loss_fast_vs_reference": abs(fast_loss - ref_loss), "grad_fast_vs_reference": largest_gap(ref, fast),
            "loss_cuda_vs_cpu": abs(fast_loss - cpu_loss), "grad_cuda_vs_cpu": largest_gap(cpu, fast),
            "lovasz_vs_reference": abs(lovasz - lovasz_ref)}


def bench(args: list[str], steps: int, timeout: float) -> dict:
    """One `occlab bench step --device cuda` in a fresh process; its JSON, or the error."""
    cmd = [sys.executable, "-m", "occlab", "bench", "step", "--device", "cuda", "--steps", str(steps), "--json", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - start, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for gpu_check.json")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="correctness and the T = 16 VAE step only")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per workload")
    a = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here")
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    print(f"{result['device']}, torch {result['torch']}", flush=True)
    result["correctness"] = correctness(device)
    print(json.dumps(result["correctness"]), flush=True)
    result["workloads"] = []
    for label, args, target in WORKLOADS[:1] if a.quick else WORKLOADS:
        r = bench(args, a.steps, a.timeout)
        r.update(label=label, target=target)
        if "s_per_step" in r and "encode-decode" in args:
            r["sequences_per_s"] = round(int(args[args.index("--batch") + 1]) / r["s_per_step"], 1)
        result["workloads"].append(r)
        shown = r.get("error") or (f"{r['s_per_step']:.4f} s/step ({r['s_min']:.4f}-{r['s_max']:.4f}), "
                                   f"peak {r['peak_mem_gib']:.2f} GiB" +
                                   (f", {r['sequences_per_s']} sequences/s" if "sequences_per_s" in r else ""))
        print(f"| {label} | {shown} | target {target or '-'} |", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
