"""Reconstruction studies behind notebooks 01 and 06: methods x sequence length, and SEP-4D's ablations.

01 (SEP-4D Tab. 1-2, DynamicCity Tab. 1): OccSora, DynamicCity and SEP-4D trained by the same trainer on the
same windows, for several sequence lengths. 06 (SEP-4D Tab. 3-4): the five fusions g_theta, and the planar
encoder against the "3D conv + SE block" encoder at (nearly) the same compression ratio.
"""
from __future__ import annotations

import pandas as pd

from occlab.classes import CLASS_NAMES
from occlab.report.tables import attach_protocol, geometry_label
from occlab.studies.vae import (
    preset_size,
    recon_protocol,
    run_grid,
    summarize,
    vae_setup,
)

METHODS = ("occsora", "dynamiccity", "sep4d")
METHOD_NAMES = {"occsora": "OccSora", "dynamiccity": "DynamicCity", "sep4d": "SEP-4D"}
FRAMES = {"smoke": (4,), "study": (4, 8, 16), "paper": (4, 8, 16, 32, 64)}
FUSIONS = ("sep", "concat", "conv", "average", "dynamic")
PAPER_FUSION = {"sep": "sep_fusion", "concat": "concat", "conv": "conv_fusion", "average": "averaging",
                "dynamic": "dynamic_weighting"}
PAPER_ENCODER = {"planar": "planar_factorization", "conv3d_se": "conv3d_se_block"}


def frames_of(preset: str) -> tuple[int, ...]:
    """The sequence lengths notebook 01 trains at a preset (the study preset stops at 16: 2 CPU cores)."""
    preset_size(preset)  # names the presets on a typo
    return FRAMES[preset]


