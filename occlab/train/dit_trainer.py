"""Training of the HexPlane DiT on cached VAE latents, with the conventions of occlab.train.trainer.

AdamW (constant learning rate after an optional linear warm-up), mixed precision (bf16, or fp16 with a grad
scaler), an exponential moving average of the weights (used for sampling), the epsilon-prediction loss of
occlab.diffusion restricted to the plane cells of the token layout (`DiT.loss_mask()`), classifier-free
condition dropout (each condition with p = cond_dropout; the previous-window condition is also dropped where
a window has no predecessor), a CSV log (step, loss, lr, s_per_iter), atomic checkpoints with exact
resumption (model, EMA, optimiser, scaler, RNG, step; the batch of a step depends only on the step), one
process or torchrun DDP, and a stop on a non-finite loss that keeps the last good checkpoint.

The checkpoint records the DiT config, the latent statistics and the VAE checkpoint (path and a fingerprint
of its weights), so that `occlab.generate.generate(ckpt)` can sample and decode without anything else.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from occlab import checkpoint
from occlab.diffusion import Diffusion
from occlab.errors import OcclabError
from occlab.metrics.cost import CostMeter
from occlab.models.dit import CONDITIONS, GRID, DiT, DiTConfig, config_for_vae
from occlab.train.latents import LatentDataset, encode_latents, latent_geometry, read_vae_checkpoint
from occlab.train.trainer import (StepBatches, TrainingDiverged, _finite, _read_log, _write_log, autocast,
                                  setup_distributed)

CKPT_KIND = "occlab-dit"
LOG_FIELDS = ("step", "loss", "lr", "s_per_iter")
NOT_IN_KEY = ("device", "threads", "num_workers", "ckpt_every", "encode_batch")


@dataclass
class DiTTrainConfig:
    """Optimisation, EMA, precision and checkpoint cadence of a DiT run."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4  # DiT (Peebles & Xie): AdamW 1e-4, no weight decay, constant
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear learning-rate warm-up
    grad_clip: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at update n, so short runs average too
    diffusion_steps: int = 1000
    precision: str = "fp32"  # fp32 | bf16 | fp16 (with a grad scaler)
    ckpt_every: int = 100
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    num_workers: int = 0
    encode_batch: int = 8  # windows per batch when the latents are encoded
    data_options: dict = field(default_factory=dict)  # override the VAE's data options (e.g. {"seq_len": 48})


# what `occlab train dit --preset` sizes (DiT size preset, training overrides). smoke proves the plumbing. study:
# dit_small (4.2 M) at the study VAE's latent (4, 16, 16, 4) x 8 takes about 0.33 s a step at batch 8 on one
# loaded CPU thread (all three layouts within 20 %), so 1000 steps are about 6 minutes; whether that is enough
# for the rollout ordering to show is not yet measured. OccSora's study latent (128 x 2 x 4 x 4, layout "grid": 8
# tokens) makes the same dit_small 0.06 s a step (DynamicCity's 132 tokens: 0.39 s, both measured together on one
# thread of the loaded 2-core machine). paper: DiT defaults (AdamW 1e-4, EMA 0.9999).
PRESETS = {
    "smoke": ("tiny", {"steps": 20, "batch_size": 4, "lr": 1e-3, "ema_decay": 0.99, "ckpt_every": 10}),
    "study": ("small", {"steps": 1000, "batch_size": 8, "lr": 3e-4, "ema_decay": 0.999, "ckpt_every": 100}),
    "paper": ("paper", {"steps": 100_000, "batch_size": 16, "lr": 1e-4, "ema_decay": 0.9999, "ckpt_every": 2000}),
}


