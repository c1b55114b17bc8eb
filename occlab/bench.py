"""`occlab bench step`: seconds per training (or encode+decode) step and peak memory of one workload.

One workload per process, so that the peak RSS on CPU is that of a fresh process (torch's import included);
on GPU it is the allocator's peak after the warm-up. Input: a synthetic-town sequence (VAEs) or random latent
planes (DiT); no data loading is timed. The result is one JSON object (RESULT_KEYS).

The VAEs (DynamicCity, SEP-4D, OccSora's 4D VQ-VAE, X-Scene's triplane VAE) are built from their registry entry
(occlab.models.MODELS) at a size preset (`paper` by default) and trained by the shared trainer's step: the model
on the trainer's input, the shared OccupancyLoss with the settings a study gives that model (OccSora: unweighted
CE x 10 + Lovász + VQ; the others class-weighted CE + Lovász + KL, class weights all 1 here), Adam, a grad
scaler for fp16. X-Scene's VAE is static: every sample is one scene (a window of one frame), `frames` is ignored.
"""
from __future__ import annotations

import copy
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from occlab.errors import OcclabError

# bench name -> registry name (occlab.models.MODELS) of the VAEs
VAES = {"dynamiccity-vae": "dynamiccity", "sep4d": "sep4d", "occsora": "occsora", "xscene-vae": "xscene"}
MODELS = ("dynamiccity-vae", "dynamiccity-dit", "sep4d", "occsora", "xscene-vae")
STATIC = ("xscene-vae",)  # one scene per sample: `frames` is ignored (reported as 1)
TASKS = ("train", "encode-decode")
WIDTHS = ("paper", "small", "tiny")  # the models' size presets
RESULT_KEYS = ("s_per_step", "s_min", "s_max", "peak_mem_gib", "params", "device", "torch", "precision")
SMALL = {"grid": (64, 64, 8), "frames": 8}  # --small: the released code's 3.9 s/step CPU configuration

# The training settings a study gives a model beyond TrainConfig's defaults, per registry name: the dict
# occlab.studies.vae.TRAIN_KW (tested equal), copied because importing the studies imports pandas, which would
# count in this process's peak RSS. (Its MODEL_KW, DynamicCity's attention dropout 0, is BenchSpec.attn_dropout.)
TRAIN_KW = {"occsora": {"ce_weight": 10.0, "class_weighted": False}}
DYNAMICCITY_ONLY = ("reference", "checkpoint", "frame_chunk", "attn_dropout", "encoder", "decoder")


