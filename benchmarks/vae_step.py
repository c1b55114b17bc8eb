"""One DynamicCity VAE training step at the CarlaSC paper configuration: seconds per step and peak memory.

    .venv/bin/python benchmarks/vae_step.py [--device cpu|cuda] [--frames 16] [--rates 2,2,2,2]
        [--precision fp32|bf16|fp16] [--steps 3] [--threads 2] [--encoder projection] [--decoder ess]
        [--reference] [--checkpoint]

`occlab bench step` is the command for the issue's configurations; this script adds the encoder, decoder and
rates variants.

Input is a real synthetic-town sequence at 128x128x8; the loss is the trainer's (class-weighted CE + Lovász +
KL). Prints one JSON line: median / min / max seconds per step after one warm-up step, and peak memory
(this fresh process's peak RSS on CPU, the allocator's peak on GPU). Run it alone: timings are ratios only
when taken in one run on an otherwise idle machine.
"""
import argparse
import json
import resource
import statistics
import time

import torch

from occlab.data.town import generate_sequence
from occlab.models import DynamicCity, dynamiccity_paper
from occlab.models.dynamiccity import Compute
from occlab.train.losses import OccupancyLoss
from occlab.train.trainer import autocast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rates", default="2,2,2,2")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--encoder", default="projection")
    p.add_argument("--decoder", default="ess")
    p.add_argument("--attn-dropout", type=float, default=0.1)
    p.add_argument("--reference", action="store_true", help="the plain reference path (model and loss)")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing of the per-frame stages")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = dynamiccity_paper((128, 128, 8), args.frames, rates=tuple(map(int, args.rates.split(","))),
                            encoder=args.encoder, decoder=args.decoder, attn_dropout=args.attn_dropout)
    model = DynamicCity(cfg).to(device)
    model.compute = Compute(fast=not args.reference, checkpoint=args.checkpoint)
    labels = torch.from_numpy(generate_sequence(1, "carlasc", args.frames).labels).long()[None]
    labels = labels.expand(args.batch, *labels.shape[1:]).contiguous().to(device)
    loss_fn = OccupancyLoss(torch.ones(cfg.num_classes), fused=not args.reference).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(device, args.precision):
            out = model(labels)
        loss = loss_fn(out, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(json.dumps({"s_per_step": statistics.median(times), "s_min": min(times), "s_max": max(times),
                      "peak_mem_gib": round(peak, 3), "params": sum(p.numel() for p in model.parameters()),
                      "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "threads": args.threads, "torch": torch.__version__, "precision": args.precision,
                      "frames": args.frames, "batch": args.batch, "rates": args.rates,
                      "encoder": args.encoder, "decoder": args.decoder,
                      "path": "reference" if args.reference else "fast", "checkpoint": args.checkpoint}))


if __name__ == "__main__":
    main()
