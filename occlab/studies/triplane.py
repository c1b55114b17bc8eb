"""X-Scene occupancy studies behind notebook 07 (Tab. 6) and the X-Scene rows of notebooks 01 (Tab. 1) and 02 (Tab. 2).

- VAE rows: triplane decoder with deformable attention or plain bilinear sampling x two triplane resolutions
  (x, y downsampled by 2 = "high", by 4 = "low"; z kept), trained by the shared trainer through the run cache
  on static town frames (windows of one frame), scored on the validation frames (IoU, mIoU).
- Diffusion rows: TriplaneDiT on the latent of the paper's choice (deformable, high resolution), trained with
  both conditions ("full"), without the layout, without the boxes; each samples one scene per validation
  frame under that frame's conditions, decoded by the VAE, and is scored against the real validation frames
  (3D FID and F-score with the kit's spconv feature network; sample seeds give the spread).
- Seams: a small consistency-aware outpainting (occlab.outpaint) under the layout and boxes of a real town region;
  label agreement in the overlaps and class statistics of the seam bands against the chunks' interiors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from occlab.errors import OcclabError
from occlab.report.tables import attach_protocol
from occlab.studies.vae import recon_protocol
from occlab.train.config import DataConfig, TrainConfig

RESOLUTIONS = {"high": 2, "low": 4}  # x, y downsampling of the triplane (paper: 100x100x16 and 50x50x16)
DECODERS = ("deformable", "bilinear")
DIFFUSION_VARIANTS = {"full": {}, "without_layout": {"layout_cond": False}, "without_boxes": {"box_cond": False}}
PAPER_VARIANT = {("deformable", "high"): ("full", "(100;100;16)"),
                 ("deformable", "low"): ("with_vae_deformattn", "(50;50;16)"),
                 ("bilinear", "low"): ("without_vae_deformattn", "(50;50;16)"),
                 ("bilinear", "high"): ("without_vae_deformattn", "(100;100;16)"),
                 ("full", None): ("full", "(100;100;16)"),
                 ("without_layout", None): ("without_layout_condition", "(100;100;16)"),
                 ("without_boxes", None): ("without_box_condition", "(100;100;16)")}


@dataclass(frozen=True)
class TriplaneSize:
    """What a preset scales in notebook 07."""

    crop: tuple[int, int, int]
    widths: str  # X-Scene VAE preset: tiny | small | paper
    dit_widths: str  # TriplaneDiT preset
    vae_steps: int
    vae_batch: int
    dit_steps: int
    dit_batch: int
    train_sequences: int  # one static frame each
    val_sequences: int
    seeds: tuple[int, ...]  # VAE seeds
    sample_seeds: tuple[int, ...]
    sampler_steps: int
    diffusion_steps: int
    outpaint: tuple[int, int]
    lr: float = 1e-3
    dit_lr: float = 5e-4
    note: str = ""


SIZES = {
    "smoke": TriplaneSize((16, 16, 8), "tiny", "tiny", 8, 2, 10, 4, 4, 4, (0,), (0,), 4, 100, (2, 2),
                          note="plumbing only: 16x16x8 crop, tiny widths, 8 VAE steps, 10 DiT steps"),
    "study": TriplaneSize((32, 32, 8), "small", "small", 200, 2, 300, 8, 64, 12, (0, 1), (0, 1), 20, 1000, (3, 3),
                          lr=2e-3, dit_lr=3e-4,
                          note="ego-centred 32x32x8 crops of the CarlaSC-geometry town (1/16 of the area, Z halved "
                               "against Occ3D's 16), static frames, half widths (C 8, W 32, MLP 128x4), 200 VAE "
                               "steps of batch 2 at lr 2e-3, 2 seeds; DiT-small (depth 6, width 192) 300 steps of "
                               "batch 8, 20 DDIM steps, 12 samples x 2 sample seeds"),
    "paper": TriplaneSize((200, 200, 16), "paper", "paper", 60_000, 1, 200_000, 16, 700, 150, (0,), (0, 1), 50, 1000,
                          (3, 3), note="the paper's Occ3D sizes (GPU)"),
}


def triplane_size(preset: str) -> TriplaneSize:
    if preset not in SIZES:
        raise OcclabError(f"unknown preset {preset!r}; expected one of {', '.join(SIZES)}")
    return SIZES[preset]


def vae_setup(preset: str, decoder: str = "deformable", resolution: str = "high", seed: int = 0,
              dataset: str = "synthetic_town", data_root: str | None = None, geometry: str = "carlasc",
              device: str = "cpu"):
    """(X-Scene VAE config, DataConfig of static frames, TrainConfig) of one Tab. 6 VAE variant."""
    from occlab.models.xscene import PRESETS

    if decoder not in DECODERS or resolution not in RESOLUTIONS:
        raise OcclabError(f"decoder must be one of {DECODERS} and resolution one of {tuple(RESOLUTIONS)}, got "
                          f"{decoder!r}, {resolution!r}")
    size = triplane_size(preset)
    crop = None if preset == "paper" else size.crop
    num_classes = 12 if dataset in ("occ3d_nuscenes", "occ3d_waymo") else 11
    config = PRESETS[size.widths](size.crop, None, num_classes=num_classes, decoder=decoder,
                                  downsample=RESOLUTIONS[resolution])
    data = DataConfig(dataset, data_root, geometry, 1, crop, "center", size.train_sequences, size.val_sequences)
    train = TrainConfig(steps=size.vae_steps, batch_size=size.vae_batch, lr=size.lr, seed=seed, device=device,
                        ckpt_every=max(size.vae_steps // 4, 10), threads=1 if device == "cpu" else None)
    return config, data, train


def _latent_label(config) -> str:
    s = config.latent_sizes
    return f"({s['x']};{s['y']};{s['z']})"


def vae_runs(preset: str, variants=None, seeds=None, progress: bool = False, **kw) -> pd.DataFrame:
    """Train (or reuse) each (decoder, resolution) x seed; one row per run: IoU, mIoU, cost, run id."""
    from occlab.train.runs import train_or_load

    variants = variants or [(d, r) for r in RESOLUTIONS for d in DECODERS]
    rows = []
    for decoder, resolution in variants:
        for seed in seeds if seeds is not None else triplane_size(preset).seeds:
            config, data, train = vae_setup(preset, decoder, resolution, seed, **kw)
            run = train_or_load("xscene", config, data, train, progress=progress)
            m = run.metrics
            rows.append({"decoder": decoder, "resolution": resolution, "triplane": _latent_label(config),
                         "seed": seed, "miou": m["val"]["miou"], "iou": m["val"]["iou"],
                         "cr": config.compression_ratio(), "s_per_iter": m["s_per_iter"], "params": m["params"],
                         "run_id": run.id})
    return recon_protocol(preset, pd.DataFrame(rows))


def _spread(s: pd.Series) -> float:
    return float(np.std(s, ddof=1)) if len(s) > 1 else 0.0


def summarize(df: pd.DataFrame, keys: list[str], metrics) -> pd.DataFrame:
    """Mean and seed-to-seed std of each metric per variant, with the run ids."""
    agg = {m: (m, "mean") for m in metrics}
    agg.update({f"{m}_std": (m, _spread) for m in metrics})
    agg["seeds"] = ("seed", "count")
    agg["run_ids"] = ("run_id", lambda s: " ".join(dict.fromkeys(s)))
    return df.groupby(keys, sort=False).agg(**agg).reset_index()


# ---------------------------------------------------------------------------------------------------------
# Diffusion
# ---------------------------------------------------------------------------------------------------------

def train_diffusion(preset: str, variant: str = "full", vae_run_id: str | None = None, seed: int = 0,
                    device: str = "cpu", progress: bool = False) -> dict:
    """A TriplaneDiT of `variant` (full / without_layout / without_boxes) on the latent of the preset's
    deformable high-resolution VAE (seed 0), cached under its run key: {ckpt, run_id, metrics}."""
    from occlab.models.xscene_diffusion import config_for_vae
    from occlab.train.dit_trainer import DiTTrainConfig
    from occlab.train.runs import find_run, runs_dir, train_or_load
    from occlab.train.triplane_diffusion import (
        load_vae,
        run_key,
        train_triplane_diffusion,
    )

    if variant not in DIFFUSION_VARIANTS:
        raise OcclabError(f"unknown diffusion variant {variant!r}; expected one of {', '.join(DIFFUSION_VARIANTS)}")
    size = triplane_size(preset)
    if vae_run_id is None:
        vae_run_id = train_or_load("xscene", *vae_setup(preset, device=device), progress=progress).id
    vae_ckpt = find_run(vae_run_id).path / "checkpoint.pt"
    vae, data = load_vae(vae_ckpt)
    dit = config_for_vae(vae.config, size.dit_widths, max_boxes=16, **DIFFUSION_VARIANTS[variant])
    cfg = DiTTrainConfig(steps=size.dit_steps, batch_size=size.dit_batch, lr=size.dit_lr, seed=seed,
                         diffusion_steps=size.diffusion_steps, ckpt_every=max(size.dit_steps // 4, 5), device=device,
                         threads=1 if device == "cpu" else None)
    key = run_key(dit, cfg, vae_ckpt, data)
    metrics = train_triplane_diffusion(vae_ckpt, runs_dir() / key, dit, cfg, data=data, progress=progress)
    return {"ckpt": runs_dir() / key / "checkpoint.pt", "run_id": key, "metrics": metrics, "vae_run_id": vae_run_id}


def val_frames(ckpt, max_boxes: int | None = None) -> dict:
    """The validation frames of a triplane diffusion run with their conditions (encode_frames of the val split)."""
    from occlab.train.triplane_diffusion import encode_frames, load_triplane_diffusion

    vae, model, _, _, data = load_triplane_diffusion(ckpt)
    return encode_frames(vae, data, "val", max_boxes or model.config.max_boxes)


def samples_for(ckpt, frames: dict, seed: int, steps: int, conditional: bool = True, guidance: float = 1.0,
                batch: int = 16) -> torch.Tensor:
    """One decoded sample (N, X, Y, Z) uint8 per frame, under that frame's conditions (those the model takes), or
    unconditional (every condition dropped)."""
    from occlab.train.triplane_diffusion import load_triplane_diffusion, sample_scenes

    vae, model, diffusion, stats, _ = load_triplane_diffusion(ckpt)
    keys = (["layout"] if model.config.layout_cond else []) + (["boxes", "box_classes"] if model.config.box_cond else [])
    n = len(frames["labels"])
    out = []
    for s in range(0, n, batch):
        cond = {k: frames[k][s:s + batch] for k in keys} if conditional else None
        out.append(sample_scenes(vae, model, diffusion, stats, cond, min(batch, n - s), steps=steps,
                                 guidance=guidance, seed=seed * 100_003 + s))
    return torch.cat(out)


def score_samples(real: torch.Tensor, fake: torch.Tensor, data: DataConfig, preset: str, device: str = "cpu") -> dict:
    """3D FID and F-score (and precision, recall, KID, IS) of fake frames (N, X, Y, Z) against real ones."""
    from occlab.metrics.generation import generation_metrics
    from occlab.studies.generation import feature_weights

    weights = feature_weights(data, preset if preset in ("smoke", "study", "paper") else "smoke", device, False)
    r = np.asarray(real, np.uint8)[:, None]
    f = np.asarray(fake, np.uint8)[:, None]
    n = min(len(r), len(f))
    m = generation_metrics(r, f, "3d", weights=weights, dataset=data.dataset, geometry=data.geometry, frame_stride=1,
                           device=device, kid_subset_size=max(2, n - 1), kid_subsets=20,
                           prc_neighborhood=max(1, min(3, n - 2)))
    return {f"{k}_3d": m.get(k) for k in ("fid", "f_score", "precision", "recall", "kid", "is")}


def diffusion_protocol(preset: str, data: DataConfig, frames: int, conditions: str, device: str = "cpu") -> dict:
    """The protocol card of the triplane diffusion tables: samples per val frame under its own conditions."""
    from occlab.studies.generation import feature_weights, generation_protocol

    size = triplane_size(preset)
    weights = feature_weights(data, preset, device, False)
    return generation_protocol(
        preset, data, ("3d",), weights, split="one generated scene per val frame vs those val frames",
        seeds=f"diffusion seed 0 on VAE seed 0; sample seeds {list(size.sample_seeds)}",
        samples=f"{frames} per sample seed (one per val frame); DDIM {size.sampler_steps} steps",
        conditions=conditions, ground_truth_in_sampling="the val frames' BEV layout and boxes, as conditions (the "
        "paper's protocol); never their labels or latents")


DIFFUSION_CONDITIONS = ("full: BEV layout + 3D boxes of each val frame; without_layout: boxes only; "
                        "without_boxes: layout only")


def diffusion_runs(preset: str, variants=None, device: str = "cpu", progress: bool = False) -> pd.DataFrame:
    """Each diffusion variant x sample seed: 3D FID / F-score of its samples vs the real validation frames."""
    size = triplane_size(preset)
    rows, frames = [], None
    for variant in variants or list(DIFFUSION_VARIANTS):
        gen = train_diffusion(preset, variant, device=device, progress=progress)
        if frames is None:
            from occlab.train.triplane_diffusion import load_triplane_diffusion

            frames = val_frames(gen["ckpt"], 16)
            data = load_triplane_diffusion(gen["ckpt"])[4]
        for s in size.sample_seeds:
            fake = samples_for(gen["ckpt"], frames, s, size.sampler_steps)
            rows.append({"variant": variant, "seed": s, **score_samples(frames["labels"], fake, data, preset, device),
                         "dit_steps": gen["metrics"]["steps"], "final_loss": gen["metrics"]["final_loss"],
                         "s_per_iter": gen["metrics"]["s_per_iter"], "run_id": gen["run_id"]})
    card = diffusion_protocol(preset, data, len(frames["labels"]), DIFFUSION_CONDITIONS, device)
    return attach_protocol(card, pd.DataFrame(rows))


# ---------------------------------------------------------------------------------------------------------
# Tab. 6, claims
# ---------------------------------------------------------------------------------------------------------

def ablation_table(vae: pd.DataFrame, diff: pd.DataFrame) -> pd.DataFrame:
    """X-Scene Tab. 6: our VAE and diffusion rows (means and seed spread) with the paper's numbers beside."""
    from occlab.report.tables import paper_table

    v = summarize(vae, ["decoder", "resolution", "triplane"], ("iou", "miou"))
    d = summarize(diff, ["variant"], ("fid_3d", "f_score_3d"))
    v["variant"] = [f"{a}/{b}" for a, b in zip(v["decoder"], v["resolution"])]
    v["key"] = [PAPER_VARIANT[(a, b)] for a, b in zip(v["decoder"], v["resolution"])]
    d["key"] = [PAPER_VARIANT[(a, None)] for a in d["variant"]]
    ours = pd.concat([v.drop(columns=["decoder", "resolution"]), d], ignore_index=True)
    paper = paper_table("xscene_t6_occupancy_ablation")
    paper["key"] = list(zip(paper["variant"], paper["triplane_resolution"]))
    paper = paper.drop(columns=["variant"]).rename(columns={
        "triplane_resolution": "paper: triplane", "iou": "paper: IoU (%)", "miou": "paper: mIoU (%)",
        "fid_3d": "paper: 3D FID", "f_3d": "paper: 3D F-score"})
    ours = ours.rename(columns={c: f"ours: {c}" for c in ours.columns if c not in ("variant", "key")})
    table = ours.merge(paper, on="key", how="left").drop(columns=["key"])
    gen_card, recon_card = diff.attrs.get("protocol", {}), vae.attrs.get("protocol", {})
    card = {**gen_card, "split": "VAE rows: val frames reconstructed; diffusion rows: "
            + gen_card.get("split", "not run"),
            "classes_miou": recon_card.get("classes_miou"), "classes_iou": recon_card.get("classes_iou")}
    return attach_protocol(card, table)