def dit_setup(vae_ckpt: str | os.PathLike, preset: str = "smoke", rollout: str = "pro",
              conditions: tuple[str, ...] = (), device: str = "cpu", seed: int = 0,
              **dit_kw) -> tuple[DiTConfig, DiTTrainConfig]:
    """(DiTConfig sized for the VAE's latent, DiTTrainConfig) of a preset; `dit_kw` override the DiT config."""
    if preset not in PRESETS:
        raise OcclabError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise OcclabError(f"unknown conditions {sorted(unknown)}; expected some of {', '.join(CONDITIONS)}")
    rec = read_vae_checkpoint(vae_ckpt)
    size, train_kw = PRESETS[preset]
    flags = {f"{c}_cond": c in conditions for c in CONDITIONS}
    geo = latent_geometry(rec["info"]["config"])
    if geo["kind"] == "grid":  # OccSora's latent grid has one token layout
        if rollout not in ("pro", GRID):
            raise OcclabError(f"{vae_ckpt}: an OccSora latent takes the token layout 'grid' only, got {rollout!r}")
        rollout = GRID
    vae = _VaeSizes(geo)
    dit = config_for_vae(vae, size, rollout=rollout, layout_channels=geo["num_classes"], **flags, **dit_kw)
    precision = ("bf16" if preset == "paper" else "fp32") if device.startswith("cuda") else "fp32"
    return dit, DiTTrainConfig(**train_kw, precision=precision, device=device, seed=seed)


class _VaeSizes:
    """What config_for_vae reads of a VAE config, from its JSON record."""

    def __init__(self, geo: dict):
        from occlab.planes import AXES

        self.latent_sizes = dict(zip(AXES, geo["sizes"]))
        self.latent_channels = geo["channels"]
        self.frames = geo["frames"]


def run_key(dit: DiTConfig, cfg: DiTTrainConfig, vae_fingerprint: str) -> str:
    """A stable id of a DiT run: a hash of its DiT config, training config (minus cadence and device) and VAE."""
    train_part = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY}
    code = Path(__file__).with_name("latents.py").read_bytes() + Path(__file__).read_bytes()
    payload = json.dumps({"dit": asdict(dit), "train": train_part, "vae": vae_fingerprint,
                          "code": hashlib.sha1(code).hexdigest()[:10]}, sort_keys=True, default=list)
    return f"dit-{hashlib.sha1(payload.encode()).hexdigest()[:12]}"


@dataclass
class DiTTrainResult:
    """What a finished DiT run leaves: its folder (checkpoint.pt, log.csv, metrics.json) and metrics."""

    out_dir: Path
    metrics: dict

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoint.pt"


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(cfg: DiTTrainConfig, updates: int) -> float:
    """The EMA decay of update number `updates` (0-based)."""
    if not cfg.ema_warmup:
        return cfg.ema_decay
    return min(cfg.ema_decay, (1 + updates) / (10 + updates))


def lr_at(cfg: DiTTrainConfig, step: int) -> float:
    """Learning rate of step `step` (0-based): linear warm-up, then constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def condition_drops(dit: DiTConfig, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-condition (B,) bool drops of a training batch: random with p = cond_dropout (global RNG), plus the
    previous-window condition wherever a window has none."""
    b = batch["x"].shape[0]
    drops = {n: torch.rand(b, device=device) < dit.cond_dropout for n in dit.conditions}
    if "previous" in drops:
        drops["previous"] = drops["previous"] | ~batch["has_previous"].to(device).bool()
    return drops


