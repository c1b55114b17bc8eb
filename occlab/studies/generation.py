"""Generation studies behind notebooks 02 (DynamicCity Tab. 2) and 05 (DynamicCity Tab. 5).

Both train (or reuse, through the run cache) the preset's DynamicCity VAE, a DiT per variant on its cached
HexPlane latents (keyed by `occlab.train.dit_trainer.run_key`, so 05's padded-rollout DiT is 02's DynamicCity
DiT), sample `n` unconditional sequences per DiT and sample seed, and score them against real validation
windows with the kit's feature networks (`generation_metrics`: 3D by the f3d network, 2D by rendered views).
A real-vs-real reference row (train windows scored against the same validation windows) shows the metric floor
a perfect generator would reach with this many samples.

05: rollout "unfold" | "vconcat" | "pro". 02: DynamicCity (the padded-rollout DiT) and OccSora: the same DiT
(same preset, steps and training) over the preset's OccSora tokenizer latent (its code vectors, frames side by
side: token layout "grid", occlab.models.grid_latent), samples snapped to the nearest codes and decoded by
OccSora's decoder. The OccSora VAE is notebook 01's (the run cache).
`extra` lets other generators (e.g. X-Scene's triplane diffusion) join 02's table as {name: labels}.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from occlab.errors import OcclabError
from occlab.report.tables import attach_protocol, geometry_label

ROLLOUTS = ("unfold", "vconcat", "pro")
PAPER_ROLLOUT = {"unfold": "direct_unfold", "vconcat": "vertical_concatenation", "pro": "padded_rollout"}
METRICS = ("is", "fid", "kid", "precision", "recall")
PAPER_METRIC = {"is": "is", "fid": "fid", "kid": "kid", "precision": "p", "recall": "r"}


@dataclass(frozen=True)
class GenSize:
    """What a preset scales in notebooks 02 and 05."""

    samples: int  # generated sequences per DiT and sample seed
    real: int  # real validation windows (and train windows for the reference row)
    sampler_steps: int  # DDIM steps
    dit_steps: int | None  # DiT training steps (None: the DiT preset's)
    sample_seeds: tuple[int, ...]  # the FID spread comes from these
    frame_stride: int  # every k-th frame of a sequence is scored
    f3d_steps: int  # training steps of the 3D feature network (cached per dataset and grid)
    f3d_sequences: int
    note: str = ""


SIZES = {
    "smoke": GenSize(4, 4, 4, None, (0,), 4, 20, 8,
                     note="plumbing only: the smoke VAE, a 20-step tiny DiT, 4 samples, 4 DDIM steps"),
    "study": GenSize(24, 24, 25, 600, (0, 1), 2, 300, 96,
                     note="the study VAE (32x32x8 crop, 8 frames), DiT-small 600 steps per variant, 24 samples "
                          "x 2 sample seeds, 25 DDIM steps, every 2nd frame scored"),
    "paper": GenSize(256, 256, 50, None, (0, 1), 1, 600, 192, note="GPU sizes: DiT paper preset, 256 samples"),
}


def gen_size(preset: str) -> GenSize:
    if preset not in SIZES:
        raise OcclabError(f"unknown preset {preset!r}; expected one of {', '.join(SIZES)}")
    return SIZES[preset]


# ---------------------------------------------------------------------------------------------------------
# Models and samples
# ---------------------------------------------------------------------------------------------------------

def train_vae(preset: str, dataset: str = "synthetic_town", data_root: str | None = None, device: str = "cpu",
              seed: int = 0, progress: bool = True, model: str = "dynamiccity"):
    """(run, DataConfig) of the preset's VAE of `model` ("dynamiccity" | "occsora"; the ones notebooks 01/03
    train: the run cache)."""
    from occlab.studies.vae import vae_setup
    from occlab.train.runs import train_or_load

    config, data, train = vae_setup(model, preset, dataset, data_root, device, seed)
    return train_or_load(model, config, data, train, progress=progress), data


def train_generator(vae_ckpt, preset: str, rollout: str = "pro", device: str = "cpu", seed: int = 0,
                    progress: bool = True) -> dict:
    """An unconditional DiT of `rollout` on the VAE's latents, cached under its run key: {ckpt, run_id, metrics}."""
    from occlab.train.dit_trainer import dit_setup, run_key, train_dit
    from occlab.train.latents import read_vae_checkpoint
    from occlab.train.runs import runs_dir

    dit, cfg = dit_setup(vae_ckpt, preset, rollout, (), device, seed)
    steps = gen_size(preset).dit_steps
    if steps:
        cfg.steps = steps
    if device == "cpu":
        cfg.threads = 1  # 2 threads on 2 shared cores thrash (occlab.studies.applications)
    key = run_key(dit, cfg, read_vae_checkpoint(vae_ckpt)["fingerprint"])
    result = train_dit(vae_ckpt, runs_dir() / key, dit, cfg, progress=progress)
    return {"ckpt": result.checkpoint, "run_id": key, "metrics": result.metrics}