def gain_values(vae: pd.DataFrame) -> dict:
    """{resolution: mIoU gain of deformable over bilinear sampling, its seed spread}: per-seed pairs when both
    decoders ran the same seeds, the spread propagated from both variants' stds."""
    out = {}
    for res in RESOLUTIONS:
        a = vae[(vae.decoder == "deformable") & (vae.resolution == res)].set_index("seed")["miou"]
        b = vae[(vae.decoder == "bilinear") & (vae.resolution == res)].set_index("seed")["miou"]
        if len(a) and len(b):
            out[res] = {"miou_gain": float(a.mean() - b.mean()),
                        "miou_gain_std": math.sqrt(_spread(a) ** 2 + _spread(b) ** 2),
                        "seeds": int(min(len(a), len(b)))}
    return out


def claims(vae: pd.DataFrame, diff: pd.DataFrame, preset: str) -> list[dict]:
    """Verdicts of notebook 07's claims (occlab.report.claims): the deformable gain by resolution, the resolution
    ordering, and the FID cost of dropping the layout against that of dropping the boxes."""
    from occlab.report.claims import evaluate_claims

    values: dict = {}
    v = summarize(vae, ["decoder", "resolution"], ("miou", "iou"))
    for _, row in v.iterrows():
        values[f"{row['decoder']}/{row['resolution']}"] = row.to_dict()
    runs = {res: " ".join(vae[vae.resolution == res]["run_id"]) for res in RESOLUTIONS}
    for res, g in gain_values(vae).items():
        values[f"gain/{res}"] = {**g, "run_ids": runs[res]}
    if len(diff):
        d = summarize(diff, ["variant"], ("fid_3d", "f_score_3d"))
        for _, row in d.iterrows():
            values[row["variant"]] = row.to_dict()
        full = values.get("full", {})
        for variant in ("without_layout", "without_boxes"):  # the FID each condition's removal adds
            if variant in values and full:
                values[f"rise/{variant}"] = {
                    "fid_rise": values[variant]["fid_3d"] - full["fid_3d"],
                    "fid_rise_std": math.hypot(values[variant]["fid_3d_std"], full["fid_3d_std"]),
                    "seeds": int(min(values[variant]["seeds"], full["seeds"])),
                    "run_ids": f"{values[variant]['run_ids']} {full['run_ids']}"}
    return evaluate_claims("07_triplane_ablation", values, preset)


