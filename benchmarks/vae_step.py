"""One DynamicCity VAE training step at the CarlaSC paper configuration: seconds per step and peak memory.

    .venv/bin/python benchmarks/vae_step.py [--device cpu|cuda] [--frames 16] [--rates 2,2,2,2]
        [--precision fp32|bf16|fp16] [--steps 3] [--threads 2] [--encoder projection] [--decoder ess]
        [--attn-dropout 0.1] [--reference] [--checkpoint]

A front end to `occlab.bench.run` (the workload of `occlab bench step`) that adds the encoder, decoder, rates
and attention-dropout variants. Input is a synthetic-town sequence at 128x128x8; the loss is the trainer's
(class-weighted CE + Lovász + KL). Prints one JSON line: median / min / max seconds per step after one warm-up
step, and peak memory (this fresh process's peak RSS on CPU, the allocator's peak on GPU). Run it alone:
timings are ratios only when taken in one run on an otherwise idle machine.
"""
import argparse
import json

from occlab.bench import BenchSpec, run


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
    a = p.parse_args()
    spec = BenchSpec(device=a.device, frames=a.frames, batch=a.batch, rates=tuple(map(int, a.rates.split(","))),
                     precision=a.precision, steps=a.steps, threads=a.threads, encoder=a.encoder, decoder=a.decoder,
                     attn_dropout=a.attn_dropout, reference=a.reference, checkpoint=a.checkpoint)
    print(json.dumps(run(spec)))


if __name__ == "__main__":
    main()