@dataclass
class BenchSpec:
    """One workload: what runs, at which size, on which device and how it is computed."""

    model: str = "dynamiccity-vae"  # one of MODELS
    task: str = "train"  # "train" | "encode-decode" (VAEs only, no grad)
    geometry: str = "carlasc"
    frames: int = 16  # T (ignored by the static X-Scene VAE: one scene per sample)
    batch: int = 1
    device: str = "cpu"
    threads: int = 2
    precision: str = "fp32"
    steps: int = 3
    warmup: int = 1
    small: bool = False  # 64x64x8 and T = 8 instead of the geometry's grid
    reference: bool = False  # the plain reference path instead of the fast one (DynamicCity VAE)
    checkpoint: bool = False  # activation checkpointing of the per-frame 3D stages (DynamicCity VAE)
    frame_chunk: int = 0  # frames per chunk of the per-frame stages (0: all, 4 with checkpoint; DynamicCity VAE)
    attn_dropout: float = 0.0  # as the studies (any attention dropout forces the O(L^2) CPU kernel; DynamicCity VAE)
    rates: tuple[int, int, int, int] = (2, 2, 2, 2)  # VAE downsampling rates (dT, dX, dY, dZ): DynamicCity, SEP-4D
    encoder: str = "projection"  # VAE plane reducer: "projection" | "avgpool" (DynamicCity VAE)
    decoder: str = "ess"  # VAE decoder: "ess" | "query" (DynamicCity VAE)
    widths: str = "paper"  # the VAE's size preset: paper | small | tiny (tests)
    grid: tuple[int, int, int] | None = None  # a crop (X, Y, Z) of the geometry's grid (None: all of it, or --small's)

    def __post_init__(self):
        if self.model not in MODELS:
            raise OcclabError(f"unknown bench model {self.model!r}; expected one of {', '.join(MODELS)}")
        if self.task not in TASKS or (self.task == "encode-decode" and self.model not in VAES):
            raise OcclabError(f"task {self.task!r} is not available for {self.model}; expected one of {TASKS} "
                              f"(encode-decode: the VAEs {', '.join(VAES)}; the DiT has 'train' only)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise OcclabError(f"unknown precision {self.precision!r}; expected fp32, bf16 or fp16")
        if self.steps < 1:
            raise OcclabError(f"--steps must be at least 1, got {self.steps}")
        if self.widths not in WIDTHS:
            raise OcclabError(f"unknown widths {self.widths!r}; expected one of {WIDTHS}")
        if self.model != "dynamiccity-vae":
            defaults = BenchSpec()
            changed = [n for n in DYNAMICCITY_ONLY if getattr(self, n) != getattr(defaults, n)]
            if self.model not in ("dynamiccity-vae", "sep4d") and tuple(self.rates) != defaults.rates:
                changed.append("rates")
            if changed:
                raise OcclabError(f"{', '.join(changed)} set for {self.model}, but only the DynamicCity VAE has "
                                  f"{'those options' if len(changed) > 1 else 'that option'} (rates: also SEP-4D); "
                                  f"leave them at their defaults")
        if self.model not in VAES and (self.widths != "paper" or self.grid is not None):
            raise OcclabError(f"{self.model} runs at its paper size only (DiT-DC/2 on its own latent); "
                              f"widths and grid are VAE options")
        if self.grid is not None:
            self.grid = tuple(int(v) for v in self.grid)
            if len(self.grid) != 3 or min(self.grid) < 1:
                raise OcclabError(f"grid must be three positive sizes (X, Y, Z), got {self.grid}")


def bench_sizes(spec: BenchSpec) -> tuple[tuple[int, int, int], int]:
    """(grid, frames) a VAE workload runs at: the crop, or --small's 64x64x8 and T = 8, or the geometry's grid and
    `frames`; frames 1 for a static model."""
    from occlab.data.geometry import get_geometry

    full = get_geometry(spec.geometry).grid
    grid = spec.grid or (SMALL["grid"] if spec.small else tuple(full))
    if any(g > f for g, f in zip(grid, full)):
        raise OcclabError(f"grid {grid} is larger than the {spec.geometry} grid {tuple(full)}; crop within it")
    frames = 1 if spec.model in STATIC else SMALL["frames"] if spec.small else spec.frames
    return tuple(grid), frames


def town_labels(geometry: str, grid, frames: int, num_classes: int, batch: int = 1,
                seed: int = 1) -> torch.Tensor:
    """The input of every bench workload: a synthetic-town sequence cropped to `grid`, (batch, T, X, Y, Z) int64,
    labels the model does not have set to free."""
    from occlab.data.town import generate_sequence

    seq = generate_sequence(seed, geometry, frames).labels  # (T, X', Y', Z') of the geometry
    labels = torch.from_numpy(seq).long()[None, :, :grid[0], :grid[1], :grid[2]]  # (1, T, X, Y, Z)
    return labels.masked_fill(labels >= num_classes, 0).expand(batch, -1, -1, -1, -1).contiguous()


def _vae(spec: BenchSpec, device: torch.device):
    """A VAE at the spec's size preset (paper by default), its input windows, its loss and training settings."""
    from occlab.classes import NUM_CLASSES_CARLASC, NUM_CLASSES_OCC3D
    from occlab.models import MODELS as REGISTRY
    from occlab.models.dynamiccity import Compute
    from occlab.train.config import TrainConfig
    from occlab.train.losses import OccupancyLoss

    name = VAES[spec.model]
    grid, frames = bench_sizes(spec)
    num_classes = NUM_CLASSES_OCC3D if spec.geometry == "occ3d" else NUM_CLASSES_CARLASC
    model_kw = {"num_classes": num_classes}
    if name == "dynamiccity":
        model_kw.update(attn_dropout=spec.attn_dropout, rates=tuple(spec.rates), encoder=spec.encoder,
                        decoder=spec.decoder)
    elif name == "sep4d":
        model_kw.update(rates=tuple(spec.rates))
    try:
        cfg = REGISTRY[name].presets[spec.widths](grid, frames, **model_kw)
    except OcclabError as e:
        raise OcclabError(f"{spec.model} cannot be built at its {spec.widths} size, grid {grid}, T = {frames}: {e} "
                          f"(the options are checked in occlab/models/{name}.py)") from e
    model = REGISTRY[name].model(cfg).to(device)
    if name == "dynamiccity":
        model.compute = Compute(fast=not spec.reference, checkpoint=spec.checkpoint, frame_chunk=spec.frame_chunk)
    labels = town_labels(spec.geometry, grid, frames, num_classes, batch=spec.batch).to(device)
    train = TrainConfig(**TRAIN_KW.get(name, {}))
    weights = torch.ones(num_classes) if train.class_weighted else None
    loss_fn = OccupancyLoss(weights, train.ce_weight, train.lovasz_weight, train.kl_weight,
                            fused=not spec.reference).to(device)
    return model, labels, loss_fn, train


def encode_decode(spec: BenchSpec, model, labels: torch.Tensor) -> torch.Tensor:
    """Logits of the model's deterministic encode then decode (eval mode): the mean latent of a Gaussian VAE, the
    quantised one of OccSora; X-Scene decodes every voxel of each scene."""
    if spec.model == "dynamiccity-vae":
        return model.decode(model.encode(labels)["mu"])  # (B, K, T, X, Y, Z)
    if spec.model in STATIC:
        scenes = labels.flatten(0, 1)  # (B*T, X, Y, Z): every frame one scene
        return model.decode(model.encode(scenes)["planes"])  # (B*T, K, X, Y, Z)
    return model.decode(model.encode(labels)["latent"])  # (B, K, T, X, Y, Z)


def step_fn(spec: BenchSpec, device: torch.device):
    """(model, a function running one step); a training step returns its loss (detached, no host sync), an
    encode+decode step its logits."""
    from occlab.train.trainer import _optimizer, autocast

    if spec.model == "dynamiccity-dit":
        from occlab.diffusion import Diffusion
        from occlab.models.dit import DiT, dit_paper

        from occlab.train.dit_trainer import DiTTrainConfig, ema_update

        model = DiT(dit_paper()).to(device)
        ema = copy.deepcopy(model).requires_grad_(False).eval()  # the trainer keeps one (as the released code)
        decay = DiTTrainConfig().ema_decay
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
            ema_update(ema, model, decay)
            return loss.detach()
        return model, step

    model, labels, loss_fn, train = _vae(spec, device)
    if spec.task == "encode-decode":
        model.eval()

        def step():
            with torch.no_grad(), autocast(device, spec.precision):
                return encode_decode(spec, model, labels)
        return model, step

    model.train()
    optimizer = _optimizer(model.parameters(), train)
    scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16")

    def step():
        with autocast(device, spec.precision):
            out = model(labels)  # X-Scene: draws its own query points (torch's global RNG) and returns their targets
        loss = loss_fn(out, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if train.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()
    return model, step


def peak_rss_gib() -> float:
    """This process's peak resident set size: /proc's VmHWM, which starts afresh at exec. ru_maxrss does not:
    Linux carries the parent's RSS at fork into a spawned child's ru_maxrss, so `occlab bench step` started from
    a big process (a notebook, a test) would read the parent's size. ru_maxrss (KiB) where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(step, device: torch.device) -> float:
    """Seconds of one call of `step` (the GPU's queue drained before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def cli_args(spec: BenchSpec) -> list[str]:
    """The `occlab bench step` arguments that rebuild `spec` (options left at their defaults are left out)."""
    defaults, args = BenchSpec(), []
    for name, value in vars(spec).items():
        if value == getattr(defaults, name) or (name == "frames" and spec.model in STATIC):
            continue  # the command's defaults are BenchSpec's; a static model takes no --frames
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        elif name == "rates":
            args += [flag, ",".join(map(str, value))]
        elif name == "grid":
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def run(spec: BenchSpec) -> dict:
    """Warm up, time `steps` steps; the medians and peak memory as a JSON-able dict (RESULT_KEYS and the spec)."""
    device = torch.device(spec.device)
    if device.type == "cpu":
        torch.set_num_threads(spec.threads)
    elif not torch.cuda.is_available():
        raise OcclabError(f"--device {spec.device} asked for, but torch sees no CUDA device; use --device cpu")
    torch.manual_seed(0)
    model, step = step_fn(spec, device)
    for _ in range(spec.warmup):
        timed(step, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed(step, device) for _ in range(spec.steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()
    grid, frames = bench_sizes(spec) if spec.model in VAES else (None, None)  # the DiT's latent is its own
    dynamiccity = spec.model == "dynamiccity-vae"
    return {"s_per_step": round(statistics.median(times), 4), "s_min": round(min(times), 4),
            "s_max": round(max(times), 4), "peak_mem_gib": round(peak, 3),
            "params": sum(p.numel() for p in model.parameters()),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "precision": spec.precision, "threads": spec.threads,
            "model": spec.model, "task": spec.task, "geometry": spec.geometry, "widths": spec.widths,
            "grid": list(grid) if grid else None, "frames": frames, "static": spec.model in STATIC,
            "batch": spec.batch, "path": "reference" if spec.reference else "fast", "checkpoint": spec.checkpoint,
            "frame_chunk": spec.frame_chunk, "steps": spec.steps,
            "rates": list(spec.rates) if spec.model in ("dynamiccity-vae", "sep4d") else None,
            "encoder": spec.encoder if dynamiccity else None, "decoder": spec.decoder if dynamiccity else None,
            "attn_dropout": spec.attn_dropout if dynamiccity else None}


def loss_curve(precision: str = "fp32", steps: int = 200, grid=(32, 32, 8), frames: int = 4, preset: str = "paper",
               lr: float = 1e-3, seed: int = 0, threads: int | None = None) -> list[float]:
    """Training losses of a fixed run (same seed, sequence and noise) of a DynamicCity VAE on CPU at `precision`:
    the check that bf16 autocast keeps the fp32 loss curve (issue #10: within 2%)."""
    from occlab.models.dynamiccity import PRESETS, DynamicCity
    from occlab.train.losses import OccupancyLoss
    from occlab.train.trainer import autocast

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = PRESETS[preset](tuple(grid), frames, attn_dropout=0.0)
    model = DynamicCity(cfg)
    labels = town_labels("carlasc", grid, frames, cfg.num_classes, seed=seed)  # (1, T, X, Y, Z)
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
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


__all__ = [
    "MODELS",
    "RESULT_KEYS",
    "STATIC",
    "TASKS",
    "VAES",
    "WIDTHS",
    "BenchSpec",
    "bench_sizes",
    "cli_args",
    "bf16_supported",
    "curve_gap",
    "encode_decode",
    "loss_curve",
    "peak_rss_gib",
    "run",
    "step_fn",
    "timed",
    "town_labels",
]