# ---------------------------------------------------------------------------------------------------------
# Seams of an outpainted map
# ---------------------------------------------------------------------------------------------------------

def seam_statistics(labels: torch.Tensor, offsets: dict, grid, band: int = 2) -> dict:
    """Class statistics of the seam bands (voxel columns within `band` of a line where a later chunk's fresh
    voxels meet an earlier chunk's) against the rest: occupancy in both, and the total-variation distance
    between their class histograms of occupied voxels (0: the seams look like the interiors)."""
    lab = torch.as_tensor(labels).long()
    X, Y = int(grid[0]), int(grid[1])
    seam = torch.zeros(lab.shape[:2], dtype=torch.bool)
    written = torch.zeros_like(seam)
    for key in sorted(offsets):
        x0, y0 = offsets[key]
        region = (slice(x0, x0 + X), slice(y0, y0 + Y))
        fresh = ~written[region]
        if written.any():  # the fresh part's border with the earlier chunks
            f = torch.zeros_like(seam)
            f[region] = fresh
            old = written & ~f
            near = torch.nn.functional.max_pool2d(old[None, None].float(), 2 * band + 1, 1, band)[0, 0] > 0
            near_fresh = torch.nn.functional.max_pool2d(f[None, None].float(), 2 * band + 1, 1, band)[0, 0] > 0
            seam |= (f & near) | (old & near_fresh)
        written[region] = True
    k = int(lab.max()) + 1 if lab.numel() else 1

    def hist(cols: torch.Tensor) -> tuple[torch.Tensor, float]:
        v = lab[cols]  # (n, Z)
        occ = v[v > 0]
        h = torch.bincount(occ, minlength=k).double()
        return h / h.sum().clamp_min(1), float((v > 0).double().mean()) if v.numel() else float("nan")

    hs, occ_s = hist(seam)
    hi, occ_i = hist(~seam)
    return {"seam_columns": int(seam.sum()), "occupancy_seam": occ_s, "occupancy_interior": occ_i,
            "class_tv_seam_vs_interior": float(0.5 * (hs - hi).abs().sum())}


