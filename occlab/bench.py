"""`occlab bench step`: seconds per training (or encode+decode) step and peak memory of one workload.

One workload per process, so that the peak RSS on CPU is that of a fresh process (torch's import included);
on GPU it is the allocator's peak after the warm-up. Input: a synthetic-town sequence (VAE) or random latent
planes (DiT); no data loading is timed. The result is one JSON object (RESULT_KEYS).
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass

import torch

from occlab.errors import OcclabError

MODELS = ("dynamiccity-vae", "dynamiccity-dit")
TASKS = ("train", "encode-decode")
RESULT_KEYS = ("s_per_step", "s_min", "s_max", "peak_mem_gib", "params", "device", "torch", "precision")
SMALL = {"grid": (64, 64, 8), "frames": 8}  # --small: the released code's 3.9 s/step CPU configuration


@dataclass
class BenchSpec:
    """One workload: what runs, at which size, on which device and how it is computed."""

    model: str = "dynamiccity-vae"
    task: str = "train"  # "train" | "encode-decode" (VAE only, no grad)
    geometry: str = "carlasc"
    frames: int = 16
    batch: int = 1
    device: str = "cpu"
    threads: int = 2
    precision: str = "fp32"
    steps: int = 3
    warmup: int = 1
    small: bool = False  # 64x64x8 and T = 8 instead of the geometry's grid
    reference: bool = False  # the plain reference path instead of the fast one
    checkpoint: bool = False  # activation checkpointing of the per-frame 3D stages
    frame_chunk: int = 0  # frames per chunk of the per-frame stages (0: all, 4 with checkpoint)
    attn_dropout: float = 0.0  # as the studies (any attention dropout forces the O(L^2) CPU kernel)
    rates: tuple[int, int, int, int] = (2, 2, 2, 2)  # VAE downsampling rates (dT, dX, dY, dZ)
    encoder: str = "projection"  # VAE plane reducer: "projection" | "avgpool"
    decoder: str = "ess"  # VAE decoder: "ess" | "query"

    def __post_init__(self):
        if self.model not in MODELS:
            raise OcclabError(f"unknown bench model {self.model!r}; expected one of {MODELS}")
        if self.task not in TASKS or (self.task == "encode-decode" and self.model != "dynamiccity-vae"):
            raise OcclabError(f"task {self.task!r} is not available for {self.model}; the DiT has 'train' only")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise OcclabError(f"unknown precision {self.precision!r}; expected fp32, bf16 or fp16")
        if self.steps < 1:
            raise OcclabError(f"--steps must be at least 1, got {self.steps}")


def _vae(spec: BenchSpec, device: torch.device):
    """A paper-size DynamicCity VAE, its input sequence and its loss."""
    from occlab.classes import NUM_CLASSES_CARLASC, NUM_CLASSES_OCC3D
    from occlab.data.geometry import get_geometry
    from occlab.data.town import generate_sequence
    from occlab.models.dynamiccity import Compute, DynamicCity, dynamiccity_paper
    from occlab.train.losses import OccupancyLoss

    grid = SMALL["grid"] if spec.small else get_geometry(spec.geometry).grid
    frames = SMALL["frames"] if spec.small else spec.frames
    num_classes = NUM_CLASSES_OCC3D if spec.geometry == "occ3d" else NUM_CLASSES_CARLASC
    cfg = dynamiccity_paper(grid, frames, attn_dropout=spec.attn_dropout, num_classes=num_classes,
                            rates=tuple(spec.rates), encoder=spec.encoder, decoder=spec.decoder)
    model = DynamicCity(cfg).to(device)
    model.compute = Compute(fast=not spec.reference, checkpoint=spec.checkpoint, frame_chunk=spec.frame_chunk)
    seq = generate_sequence(1, spec.geometry, frames).labels  # (T, X', Y', Z') of the geometry
    labels = torch.from_numpy(seq).long()[None, :, :grid[0], :grid[1], :grid[2]]  # (1, T, X, Y, Z)
    labels = labels.masked_fill(labels >= cfg.num_classes, 0).expand(spec.batch, -1, -1, -1, -1).contiguous().to(device)
    loss_fn = OccupancyLoss(torch.ones(cfg.num_classes), fused=not spec.reference).to(device)
    return model, labels, loss_fn


def _step_fn(spec: BenchSpec, device: torch.device):
    """(model, a function running one step)."""
    from occlab.train.trainer import autocast

    if spec.model == "dynamiccity-dit":
        from occlab.diffusion import Diffusion
        from occlab.models.dit import DiT, dit_paper

        model = DiT(dit_paper()).to(device)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(spec.batch, model.config.channels, *model.layout.map_shape, generator=g).to(device)
        diffusion, mask = Diffusion(1000), model.loss_mask().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with autocast(device, spec.precision):
                loss = diffusion.loss(model, x, mask=mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return model, step

    model, labels, loss_fn = _vae(spec, device)
    if spec.task == "encode-decode":
        model.eval()

        def step():
            with torch.no_grad(), autocast(device, spec.precision):
                model.decode(model.encode(labels)["mu"])
        return model, step

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16")

    def step():
        with autocast(device, spec.precision):
            out = model(labels)
        loss = loss_fn(out, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return model, step


def peak_rss_gib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(spec: BenchSpec) -> dict:
    """Warm up, time `steps` steps; the medians and peak memory as a JSON-able dict (RESULT_KEYS and the spec)."""
    device = torch.device(spec.device)
    if device.type == "cpu":
        torch.set_num_threads(spec.threads)
    elif not torch.cuda.is_available():
        raise OcclabError(f"--device {spec.device} asked for, but torch sees no CUDA device; use --device cpu")
    torch.manual_seed(0)
    model, step = _step_fn(spec, device)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(spec.warmup):
        timed()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed() for _ in range(spec.steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()
    return {"s_per_step": round(statistics.median(times), 4), "s_min": round(min(times), 4),
            "s_max": round(max(times), 4), "peak_mem_gib": round(peak, 3),
            "params": sum(p.numel() for p in model.parameters()),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "precision": spec.precision, "threads": spec.threads,
            "model": spec.model, "task": spec.task, "geometry": spec.geometry,
            "grid": list(SMALL["grid"]) if spec.small else None,
            "frames": SMALL["frames"] if spec.small else spec.frames, "batch": spec.batch,
            "path": "reference" if spec.reference else "fast", "checkpoint": spec.checkpoint,
            "frame_chunk": spec.frame_chunk, "steps": spec.steps, "rates": list(spec.rates),
            "encoder": spec.encoder, "decoder": spec.decoder, "attn_dropout": spec.attn_dropout}


def loss_curve(precision: str = "fp32", steps: int = 200, grid=(32, 32, 8), frames: int = 4, preset: str = "paper",
               lr: float = 1e-3, seed: int = 0, threads: int | None = None) -> list[float]:
    """Training losses of a fixed run (same seed, sequence and noise) of a DynamicCity VAE on CPU at `precision`:
    the check that bf16 autocast keeps the fp32 loss curve (issue #10: within 2%)."""
    from occlab.data.town import generate_sequence
    from occlab.models.dynamiccity import PRESETS, DynamicCity
    from occlab.train.losses import OccupancyLoss
    from occlab.train.trainer import autocast

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = PRESETS[preset](tuple(grid), frames, attn_dropout=0.0)
    model = DynamicCity(cfg)
    seq = torch.from_numpy(generate_sequence(seed, "carlasc", frames).labels).long()
    labels = seq[None, :, :grid[0], :grid[1], :grid[2]].contiguous()  # (1, T, X, Y, Z)
    loss_fn = OccupancyLoss(torch.ones(cfg.num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        with autocast(torch.device("cpu"), precision):
            out = model(labels)
        loss = loss_fn(out, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def curve_gap(a: list[float], b: list[float], window: int = 10) -> float:
    """Largest relative gap between two loss curves, compared as means of `window`-step windows."""
    t = torch.tensor([a, b], dtype=torch.float64)
    means = t[:, : t.shape[1] // window * window].reshape(2, -1, window).mean(-1)  # (2, windows)
    return ((means[1] - means[0]).abs() / means[0].abs()).max().item()


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 dot products (avx512_bf16 or AMX), as Linux reports its flags."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


__all__ = [
    "MODELS",
    "RESULT_KEYS",
    "TASKS",
    "BenchSpec",
    "bf16_supported",
    "curve_gap",
    "loss_curve",
    "peak_rss_gib",
    "run",
]