def dit_checkpoint(run_id: str):
    """The checkpoint of a cached DiT run (by the id in a table's run_id column)."""
    from occlab.train.runs import runs_dir

    path = runs_dir() / run_id / "checkpoint.pt"
    if not path.is_file():
        raise OcclabError(f"no DiT run {run_id!r} under {runs_dir()}; run the study again to train it")
    return path


@torch.no_grad()
def sample_labels(dit_ckpt, n: int, steps: int, seed: int = 0, device: str = "cpu") -> np.ndarray:
    """n unconditional samples (n, T, X, Y, Z) uint8 of a DiT, decoded by its VAE (DDIM, fixed seed)."""
    from occlab.generate import decode_maps, load_generator, sample_latents

    gen = load_generator(dit_ckpt, device=device)
    maps = sample_latents(gen["model"], gen["diffusion"], n, steps=steps, cond={}, seed=seed,
                          device=gen["device"], progress=False)
    return decode_maps(gen, maps)


def real_labels(data, split: str, n: int) -> np.ndarray:
    """Up to n windows (n, T, X, Y, Z) uint8 of a split at the VAE's crop and frames, evenly spread."""
    from occlab.data import make_dataset

    opts = data.source_options(split)
    if data.dataset == "synthetic_town":  # one window per scene: as many scenes as windows asked for
        opts["num_sequences"] = max(n, opts["num_sequences"])
    ds = make_dataset(data.dataset, data.data_root, split, **opts)
    pick = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
    return np.stack([np.asarray(ds[int(i)]["labels"], dtype=np.uint8) for i in pick])


def feature_weights(data, preset: str, device: str = "cpu", progress: bool = True):
    """The 3D feature network of the data's dataset and crop: the cached one, else trained (train_f3d)."""
    from occlab.metrics.generation import default_weights
    from occlab.train.features import train_f3d

    grid = tuple(data.crop) if data.crop else None
    found = default_weights("3d", data.dataset, grid, data.geometry) if grid else None
    if found is not None:
        return found
    size = gen_size(preset)
    return train_f3d(data.dataset, data.data_root, data.geometry, crop=data.crop, crop_mode=data.crop_mode,
                     steps=size.f3d_steps, sequences=size.f3d_sequences, device=device, progress=progress)


def is_weights_2d(data, preset: str, device: str = "cpu", progress: bool = True):
    """The 2D network whose logits give the 2D IS: the cached one; trained (train_f2d) except at smoke, where
    None leaves the 2D IS empty (FID/KID/precision/recall in 2D come from InceptionV3 either way)."""
    from occlab.metrics.generation import default_weights
    from occlab.train.features import train_f2d

    found = default_weights("2d", data.dataset, tuple(data.crop), data.geometry) if data.crop else None
    if found is not None or preset == "smoke":
        return found
    size = gen_size(preset)
    return train_f2d(data.dataset, data.data_root, data.geometry, crop=data.crop, crop_mode=data.crop_mode,
                     steps=size.f3d_steps, sequences=size.f3d_sequences, device=device, progress=progress)