def real_region(data: DataConfig, shape, index: int = 0) -> dict:
    """The conditions of an outpainted map of `shape` (X, Y, Z) and the real scene to compare it with: layout
    (X, Y), labels (X, Y, Z) and box rows (M, 10) of an ego-centred region of a validation frame (uncropped town),
    with the region's metric corner `min_bound` and `voxel_size` (the frame the boxes are in)."""
    from occlab.data import get_geometry, make_dataset

    shape = tuple(int(v) for v in shape)
    ds = make_dataset(data.dataset, data.data_root, "val", **{**data.source_options("val"), "crop": shape})
    item = ds[index]
    geo = get_geometry(data.geometry).crop(shape)  # boxes stay in ego metres: the region's bounds in that frame
    return {"layout": item["layout"][0].long(), "labels": item["labels"][0], "boxes": item["boxes"][0],
            "min_bound": geo.min_bound, "voxel_size": geo.voxel_size}


def outpaint_seams(gen: dict, preset: str, seed: int = 0, resample: int = 0, band: int = 2) -> dict:
    """Outpaint the preset's map (3x3 at study) under a real region's layout and boxes (those the model was trained
    with) -> {result, real, agreement (mean and per chunk), seam statistics of the map and of the real region}."""
    from occlab.outpaint import big_shape, outpaint
    from occlab.train.triplane_diffusion import load_triplane_diffusion

    size = triplane_size(preset)
    vae, model, diffusion, stats, data = load_triplane_diffusion(gen["ckpt"])
    grid = vae.config.grid
    shape = big_shape(grid, size.outpaint)
    region = real_region(data, shape)
    layout = region["layout"] if model.config.layout_cond else None
    boxes = region["boxes"] if model.config.box_cond else None
    res = outpaint(vae, model, diffusion, layout, boxes, size.outpaint, None, size.sampler_steps, seed, stats=stats,
                   voxel_size=region["voxel_size"], min_bound=region["min_bound"], details=True, resample=resample)
    given = [n for n, v in (("BEV layout", layout), ("3D boxes", boxes)) if v is not None]
    agree = res.agreement
    return {"result": res, "real": region["labels"], "agreement": float(np.mean(list(agree.values()))),
            "agreement_per_chunk": agree, "stats": seam_statistics(res.labels, res.offsets, grid, band),
            "real_stats": seam_statistics(region["labels"], res.offsets, grid, band),
            "protocol": {"dataset": data.dataset, "split": "val (the real region whose layout conditions the map)",
                         "geometry": f"{data.geometry}, chunks {'x'.join(map(str, grid))}, map "
                                     f"{'x'.join(map(str, shape))}",
                         "classes_miou": "not scored", "classes_iou": "not scored", "mask": "none", "frames": 1,
                         "horizon": "none (one static map)", "metric_network": "none: label agreement and class "
                                                                              "histograms in closed form",
                         "preset": preset, "seeds": f"sample seed {seed}",
                         "samples": f"one {size.outpaint[0]}x{size.outpaint[1]}-chunk map, DDIM {size.sampler_steps} "
                                    f"steps, RePaint resampling {resample}",
                         "conditions": f"the {' and '.join(given)} of a real val region (each chunk: its crop "
                                       f"of the layout, the boxes whose centre it holds)" if given else "none",
                         "ground_truth_in_sampling": f"the real region's {' and '.join(given)}, as conditions; never "
                                                     f"its labels" if given else "never",
                         "runs": [gen["run_id"]]}}


