"""The one trainer of the kit: every occupancy VAE (DynamicCity, SEP-4D, OccSora, ...) trains here.

Mixed precision, Adam/AdamW with MultiStepLR, class-weighted CE + Lovász + KL (or VQ) losses, periodic
validation with occlab.metrics, tqdm progress, a CSV log and a metrics JSON, atomic checkpoints with exact
resumption (model, optimiser, scheduler, scaler, RNG, data position), one process or torchrun DDP, and a
clear stop on a non-finite loss that keeps the last good checkpoint.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from occlab.classes import IGNORE
from occlab.errors import OcclabError
from occlab.metrics.cost import CostMeter
from occlab.metrics.recon import ConfusionMatrix, ReconMetrics
from occlab import checkpoint
from occlab.train.config import DataConfig, TrainConfig, to_dict
from occlab.train.losses import OccupancyLoss, class_weights

LOG_FIELDS = ("step", "loss", "ce", "lovasz", "kl", "vq", "lr", "s_per_iter")


class TrainingDiverged(OcclabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class StepBatches(Sampler):
    """Batches of window indices for steps start..total-1: epoch e is a permutation seeded by (seed, e).

    The batch of a step depends on nothing but the step, so a resumed run sees exactly the data it would
    have seen; under DDP each rank takes its own slice of the same permutation.
    """

    def __init__(self, n: int, batch: int, seed: int, start: int, total: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.start, self.total = n, batch, seed, start, total
        self.rank, self.world = rank, world
        self.per_epoch = max(n // (batch * world), 1)

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self):
        perm, epoch = None, -1
        for step in range(self.start, self.total):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            first = (step % self.per_epoch) * self.batch * self.world + self.rank * self.batch
            yield [int(perm[(first + j) % self.n]) for j in range(self.batch)]


@dataclass
class Distributed:
    """Where this process sits in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Distributed(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision name (fp32: none)."""
    if precision == "fp32":
        return nullcontext()
    if precision not in ("bf16", "fp16"):
        raise OcclabError(f"unknown precision {precision!r}; expected fp32, bf16 or fp16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def model_input(labels: torch.Tensor) -> torch.Tensor:
    """The model's input: ignored voxels (255) enter as free; the loss still ignores them."""
    return labels.masked_fill(labels == IGNORE, 0)


def label_counts(dataset, num_classes: int, limit: int = 64) -> torch.Tensor:
    """Voxel count per class over (up to `limit` evenly spread) training windows, ignore label excluded."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    picks = torch.linspace(0, len(dataset) - 1, min(limit, len(dataset))).round().long().unique()
    for i in picks.tolist():
        labels = dataset[i]["labels"].long().reshape(-1)
        counts += torch.bincount(labels[labels < num_classes], minlength=num_classes)
    return counts


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device: torch.device | str, num_classes: int, batches: int | None = None,
             precision: str = "fp32", dist: Distributed | None = None) -> ReconMetrics:
    """mIoU / IoU / per-class IoU of reconstructions, on visible voxels (the dataset's mask)."""
    device = torch.device(device)
    dist = dist or Distributed()
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    codes = []  # a VQ model's code indices (OccSora), for its codebook use
    n = len(dataset) if batches is None else min(batches, len(dataset))
    for i in range(dist.rank, n, dist.world):
        item = dataset[i]
        labels = item["labels"][None].to(device).long()
        with autocast(device, precision):
            out = model(model_input(labels))
        cm.update(out["logits"].argmax(1), labels, item["mask"][None].to(device))
        if out.get("indices") is not None:
            codes.append(out["indices"].reshape(-1))
    cm.all_reduce()
    model.train(was_training)
    metrics = cm.compute()
    if codes:
        from occlab.models.occsora import codebook_usage

        metrics.codebook = codebook_usage(torch.cat(codes), model.config.codebook_size)
    return metrics


def _scheduler(optimizer, cfg: TrainConfig):
    milestones = sorted({max(1, round(f * cfg.steps)) for f in cfg.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, cfg.gamma)


def _optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise OcclabError(f"unknown optimizer {cfg.optimizer!r}; expected adam or adamw")


@dataclass
class TrainResult:
    """What a finished run leaves: its folder, final metrics and cost."""

    out_dir: Path
    metrics: dict

    @property
    def miou(self) -> float:
        return self.metrics["val"]["miou"]


def train(model: nn.Module, model_info: dict, data: DataConfig, cfg: TrainConfig, out_dir: str | os.PathLike,
          num_classes: int = 11, progress: bool = True) -> TrainResult:
    """Train `model` (a VAE returning a dict with `logits`) and write the run folder; resumes if it exists.

    `model_info` is recorded in the checkpoint and metrics (name, config, code version), so that
    `occlab eval vae --ckpt` can rebuild the model.
    """
    from occlab.data import make_dataset

    out = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = setup_distributed(cfg.device)
    device = torch.device(f"cuda:{dist.local_rank}" if cfg.device == "cuda" and dist.world > 1 else cfg.device)
    train_set = make_dataset(data.dataset, data.data_root, "train", **data.source_options("train"))
    val_set = make_dataset(data.dataset, data.data_root, "val", **data.source_options("val"))
    ckpt_path = out / "checkpoint.pt"
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(
            {"model": model_info, "data": to_dict(data), "train": to_dict(cfg)}, indent=2))

    weights_path = out / "class_weights.json"
    if cfg.class_weighted and weights_path.is_file():
        weights = torch.tensor(json.loads(weights_path.read_text()))
    elif cfg.class_weighted:
        weights = class_weights(label_counts(train_set, num_classes))
        if dist.main:
            weights_path.write_text(json.dumps(weights.tolist()))
    else:
        weights = None

    torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)  # ranks draw their own noise; rank 0 as one process
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    loss_fn = OccupancyLoss(weights, cfg.ce_weight, cfg.lovasz_weight, cfg.kl_weight).to(device)
    optimizer = _optimizer(model.parameters(), cfg)
    scheduler = _scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    step = 0
    if ckpt_path.is_file():
        state = checkpoint.load(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        step = int(state["step"])
    net = torch.nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model

    def save(at_step: int, rng: dict) -> None:
        if dist.main:
            checkpoint.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                    "rng": rng, "step": at_step, "model_info": model_info,
                                    "data": to_dict(data), "train": to_dict(cfg)}, ckpt_path)

    log_path = out / "log.csv"
    rows = _read_log(log_path, upto=step) if dist.main else []
    meter = CostMeter(device, warmup=min(5, max(cfg.steps - step - 1, 0)))
    meter.reset_peak(device)
    loader = DataLoader(train_set, batch_sampler=StepBatches(len(train_set), cfg.batch_size, cfg.seed, step,
                                                             cfg.steps, dist.rank, dist.world),
                        num_workers=cfg.num_workers,  # a private generator: the global RNG stays exact
                        generator=torch.Generator().manual_seed(cfg.seed))
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {model_info.get('name', 'vae')}",
               disable=not (progress and dist.main), dynamic_ncols=True)
    history: list[dict] = []
    rng = checkpoint.rng_state()
    net.train()
    t_start = time.perf_counter()
    try:
        for batch in loader:
            rng = checkpoint.rng_state()  # what an interrupted step would have to start from again
            labels = batch["labels"].to(device, non_blocking=True).long()
            with meter.step():
                with autocast(device, cfg.precision):
                    out_model = net(model_input(labels))
                parts = loss_fn(out_model, labels)
                if not torch.isfinite(parts["loss"]):
                    raise TrainingDiverged(
                        f"loss became {parts['loss'].item()} at step {step + 1}; the last good checkpoint "
                        f"({ckpt_path if ckpt_path.is_file() else 'none yet'}) is kept. Lower the learning rate, "
                        f"use --precision fp32, or check the data")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(parts["loss"]).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
            step += 1
            row = {"step": step, **{k: float(v.detach()) for k, v in parts.items()},
                   "lr": optimizer.param_groups[0]["lr"], "s_per_iter": meter.times[-1]}
            rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if dist.main and (step % 10 == 0 or step == cfg.steps):
                _write_log(log_path, rows)
            if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
                m = evaluate(model, val_set, device, num_classes, cfg.val_batches, cfg.precision, dist)
                history.append({"step": step, "miou": m.miou, "iou": m.iou})
                net.train()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save(step, checkpoint.rng_state())
    except KeyboardInterrupt:
        save(step, rng)
        raise
    finally:
        bar.close()
        if dist.main and rows:
            _write_log(log_path, rows)
    wall = time.perf_counter() - t_start
    val = evaluate(model, val_set, device, num_classes, cfg.val_batches, cfg.precision, dist)
    metrics = {"val": val.to_dict(), "history": history, "params": params, "steps": step,
               "s_per_iter": meter.median() if len(meter.times) > meter.warmup else float("nan"),
               "peak_mem_gib": meter.peak_memory_gib(device), "wall_s": wall, "device": str(device),
               "precision": cfg.precision, "torch": torch.__version__, "model": model_info,
               "final_loss": rows[-1]["loss"] if rows else float("nan")}
    if dist.main:
        (out / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2))
    return TrainResult(out, metrics)


def _finite(obj):
    """JSON cannot hold NaN: map it to None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _read_log(path: Path, upto: int) -> list[dict]:
    """The log rows of steps <= upto (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f) if int(float(r["step"])) <= upto]


def _write_log(path: Path, rows: list[dict], fields: tuple[str, ...] = LOG_FIELDS) -> None:
    """The CSV log of a run, written atomically (a crash leaves the previous one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