def train_dit(vae_ckpt: str | os.PathLike, out_dir: str | os.PathLike, dit: DiTConfig | None = None,
              cfg: DiTTrainConfig | None = None, *, latents_dir: str | os.PathLike | None = None,
              progress: bool = True) -> DiTTrainResult:
    """Train a DiT on the latents of `vae_ckpt` (a DynamicCity HexPlane or an OccSora latent grid; encoded and cached
    first) and write the run folder;
    an existing checkpoint in `out_dir` is resumed exactly. `dit` defaults to the small preset for the VAE."""
    cfg = cfg or DiTTrainConfig()
    out = Path(out_dir)
    vae_ckpt = Path(vae_ckpt).resolve()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if dit is None:
        dit = dit_setup(vae_ckpt, "study", device=cfg.device)[0]
    dist = setup_distributed(cfg.device)
    device = torch.device(f"cuda:{dist.local_rank}" if cfg.device == "cuda" and dist.world > 1 else cfg.device)

    if dist.main:  # one process encodes, the others wait for it
        paths = encode_latents(vae_ckpt, latents_dir, ("train",), device=str(device), batch_size=cfg.encode_batch,
                               data_options=cfg.data_options, progress=progress)
    if dist.world > 1:
        torch.distributed.barrier()
    if not dist.main:
        paths = encode_latents(vae_ckpt, latents_dir, ("train",), data_options=cfg.data_options, progress=False)
    dataset = LatentDataset(paths["train"], dit.rollout, dit.patch_size, dit.conditions)
    dataset.check(dit)
    if "previous" in dit.conditions and not bool(dataset.has_previous.any()):
        raise OcclabError(f"the previous-window condition needs windows that follow another window of their scene; "
                          f"none of the {len(dataset)} train windows does (the synthetic town's scenes are one "
                          f"window long unless data_options sets a longer seq_len, e.g. --sequence-frames)")

    ckpt_path = out / "checkpoint.pt"
    record = {"kind": CKPT_KIND, "dit_config": asdict(dit), "train": asdict(cfg), "vae_ckpt": str(vae_ckpt),
              "vae_fingerprint": dataset.vae["fingerprint"], "vae_info": dataset.vae["model_info"],
              "stats": dataset.stats, "latents": str(paths["train"]), "diffusion_steps": cfg.diffusion_steps}
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(
            {"dit": asdict(dit), "train": asdict(cfg), "vae_ckpt": str(vae_ckpt),
             "vae_fingerprint": record["vae_fingerprint"], "latents": str(paths["train"])}, indent=2, default=list))

    if device.type == "cuda" and dist.world > 1:
        torch.cuda.set_device(device)  # collectives (and their objects) on this rank's GPU
    torch.manual_seed(cfg.seed)
    model = DiT(dit).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if dist.world > 1:  # DDP broadcasts rank 0's weights; each rank draws its own timesteps, noise and drops
        torch.manual_seed(cfg.seed * 1_000_003 + dist.rank)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    diffusion = Diffusion(cfg.diffusion_steps)
    mask = model.loss_mask().to(device)  # (H, W): 1 on plane cells
    step = 0
    if ckpt_path.is_file():
        state = checkpoint.load(ckpt_path)  # on CPU: load_state_dict moves weights and optimiser state to device
        if state.get("kind") != CKPT_KIND:
            raise OcclabError(f"{ckpt_path}: not a DiT checkpoint (kind {state.get('kind')!r}); choose another --out")
        if state["dit_config"] != record["dit_config"] or state["vae_fingerprint"] != record["vae_fingerprint"]:
            raise OcclabError(f"{ckpt_path} belongs to a run with another DiT config or VAE; choose another --out "
                              f"or delete the folder")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks")
        checkpoint.set_rng_state(ranks[dist.rank] if ranks and len(ranks) == dist.world else state["rng"])
        step = int(state["step"])
        if dist.world > 1 and not (ranks and len(ranks) == dist.world) and not dist.main:
            torch.manual_seed(cfg.seed * 1_000_003 + dist.rank + 7_919 * step)  # no state of this rank was saved
    if step >= cfg.steps and (out / "metrics.json").is_file():  # a finished run: nothing to do
        return DiTTrainResult(out, json.loads((out / "metrics.json").read_text()))
    net = torch.nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model

    def save(at_step: int, rng: dict, gather: bool = True) -> None:
        ranks = None
        if dist.world > 1 and gather:  # every rank's RNG, so that a resumed DDP run draws what it would have
            ranks = [None] * dist.world
            torch.distributed.all_gather_object(ranks, rng)
        if dist.main:
            checkpoint.save_atomic({**record, "model": model.state_dict(), "ema": ema.state_dict(),
                                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                    "rng": rng, "rng_ranks": ranks, "step": at_step}, ckpt_path)

    log_path = out / "log.csv"
    rows = _read_log(log_path, upto=step) if dist.main else []
    meter = CostMeter(device, warmup=min(5, max(cfg.steps - step - 1, 0)))
    meter.reset_peak(device)
    loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), cfg.batch_size, cfg.seed, step, cfg.steps,
                                                           dist.rank, dist.world),
                        num_workers=cfg.num_workers,  # a private generator: the global RNG stays exact
                        generator=torch.Generator().manual_seed(cfg.seed))
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train dit ({dit.rollout})",
               disable=not (progress and dist.main), dynamic_ncols=True)
    rng = checkpoint.rng_state()
    net.train()
    t_start = time.perf_counter()
    try:
        for batch in loader:
            rng = checkpoint.rng_state()  # what an interrupted step would have to start from again
            batch = _to(batch, device)
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with meter.step():
                drops = condition_drops(dit, batch, device)
                cond = batch["cond"]
                with autocast(device, cfg.precision):
                    loss = diffusion.loss(lambda x_t, t, c=cond, d=drops: net(x_t, t, c, drop=d), batch["x"], mask=mask)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"DiT loss became {loss.item()} at step {step + 1}; the last good checkpoint "
                        f"({ckpt_path if ckpt_path.is_file() else 'none yet'}) is kept. Lower the learning rate, "
                        f"use --precision fp32, or check the latents")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                ema_update(ema, model, ema_decay_at(cfg, step))
            step += 1
            row = {"step": step, "loss": float(loss.detach()), "lr": lr, "s_per_iter": meter.times[-1]}
            rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if dist.main and (step % 10 == 0 or step == cfg.steps):
                _write_log(log_path, rows, LOG_FIELDS)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save(step, checkpoint.rng_state())
    except KeyboardInterrupt:
        save(step, rng, gather=False)  # no collective: the other ranks may be anywhere
        raise
    finally:
        bar.close()
        if dist.main and rows:
            _write_log(log_path, rows, LOG_FIELDS)
    wall = time.perf_counter() - t_start
    losses = [r["loss"] for r in rows]
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    metrics = {"steps": step, "params": params, "final_loss": losses[-1] if losses else float("nan"),
               "tail_loss": sum(tail) / len(tail) if tail else float("nan"),
               "s_per_iter": meter.median() if len(meter.times) > meter.warmup else float("nan"),
               "peak_mem_gib": meter.peak_memory_gib(device), "wall_s": wall, "device": str(device),
               "precision": cfg.precision, "torch": torch.__version__, "dit": asdict(dit),
               "vae_ckpt": str(vae_ckpt), "windows": len(dataset)}
    if dist.main:
        (out / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2, default=list))
    return DiTTrainResult(out, metrics)


def load_dit(ckpt: str | os.PathLike, ema: bool = True, map_location="cpu") -> tuple[DiT, dict]:
    """(DiT in eval mode with the EMA weights (or the raw ones), the checkpoint record) of a DiT checkpoint."""
    from occlab.train.config import from_dict

    path = Path(ckpt)
    if not path.is_file():
        raise OcclabError(f"DiT checkpoint {path}: no such file; train one with `occlab train dit --vae-ckpt FILE`")
    state = checkpoint.load(path, map_location=map_location)
    if not isinstance(state, dict) or state.get("kind") != CKPT_KIND:
        kind = state.get("kind", "a VAE" if "model_info" in state else None) if isinstance(state, dict) else None
        raise OcclabError(f"{path}: not a DiT checkpoint of `occlab train dit` (kind {kind!r})")
    model = DiT(from_dict(DiTConfig, state["dit_config"]))
    model.load_state_dict(state["ema" if ema else "model"])
    return model.eval(), state


__all__ = ["CKPT_KIND", "PRESETS", "DiTTrainConfig", "DiTTrainResult", "condition_drops", "dit_setup",
           "ema_decay_at", "ema_update", "load_dit", "lr_at", "run_key", "train_dit"]
