"""VAE studies behind the notebooks: preset sizes, grids of variants x seeds through the run cache, summaries.

The notebooks stay thin: they pick a preset and a list of variants, call `run_grid`, and show the table that
`summarize` and `occlab.report.tables.beside` make. Every row carries the id of the run that produced it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from occlab.errors import OcclabError
from occlab.report.tables import attach_protocol, geometry_label
from occlab.train.config import DataConfig, TrainConfig

PRESETS = ("smoke", "study", "paper")


@dataclass(frozen=True)
class PresetSize:
    """What a preset scales: the crop, frames, model widths, steps and the data it sees."""

    crop: tuple[int, int, int] | None
    frames: int
    widths: str  # a DynamicCity size preset: tiny | small | paper
    steps: int
    train_sequences: int
    val_sequences: int
    seeds: tuple[int, ...]
    lr: float = 1e-3
    crop_mode: str = "center"  # where a crop sits: on the ego, or "spread" anywhere in the grid
    precision: str = "fp32"
    note: str = ""


SIZES = {
    "smoke": PresetSize((16, 16, 8), 4, "tiny", 8, 4, 2, (0,),
                        note="plumbing only: 16x16x8 crop, 4 frames, tiny widths, 8 steps"),
    "study": PresetSize((32, 32, 8), 8, "small", 400, 48, 8, (0, 1), lr=3e-3, crop_mode="center",
                        note="ego-centred 32x32x8 crops of the 128x128x8 grid (12.8 m x 12.8 m, 1/16 of the area), "
                             "8 of 16 frames, half widths (C 8, query 32, decoder 64/16), no attention dropout, "
                             "400 Adam steps at lr 3e-3, 2 seeds of the paper's choice"),
    "paper": PresetSize(None, 16, "paper", 60_000, 10_000, 400, (0,), precision="fp16",
                        note="the released configuration: 128x128x8, 16 frames, released widths, batch 1"),
}


def preset_size(preset: str) -> PresetSize:
    if preset not in SIZES:
        raise OcclabError(f"unknown preset {preset!r}; expected one of {', '.join(SIZES)}")
    return SIZES[preset]


# What a model needs beyond the shared defaults: config overrides below the paper preset, training overrides
MODEL_KW = {"dynamiccity": {"attn_dropout": 0.0}}  # released 0.1 forces PyTorch's O(L^2) CPU attention
TRAIN_KW = {"occsora": {"ce_weight": 10.0, "class_weighted": False}}  # OccSora: unweighted CE x 10 + Lovász + VQ


def vae_setup(model: str, preset: str, dataset: str = "synthetic_town", data_root: str | None = None,
              device: str = "cpu", seed: int = 0, geometry: str = "carlasc", frames: int | None = None, **model_kw):
    """(model config, DataConfig, TrainConfig) of a registered 4D VAE at a preset; model_kw override the config."""
    from occlab.data import get_geometry
    from occlab.models import MODELS

    if model not in MODELS:
        raise OcclabError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    size = preset_size(preset)
    grid = size.crop or get_geometry(geometry).grid
    frames = frames or size.frames
    num_classes = 12 if dataset in ("occ3d_nuscenes", "occ3d_waymo") else 11
    if preset != "paper":
        model_kw = {**MODEL_KW.get(model, {}), **model_kw}
    config = MODELS[model].presets[size.widths](grid, frames, num_classes=num_classes, **model_kw)
    data = DataConfig(dataset, data_root, geometry, frames, size.crop, size.crop_mode,
                      size.train_sequences, size.val_sequences)
    precision = size.precision if device.startswith("cuda") else "fp32"
    train = TrainConfig(steps=size.steps, lr=size.lr, precision=precision, seed=seed, device=device,
                        ckpt_every=max(size.steps // 4, 10), **TRAIN_KW.get(model, {}))
    return config, data, train


def dynamiccity_setup(preset: str, *args, **kw):
    """`vae_setup` of DynamicCity."""
    return vae_setup("dynamiccity", preset, *args, **kw)


def run_grid(variants: list[dict], preset: str, dataset: str = "synthetic_town", data_root: str | None = None,
             device: str = "cpu", seeds: tuple[int, ...] | None = None, progress: bool = True) -> pd.DataFrame:
    """Train (or reuse) every variant x seed; one row per run with its metrics and cost.

    A variant is a dict of config overrides, plus optionally `model` (default DynamicCity) and `frames`.
    """
    from occlab.train.runs import train_or_load

    rows = []
    for variant in variants:
        name = variant.get("model", "dynamiccity")
        overrides = {k: v for k, v in variant.items() if k != "model"}
        for seed in seeds if seeds is not None else preset_size(preset).seeds:
            config, data, train = vae_setup(name, preset, dataset, data_root, device, seed, **overrides)
            run = train_or_load(name, config, data, train, progress=progress)
            m = run.metrics
            rows.append({**{k: _show(v) for k, v in variant.items()}, "seed": seed, "miou": m["val"]["miou"],
                         "iou": m["val"]["iou"], "s_per_iter": m["s_per_iter"], "peak_mem_gib": m["peak_mem_gib"],
                         "params": m["params"], "cr": config.compression_ratio(), "wall_s": m["wall_s"],
                         "run_id": run.id, **_per_class(m["val"])})
    return pd.DataFrame(rows)


def recon_protocol(preset: str, *tables: pd.DataFrame, **fields):
    """Give reconstruction tables the protocol their runs' configs do not state (DESIGN §4), and `fields`;
    returns them."""
    card = {"split": "val", "classes_miou": "non-free classes present in the ground truth",
            "classes_iou": "occupied (any non-free class) vs free", "mask": "the dataset's visibility mask "
            "(all voxels on the synthetic town)", "horizon": "none: reconstruction of the input window",
            "preset": preset, "samples": "not applicable: every val window reconstructed",
            "metric_network": "none: IoU / mIoU from one confusion matrix over the split", "conditions": "none",
            **fields}
    return attach_protocol(card, *tables)


def _per_class(val: dict) -> dict:
    """Per-class IoU columns ("iou_road", ...) of a run's validation metrics, and a VQ model's code use."""
    codes = {f"codebook_{k}": v for k, v in (val.get("codebook") or {}).items()}
    return {**{f"iou_{k}": v for k, v in (val.get("per_class") or {}).items()}, **codes}


def summarize(df: pd.DataFrame, keys: list[str], metrics=("miou", "iou", "s_per_iter", "peak_mem_gib")) -> pd.DataFrame:
    """Mean and seed-to-seed spread (std; 0 with one seed) of each metric per variant, with the run ids."""
    agg = {f"{m}": (m, "mean") for m in metrics}
    agg.update({f"{m}_std": (m, lambda s: float(np.std(s, ddof=1)) if len(s) > 1 else 0.0) for m in metrics})
    agg["seeds"] = ("seed", "count")
    agg["run_ids"] = ("run_id", lambda s: " ".join(s))
    return df.groupby(keys, sort=False).agg(**agg).reset_index()


def mean_scene_baseline(data: DataConfig, num_classes: int = 11) -> dict:
    """The trivial baseline (DESIGN §4): the most frequent training class per position, scored on val."""
    from occlab.data import make_dataset
    from occlab.metrics.recon import ConfusionMatrix
    from occlab.metrics.recon import mean_scene_baseline as fit

    train_set = make_dataset(data.dataset, data.data_root, "train", **data.source_options("train"))
    val_set = make_dataset(data.dataset, data.data_root, "val", **data.source_options("val"))
    scene = torch.as_tensor(fit((train_set[i]["labels"] for i in range(len(train_set))), num_classes))
    cm = ConfusionMatrix(num_classes)
    for i in range(len(val_set)):
        item = val_set[i]
        cm.update(scene.expand_as(item["labels"]), item["labels"], item["mask"])
    m = cm.compute()
    return {"miou": m.miou, "iou": m.iou}


def richest_window(dataset, candidates: int = 8) -> int:
    """The window, among the first `candidates`, whose first frame shows the most classes (for figures)."""
    def classes(i: int) -> int:
        item = dataset[i]
        return len(torch.unique(item["labels"][0][item["mask"][0].bool()]))

    return max(range(min(candidates, len(dataset))), key=lambda i: (classes(i), -i))


@torch.no_grad()
def reconstruct(run_id: str, index: int | None = None, split: str = "val"):
    """(ground truth, reconstruction, mask) numpy arrays (T, X, Y, Z) of one window by a cached run (by default
    the richest of the first validation windows)."""
    from occlab.train.runs import find_run, load_trained

    model, _, dataset = load_trained(find_run(run_id).path / "checkpoint.pt", split)
    item = dataset[richest_window(dataset) if index is None else index]
    pred = model(item["labels"][None].long())["logits"].argmax(1)[0]
    return item["labels"].numpy(), pred.to(torch.uint8).numpy(), item["mask"].numpy()


def _show(value):
    """Tuples (rates) as "2,2,2,2" so tables and joins stay readable."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value