def score(real: np.ndarray, fake: np.ndarray, data, spaces=("3d",), weights=None, frame_stride: int = 4,
          device: str = "cpu", is_weights=None) -> dict:
    """{metric_space: value} of fake against real: IS/FID/KID/precision/recall in each space ("3d", "2d").
    `weights`: the f3d network; `is_weights`: the f2d network of the 2D IS (None: no 2D IS)."""
    from occlab.metrics.generation import generation_metrics

    out = {}
    n = min(len(fake), len(real)) * -(-real.shape[1] // frame_stride)  # scored frames per set
    for space in spaces:
        m = generation_metrics(real, fake, space, weights=weights if space == "3d" else None,
                               is_weights=is_weights if space == "2d" else None, dataset=data.dataset,
                               geometry=data.geometry, frame_stride=frame_stride, device=device, kid_subsets=20,
                               prc_neighborhood=max(1, min(3, n - 2)))
        out.update({f"{k}_{space}": m.get(k) for k in METRICS})
    return out


def metric_networks(spaces, weights=None, is_weights=None) -> str:
    """The versions of the networks behind a table's generation metrics, per space ("3D: f3d...@sha; 2D: ...")."""
    from occlab.metrics.features2d import inception_path
    from occlab.metrics.generation import network_version

    parts = []
    if "3d" in spaces and weights is not None:
        parts.append(f"3D: {network_version(weights)}")
    if "2d" in spaces:
        parts.append(f"2D FID/KID/P/R: InceptionV3 {network_version(inception_path())}")
        parts.append(f"2D IS: {network_version(is_weights)}" if is_weights is not None else "2D IS: none")
    return "; ".join(parts) or None


def generation_protocol(preset: str, data, spaces=("3d",), weights=None, is_weights=None, seed: int = 0,
                        conditions: str = "none (unconditional)", samples: str | None = None,
                        seeds: str | None = None, split: str | None = None,
                        ground_truth_in_sampling: str = "never") -> dict:
    """The protocol card of a generation table: what was sampled, against which real data, scored how.
    The defaults describe notebooks 02/05 (unconditional DiTs, GenSize); X-Scene's studies override them."""
    size = gen_size(preset)
    return {"dataset": data.dataset, "geometry": geometry_label(data.geometry, data.crop),
            "split": split or "generated samples vs real val windows (reference row: real train windows vs the "
                              "same val windows)",
            "classes_miou": "not scored (generation metrics)", "classes_iou": "not scored (generation metrics)",
            "mask": "none: every voxel of the crop", "frames": data.frames, "horizon": data.frames,
            "preset": preset, "seeds": seeds or f"generator seed {seed}; sample seeds {list(size.sample_seeds)}",
            "samples": samples or (f"{size.samples} per generator and sample seed vs {size.real} real windows; "
                                   f"every {size.frame_stride}. frame scored; DDIM {size.sampler_steps} steps"),
            "metric_network": metric_networks(spaces, weights, is_weights), "conditions": conditions,
            "ground_truth_in_sampling": ground_truth_in_sampling}


# ---------------------------------------------------------------------------------------------------------
# The studies
# ---------------------------------------------------------------------------------------------------------

def _sample_rows(name: str, dit: dict, real, data, preset: str, spaces, weights, device: str,
                 is_weights=None) -> list[dict]:
    size = gen_size(preset)
    rows = []
    for s in size.sample_seeds:
        fake = sample_labels(dit["ckpt"], size.samples, size.sampler_steps, s, device)
        # 2D (render + Inception, minutes on a CPU) for the first sample seed only; the 3D FID of every seed
        # gives the spread the claims need
        at = spaces if s == size.sample_seeds[0] else tuple(x for x in spaces if x != "2d")
        rows.append({"variant": name, "sample_seed": s, **score(real, fake, data, at, weights, size.frame_stride,
                                                               device, is_weights),
                     "s_per_iter": dit["metrics"].get("s_per_iter"), "dit_steps": dit["metrics"].get("steps"),
                     "final_loss": dit["metrics"].get("tail_loss"), "run_id": dit["run_id"]})
    return rows


def reference_row(real, data, preset: str, spaces, weights, device: str = "cpu", is_weights=None) -> dict:
    """Real train windows scored against the validation windows: the floor a perfect generator reaches."""
    size = gen_size(preset)
    train = real_labels(data, "train", len(real))
    return {"variant": "real train windows (reference)", "sample_seed": -1,
            **score(real, train, data, spaces, weights, size.frame_stride, device, is_weights)}


def summarize(rows: pd.DataFrame, spaces=("3d",)) -> pd.DataFrame:
    """Mean and sample-seed spread (std over sample seeds; 0 with one) of each metric per variant."""
    cols = [f"{m}_{s}" for s in spaces for m in METRICS]
    extra = [c for c in ("s_per_iter", "dit_steps", "final_loss") if c in rows]
    agg = {c: (c, "mean") for c in cols + extra}
    agg.update({f"{c}_std": (c, lambda v: float(v.dropna().std(ddof=1)) if v.notna().sum() > 1 else 0.0)
                for c in cols})  # 2D metrics come from the first sample seed only
    agg["seeds"] = ("sample_seed", "nunique")
    if "run_id" in rows:
        agg["run_ids"] = ("run_id", lambda v: " ".join(sorted({str(x) for x in v if isinstance(x, str)})))
    return rows.groupby("variant", sort=False).agg(**agg).reset_index()


def _paper(name: str, key: str, labels: dict, spaces) -> pd.DataFrame:
    from occlab.report.tables import paper_table

    paper = paper_table(name)
    if "dataset" in paper:
        paper = paper[paper.dataset == "CarlaSC"]
    inv = {v: k for k, v in labels.items()}
    paper = paper.assign(variant=paper[key].map(inv))
    cols = {f"{PAPER_METRIC[m]}_{s}": f"paper: CarlaSC {m} {s.upper()}" for s in spaces for m in METRICS}
    return paper[["variant", *cols]].rename(columns=cols)


def _beside(table: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    ours = table.rename(columns={c: f"ours: {c}" for c in table.columns if c != "variant"})
    return ours.merge(paper, on="variant", how="left")


def rollout_ablation(preset: str, dataset: str = "synthetic_town", data_root: str | None = None, device: str = "cpu",
                     seed: int = 0, rollouts=ROLLOUTS, progress: bool = True):
    """DynamicCity Tab. 5: (rows per DiT x sample seed incl. the reference, summary table beside the paper)."""
    vae, data = train_vae(preset, dataset, data_root, device, seed, progress)
    weights = feature_weights(data, preset, device, progress)
    real = real_labels(data, "val", gen_size(preset).real)
    rows = []
    for r in rollouts:
        dit = train_generator(vae.path / "checkpoint.pt", preset, r, device, seed, progress)
        rows += _sample_rows(r, dit, real, data, preset, ("3d",), weights, device)
    rows.append(reference_row(real, data, preset, ("3d",), weights, device))
    rows = pd.DataFrame(rows).assign(vae_run=vae.id)
    table = _beside(summarize(rows), _paper("dynamiccity_t5_rollout", "method", PAPER_ROLLOUT, ("3d",)))
    return attach_protocol(generation_protocol(preset, data, ("3d",), weights, seed=seed), rows, table)


def methods(preset: str, dataset: str = "synthetic_town", data_root: str | None = None, device: str = "cpu",
            seed: int = 0, spaces=("3d", "2d"), extra: dict[str, np.ndarray] | None = None, progress: bool = True):
    """DynamicCity Tab. 2: (rows, table) of DynamicCity (padded-rollout DiT), OccSora (the same DiT over its
    tokenizer's latent grid) and the reference row in `spaces`.

    `extra` {name: labels (n, T, X, Y, Z)} joins other generators' samples (X-Scene Tab. 2 rows) scored the same way.
    """
    vae, data = train_vae(preset, dataset, data_root, device, seed, progress)
    weights = feature_weights(data, preset, device, progress)
    real = real_labels(data, "val", gen_size(preset).real)
    f2d = is_weights_2d(data, preset, device, progress) if "2d" in spaces else None
    dit = train_generator(vae.path / "checkpoint.pt", preset, "pro", device, seed, progress)
    rows = _sample_rows("dynamiccity", dit, real, data, preset, spaces, weights, device, f2d)
    occsora, occsora_data = train_vae(preset, dataset, data_root, device, seed, progress, model="occsora")
    if (occsora_data.crop, occsora_data.frames) != (data.crop, data.frames):
        raise OcclabError(f"the {preset} OccSora VAE sees crop {occsora_data.crop} x {occsora_data.frames} frames, "
                          f"DynamicCity's {data.crop} x {data.frames}: their samples are not comparable")
    occsora_dit = train_generator(occsora.path / "checkpoint.pt", preset, "grid", device, seed, progress)
    rows += _sample_rows("occsora", occsora_dit, real, data, preset, spaces, weights, device, f2d)
    for name, fake in (extra or {}).items():
        rows.append({"variant": name, "sample_seed": 0,
                     **score(real, fake, data, spaces, weights, gen_size(preset).frame_stride, device, f2d)})
    rows.append(reference_row(real, data, preset, spaces, weights, device, f2d))
    rows = pd.DataFrame(rows)
    rows = rows.assign(vae_run=np.where(rows.variant == "occsora", occsora.id, vae.id))
    table = summarize(rows, spaces)
    labels = {"occsora": "OccSora", "dynamiccity": "DynamicCity"}
    table = _beside(table, _paper("dynamiccity_t2_generation", "method", labels, spaces))
    card = generation_protocol(preset, data, spaces, weights, f2d, seed)
    return attach_protocol(card, rows, table)


def claims(table: pd.DataFrame, notebook: str, preset: str) -> list[dict]:
    """Verdicts of a notebook's claims from its summary table (FID spread: std over the sample seeds)."""
    from occlab.report.claims import evaluate_claims

    values = {}
    for _, r in table.iterrows():
        if not str(r.get("ours: seeds", 0)) or not r.get("ours: seeds"):
            continue
        v = {k.removeprefix("ours: "): r[k] for k in table.columns if k.startswith("ours: ")}
        v = {k: (None if isinstance(x, float) and np.isnan(x) else x) for k, x in v.items()}
        values[r["variant"]] = {**v, "seeds": int(v.get("seeds") or 0), "run_ids": v.get("run_ids") or ""}
    return evaluate_claims(notebook, values, preset)


def frames_figure(samples: dict[str, np.ndarray], out, frame: int = 0, per_row: int = 3, geometry: str = "carlasc"):
    """A grid: one row per generator, `per_row` samples at frame `frame`, rendered by occlab.render; a PNG."""
    from PIL import Image

    from occlab.render.scene import render_side_by_side
    from occlab.render.semantic import crop_geometry

    rows = []
    for name, labels in samples.items():
        geo = crop_geometry(geometry, tuple(labels.shape[2:]))  # the camera framed for the crop
        vols = [labels[i][min(frame, labels.shape[1] - 1)] for i in range(min(per_row, len(labels)))]
        rows.append(render_side_by_side(vols, [f"{name} #{i}" for i in range(len(vols))], geo,
                                        window_size=(360, 280)))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    image = np.concatenate(rows, axis=0)
    Image.fromarray(image).save(out)
    return image


__all__ = ["GenSize", "METRICS", "ROLLOUTS", "SIZES", "claims", "dit_checkpoint", "feature_weights", "frames_figure",
           "gen_size", "generation_protocol", "is_weights_2d", "methods", "metric_networks", "real_labels",
           "reference_row", "rollout_ablation", "sample_labels", "score", "summarize", "train_generator", "train_vae"]