def seam_table(seams: dict) -> pd.DataFrame:
    """One row for the outpainted map, one for the real region under the same chunk grid."""
    rows = [{"map": "outpainted", "overlap_label_agreement": seams["agreement"], **seams["stats"]},
            {"map": "real region (same chunk grid)", "overlap_label_agreement": float("nan"), **seams["real_stats"]}]
    return attach_protocol(seams.get("protocol", {}), pd.DataFrame(rows))


# ---------------------------------------------------------------------------------------------------------
# Rows for notebooks 01 (X-Scene Tab. 1) and 02 (X-Scene Tab. 2)
# ---------------------------------------------------------------------------------------------------------

def triplane_reconstruction_rows(preset: str, seeds=None, **kw) -> pd.DataFrame:
    """X-Scene Tab. 1 rows: the triplane VAE (deformable) at both resolutions -> method, latent, mIoU, IoU (means,
    seed std, run ids), with the paper's X-Scene rows beside (columns "ours: ..." and "paper: ...")."""
    from occlab.report.tables import paper_table

    runs = vae_runs(preset, [("deformable", r) for r in RESOLUTIONS], seeds, **kw)
    t = summarize(runs, ["resolution", "triplane"], ("miou", "iou", "cr"))
    t.insert(0, "method", "X-Scene (triplane VAE)")
    paper = paper_table("xscene_t1_vae_reconstruction")
    paper = paper[paper["method"] == "X-Scene"].copy()
    paper["resolution"] = paper["downsampled_size"].map({"(100;100;16)": "high", "(50;50;8)": "low"})
    paper = paper.rename(columns={"downsampled_size": "paper: latent", "miou": "paper: mIoU (%)",
                                  "iou": "paper: IoU (%)"})[["resolution", "paper: latent", "paper: mIoU (%)",
                                                             "paper: IoU (%)"]]
    t = t.rename(columns={c: f"ours: {c}" for c in t.columns if c not in ("method", "resolution")})
    return recon_protocol(preset, t.merge(paper, on="resolution", how="left"))