def methods_by_frames(preset: str, dataset: str = "synthetic_town", data_root: str | None = None,
                      device: str = "cpu", seeds: tuple[int, ...] | None = None,
                      frames: tuple[int, ...] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """SEP-4D Tab. 1: every method x sequence length -> mIoU, IoU, training time and memory; (runs, table)."""
    from occlab.report.tables import paper_table

    variants = [{"model": m, "frames": t} for t in (frames or frames_of(preset)) for m in METHODS]
    runs = run_grid(variants, preset, dataset, data_root, device, seeds)
    runs["train_s"] = runs["wall_s"]
    table = summarize(runs, ["model", "frames"], metrics=("miou", "iou", "cr", "s_per_iter", "peak_mem_gib", "train_s"))
    paper = paper_table("sep4d_t1_reconstruction")
    paper = pd.concat([paper.assign(model=m, paper_miou=paper[f"{m}_miou"],
                                    paper_train_s=paper.get(f"{m}_train_s")) for m in METHODS])
    table = table.merge(paper[["model", "frames", "paper_miou", "paper_train_s"]], on=["model", "frames"], how="left")
    table = table.rename(columns={c: f"ours: {c}" for c in table.columns
                                  if c not in ("model", "frames", "paper_miou", "paper_train_s")})
    table = table.rename(columns={"paper_miou": "paper: CarlaSC mIoU (%)",
                                  "paper_train_s": "paper: CarlaSC training time (s, GPU)"})
    table.insert(0, "method", table.pop("model").map(METHOD_NAMES))
    return recon_protocol(preset, runs, table)


def per_class(runs: pd.DataFrame) -> pd.DataFrame:
    """SEP-4D Tab. 2: per-class IoU of every method and length (mean over seeds), the paper's rows beside."""
    from occlab.report.tables import paper_table

    classes = [c for c in CLASS_NAMES[1:] if f"iou_{c}" in runs]
    ours = runs.groupby(["model", "frames"], sort=False)[["miou", *(f"iou_{c}" for c in classes)]].mean()
    ours = ours.reset_index().rename(columns={f"iou_{c}": c for c in classes})
    ours.insert(0, "source", "ours")
    ours["method"] = ours.pop("model").map(METHOD_NAMES)
    paper = paper_table("sep4d_t2_per_class_iou")
    paper[["miou", *classes]] = paper[["miou", *classes]] / 100  # the paper prints percentages
    paper.insert(0, "source", "paper (CarlaSC)")
    paper = paper[paper.frames.isin(ours.frames)]
    table = pd.concat([ours, paper[["source", "method", "frames", "miou", *classes]]], ignore_index=True)
    ids = list(dict.fromkeys(runs["run_id"])) if "run_id" in runs else None
    return attach_protocol({**runs.attrs.get("protocol", {}), "runs": ids}, table)


def equal_ratio_channels(preset: str) -> int:
    """Latent channels of the conv3d_se encoder whose compression ratio is nearest the planar encoder's."""
    planar, _, _ = vae_setup("sep4d", preset)
    dense = vae_setup("sep4d", preset, encoder="conv3d_se", latent_channels=1)[0].compression_ratio()  # = C.R. x C
    return max(1, round(dense / planar.compression_ratio()))


def fusion_ablation(preset: str, dataset: str = "synthetic_town", data_root: str | None = None,
                    device: str = "cpu", seeds: tuple[int, ...] | None = None):
    """SEP-4D Tab. 3 and 4: (runs, fusion table, encoder table), each with the paper's numbers beside."""
    from occlab.report.tables import beside, paper_table

    variants = [{"model": "sep4d", "encoder": "planar", "fusion": f} for f in FUSIONS]
    variants.append({"model": "sep4d", "encoder": "conv3d_se", "fusion": "sep",
                     "latent_channels": equal_ratio_channels(preset)})
    runs = run_grid(variants, preset, dataset, data_root, device, seeds)
    metrics = ("miou", "iou", "cr", "s_per_iter", "peak_mem_gib")
    planar = summarize(runs[runs.encoder == "planar"], ["fusion"], metrics=metrics)
    planar["fusion"] = planar["fusion"].map(PAPER_FUSION)
    fusions = beside(planar, paper_table("sep4d_t3_fusion"), ["fusion"],
                     {"miou": "CarlaSC mIoU (%)", "iou": "CarlaSC IoU (%)"})
    encoders = summarize(runs[runs.fusion == "sep"], ["encoder"], metrics=metrics)
    encoders["encoder"] = encoders["encoder"].map(PAPER_ENCODER)
    encoders = beside(encoders, paper_table("sep4d_t4_encoder"), ["encoder"],
                      {"miou": "CarlaSC mIoU (%)", "iou": "CarlaSC IoU (%)"})
    return recon_protocol(preset, runs, fusions, encoders)


def seed_spread(preset: str, model: str, dataset: str = "synthetic_town", data_root: str | None = None,
                device: str = "cpu", **variant) -> dict:
    """Seed-to-seed std of each metric of one configuration over the preset's seeds (trained if missing)."""
    runs = run_grid([{"model": model, **variant}], preset, dataset, data_root, device)
    return {m: float(runs[m].std(ddof=1)) if len(runs) > 1 else 0.0
            for m in ("miou", "iou", "s_per_iter", "peak_mem_gib")}


def reconstruction_grid(run_ids: dict[str, str], out, times=(1, 8, 16), index: int | None = None):
    """SEP-4D Fig. 3: ground truth and each method's reconstruction (rows) at frames `times` (1-based, columns)
    of one validation window (by default the richest of the first ones), visible voxels only; a PNG at `out`."""
    import numpy as np
    from PIL import Image

    from occlab.render.scene import render_side_by_side
    from occlab.studies.vae import reconstruct

    rows, gt = [], None
    for name, run_id in run_ids.items():
        truth, pred, mask = reconstruct(run_id, index)
        ts = sorted({min(t, truth.shape[0]) - 1 for t in times})  # a shorter window shows its last frame
        if gt is None:
            gt = render_side_by_side([truth[t] for t in ts], [f"ground truth, t = {t + 1}" for t in ts], "carlasc",
                                     masks=[mask[t] for t in ts], window_size=(420, 320))
            rows.append(gt)
        rows.append(render_side_by_side([pred[t] for t in ts], [f"{name}, t = {t + 1}" for t in ts], "carlasc",
                                        masks=[mask[t] for t in ts], window_size=(420, 320)))
    image = np.concatenate(rows, axis=0)
    Image.fromarray(image).save(out)
    return image


def baselines(preset: str, frames: tuple[int, ...], dataset: str = "synthetic_town",
              data_root: str | None = None) -> pd.DataFrame:
    """The mean-scene baseline (DESIGN §4) on the validation windows of every sequence length."""
    from occlab.studies.vae import mean_scene_baseline

    rows = []
    for t in frames:
        config, data, _ = vae_setup("dynamiccity", preset, dataset, data_root, frames=t)
        rows.append({"frames": t, **mean_scene_baseline(data, config.num_classes)})
    table = recon_protocol(preset, pd.DataFrame(rows))
    return attach_protocol({**table.attrs["protocol"], "dataset": data.dataset,
                            "geometry": geometry_label(data.geometry, data.crop),
                            "frames": list(frames), "seeds": "none: deterministic (the most frequent train class "
                            "per voxel)", "runs": "none: fitted on the train split, no model"}, table)


__all__ = ["FRAMES", "FUSIONS", "METHODS", "baselines", "equal_ratio_channels", "frames_of", "fusion_ablation",
           "methods_by_frames", "per_class", "reconstruction_grid", "seed_spread"]