__all__ = ["PRESETS", "SIZES", "claims", "downsampling", "dynamiccity_setup", "mean_scene_baseline", "preset_size",
           "reconstruct", "run_grid", "seed_spread", "step_cost", "summarize", "vae_setup", "vae_structure"]


# ------------------------------------------------------------------------------ DynamicCity Tab. 3 and Tab. 4
STRUCTURES = [{"encoder": e, "decoder": d} for e in ("avgpool", "projection") for d in ("query", "ess")]
RATES = [(1, 1, 1, 1), (1, 2, 2, 1), (2, 2, 2, 2), (2, 4, 4, 2)]
PAPER_ENCODER = {"avgpool": "average_pooling", "projection": "projection"}


def vae_structure(preset: str, dataset: str = "synthetic_town", data_root: str | None = None, device: str = "cpu",
                  seeds: tuple[int, ...] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """DynamicCity Tab. 3: encoder x decoder -> mIoU (trained runs), s/iter and peak memory (step_cost);
    (runs, cost, table with the paper's)."""
    from occlab.report.tables import beside, paper_table

    runs = run_grid(STRUCTURES, preset, dataset, data_root, device, seeds)
    cost = step_cost(STRUCTURES, preset, device)
    table = with_cost(summarize(runs, ["encoder", "decoder"], metrics=("miou", "iou")), cost, ["encoder", "decoder"])
    table["encoder"] = table["encoder"].map(PAPER_ENCODER)
    paper = paper_table("dynamiccity_t3_vae_structure")
    table = beside(table, paper, ["encoder", "decoder"], {"carlasc_miou": "CarlaSC mIoU (%)",
                                                          "carlasc_s_per_iter": "CarlaSC s/iter (GPU)",
                                                          "carlasc_vram_gb": "CarlaSC VRAM (GB)"})
    return cost_protocol(preset, runs, cost, table)


def downsampling(preset: str, dataset: str = "synthetic_town", data_root: str | None = None, device: str = "cpu",
                 seeds: tuple[int, ...] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """DynamicCity Tab. 4: the four rate settings -> C.R. (ours and at the paper's CarlaSC size), mIoU (trained
    runs), s/iter and peak memory (step_cost); (runs, cost, table with the paper's)."""
    from occlab.models import dynamiccity_paper
    from occlab.report.tables import beside, paper_table

    variants = [{"rates": r} for r in RATES]
    runs = run_grid(variants, preset, dataset, data_root, device, seeds)
    cost = step_cost(variants, preset, device)
    table = with_cost(summarize(runs, ["rates"], metrics=("miou", "iou", "cr")), cost, ["rates"])
    table["cr_carlasc_t16"] = [dynamiccity_paper(rates=tuple(map(int, r.split(",")))).compression_ratio()
                               for r in table["rates"]]
    paper = paper_table("dynamiccity_t4_downsampling")
    paper["rates"] = paper[["d_t", "d_x", "d_y", "d_z"]].astype(str).agg(",".join, axis=1)
    table = beside(table, paper, ["rates"], {"carlasc_cr": "CarlaSC C.R.", "carlasc_miou": "CarlaSC mIoU (%)",
                                            "carlasc_s_per_iter": "CarlaSC s/iter (GPU)",
                                            "carlasc_vram_gb": "CarlaSC VRAM (GB)"})
    return cost_protocol(preset, runs, cost, table)


def with_cost(table: pd.DataFrame, cost: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A summary with step_cost's s/iter and peak memory (and their spreads) joined on the variant columns."""
    return table.merge(cost[keys + [c for m in COST for c in (m, f"{m}_std")]], on=keys, how="left")


def cost_text(cost: pd.DataFrame) -> str:
    """How step_cost measured a table's s/iter and peak memory (a protocol card's `cost`)."""
    return (f"measured side by side (occlab.studies.vae.step_cost): s/iter the median of {int(cost['rounds'].iloc[0])} "
            f"rounds of the variants' training steps alternating in one process ({int(cost['threads'].iloc[0])} "
            f"threads on {cost['device'].iloc[0]}, one warm-up each, occlab.bench's step on a town sequence at the "
            f"preset's size), its spread the round-to-round std; peak memory of a fresh `occlab bench step` process "
            f"per variant (CPU: peak RSS, torch included; GPU: the allocator's peak)")


def cost_protocol(preset: str, runs: pd.DataFrame, cost: pd.DataFrame, table: pd.DataFrame):
    """Cards of a study's runs, step_cost and summary tables: reconstruction's, and how the costs were measured."""
    size = preset_size(preset)
    na = "not applicable: cost of untrained models"
    attach_protocol({"dataset": "synthetic_town: occlab.bench.town_labels (seed 1)", "split": na,
                     "geometry": geometry_label(cost["geometry"].iloc[0], size.crop), "frames": size.frames, "classes_miou": na,
                     "classes_iou": na, "mask": na, "horizon": na, "preset": preset, "seeds": "model init 0",
                     "samples": na, "metric_network": na, "conditions": "none", "cost": cost_text(cost),
                     "runs": "none: measured in this notebook"}, cost)
    return recon_protocol(preset, runs), cost, recon_protocol(preset, table, cost=cost_text(cost))


COST = ("s_per_iter", "peak_mem_gib")  # the columns step_cost measures


def step_cost(variants: list[dict], preset: str, device: str = "cpu", geometry: str = "carlasc",
              rounds: int = 5, memory: bool = True, progress: bool = True) -> pd.DataFrame:
    """Seconds per training step and peak memory of DynamicCity variants at the preset's size, side by side.

    A training log's s/iter cannot rank variants trained at different times on a shared machine, nor can a
    process's peak RSS rank runs trained one after another in it. So the steps (occlab.bench's, on a town
    sequence) alternate in this process: one warm-up each, then `rounds` rounds, the order rotating every round,
    so that a change of the machine's load falls on every variant alike; the median and the round-to-round std
    are the time and its spread. Peak memory: a fresh `occlab bench step` process per variant (peak RSS on CPU,
    the allocator's peak on GPU); `memory=False` leaves it out (NaN).
    """
    import json
    import subprocess
    import sys

    from tqdm.auto import tqdm

    from occlab.bench import BenchSpec, cli_args, step_fn, timed

    size, dev = preset_size(preset), torch.device(device)
    for v in variants:
        if set(v) - {"rates", "encoder", "decoder"}:
            raise OcclabError(f"step_cost times DynamicCity's Tab. 3-4 variants (rates, encoder, decoder); "
                              f"{v} has {sorted(set(v) - {'rates', 'encoder', 'decoder'})}")
    _, _, train = vae_setup("dynamiccity", preset, device=device)
    specs = [BenchSpec(widths=size.widths, grid=size.crop, frames=size.frames, geometry=geometry, device=device,
                       threads=torch.get_num_threads(), precision=train.precision, steps=1,
                       rates=tuple(v.get("rates", BenchSpec.rates)), encoder=v.get("encoder", BenchSpec.encoder),
                       decoder=v.get("decoder", BenchSpec.decoder), attn_dropout=MODEL_KW["dynamiccity"]["attn_dropout"])
             for v in variants]
    steps = []
    for spec in specs:
        torch.manual_seed(0)
        steps.append(step_fn(spec, dev)[1])
    times = [[] for _ in specs]
    order = list(range(len(specs)))
    for r in tqdm(range(rounds + 1), desc="step cost", unit="round", disable=not progress):
        for i in order[r % len(order):] + order[:r % len(order)]:
            t = timed(steps[i], dev)
            if r:  # round 0 warms up
                times[i].append(t)
    del steps
    rows = []
    for variant, spec, t in zip(variants, specs, times):
        peak = float("nan")
        if memory:
            cmd = [sys.executable, "-m", "occlab", "bench", "step", *cli_args(spec), "--json"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise OcclabError(f"peak memory of {variant} failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
            peak = json.loads(done.stdout.splitlines()[-1])["peak_mem_gib"]
        rows.append({**{k: _show(v) for k, v in variant.items()}, "s_per_iter": float(np.median(t)),
                     "s_per_iter_std": float(np.std(t, ddof=1)) if len(t) > 1 else 0.0, "peak_mem_gib": peak,
                     "peak_mem_gib_std": 0.0, "rounds": rounds, "threads": spec.threads, "device": device,
                     "geometry": geometry})
    return pd.DataFrame(rows)


def claims(runs: pd.DataFrame, notebook: str, preset: str, min_spread: dict | None = None,
           baseline: dict | None = None, keys: list[str] | None = None, cost: pd.DataFrame | None = None) -> list[dict]:
    """Verdicts of the claims a notebook owns (occlab.report.claims), from its runs (variants x seeds).

    `min_spread` ({metric: std}) floors the seed-to-seed spread, for notebooks that can afford only one seed;
    `baseline` (the mean-scene baseline's {miou, iou}) marks mIoU claims between untrained-looking models;
    `cost` (step_cost's table) gives s/iter and peak memory with their spreads in place of the runs' logs.
    `keys`: the columns naming a variant, joined by "/" as the claims name them (default: rates, or
    encoder/decoder).
    """
    from occlab.report.claims import evaluate_claims

    keys = keys or (["rates"] if "rates" in runs else ["encoder", "decoder"])
    metrics = ("miou", "iou", "cr", "s_per_iter", "peak_mem_gib")
    table = summarize(runs, keys, metrics=metrics)
    for metric, floor in (min_spread or {}).items():
        table[f"{metric}_std"] = table[f"{metric}_std"].clip(lower=floor)
    if cost is not None:
        table = with_cost(table.drop(columns=[c for m in COST for c in (m, f"{m}_std")]), cost, keys)
    values = {"/".join(str(row[k]) for k in keys): row.to_dict() for _, row in table.iterrows()}
    return evaluate_claims(notebook, values, preset, floor=baseline)


def seed_spread(preset: str, dataset: str = "synthetic_town", data_root: str | None = None,
                device: str = "cpu") -> dict:
    """Seed-to-seed std of mIoU and IoU of the paper's choice (projection + ESS, rates 2,2,2,2) over the
    preset's seeds, from the run cache (trained if missing). Time and memory spreads: step_cost."""
    runs = run_grid([{"encoder": "projection", "decoder": "ess"}], preset, dataset, data_root, device)
    return {m: float(runs[m].std(ddof=1)) if len(runs) > 1 else 0.0 for m in ("miou", "iou")}


def reconstruction_figure(run_id: str, out, frame: int = 0, index: int | None = None) -> np.ndarray:
    """Ground truth beside the reconstruction of one validation window (PyVista), visible voxels only."""
    from occlab.render.scene import render_side_by_side
    from occlab.train.runs import find_run

    gt, pred, mask = reconstruct(run_id, index)
    centred = find_run(run_id).config["data"].get("crop_mode", "center") == "center"
    return render_side_by_side([gt[frame], pred[frame]], [f"ground truth (t={frame})", "reconstruction"],
                               "carlasc", masks=[mask[frame], mask[frame]], out=out, ego=centred)