def triplane_generation_rows(preset: str, device: str = "cpu", progress: bool = False) -> pd.DataFrame:
    """X-Scene Tab. 2 rows: the layout- and box-conditioned triplane diffusion against the same model sampled
    unconditionally (all conditions dropped) -> 3D FID, F-score, precision, recall per sample seed mean / std."""
    from occlab.report.tables import paper_table
    from occlab.train.triplane_diffusion import load_triplane_diffusion

    size = triplane_size(preset)
    gen = train_diffusion(preset, "full", device=device, progress=progress)
    frames = val_frames(gen["ckpt"], 16)
    data = load_triplane_diffusion(gen["ckpt"])[4]
    rows = []
    for conditional in (True, False):
        for s in size.sample_seeds:
            fake = samples_for(gen["ckpt"], frames, s, size.sampler_steps, conditional)
            rows.append({"method": "X-Scene triplane diffusion",
                         "note": "layout-conditioned" if conditional else "unconditioned", "seed": s,
                         **score_samples(frames["labels"], fake, data, preset, device), "run_id": gen["run_id"]})
    df = pd.DataFrame(rows)
    t = summarize(df, ["method", "note"], ("fid_3d", "f_score_3d", "precision_3d", "recall_3d"))
    paper = paper_table("xscene_t2_generation")
    paper = paper[(paper["method"] == "X-Scene") & (paper["classes"] == 11)][["note", "fid_3d", "f_3d"]]
    paper = paper.rename(columns={"fid_3d": "paper: 3D FID", "f_3d": "paper: 3D F-score"})
    t = t.rename(columns={c: f"ours: {c}" for c in t.columns if c not in ("method", "note")})
    card = diffusion_protocol(preset, data, len(frames["labels"]), "layout-conditioned rows: BEV layout + 3D boxes "
                              "of each val frame; unconditioned rows: every condition dropped", device)
    return attach_protocol(card, t.merge(paper, on="note", how="left"))


__all__ = ["DECODERS", "DIFFUSION_VARIANTS", "RESOLUTIONS", "SIZES", "ablation_table", "claims", "diffusion_runs",
           "gain_values", "outpaint_seams", "real_region", "seam_statistics", "seam_table", "summarize",
           "train_diffusion", "triplane_generation_rows", "triplane_reconstruction_rows", "triplane_size",
           "vae_runs", "vae_setup"]
