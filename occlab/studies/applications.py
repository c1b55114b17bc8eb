"""Applications of the HexPlane DiT behind notebook 08 (DynamicCity §4.3, Fig. 1 and 6-8): command-, trajectory-
and layout-conditioned samples, inpainting, outpainting and long sequences, and whether the samples follow
their conditions.

One DiT takes all four conditions (command, trajectory, layout, previous HexPlane), each dropped with p = 0.1
in training, trained on the latents of the DynamicCity VAE of the preset (run cache of occlab.train.runs for
the VAE, the DiT run key for the DiT). Its windows come from town scenes `SCENE_WINDOWS` windows long (the
VAE's own scenes are one window long), so that most windows have a previous window and many see the ego
mid-turn.

Does a sample follow its command? `occlab.metrics.ego_motion` estimates the ego motion the generated 3D scene
implies (registration of the static world frame to frame) and reads it as a command with two thresholds
fitted on train windows of known command. The same measure on real validation windows says how far the
measure itself can be trusted (its ceiling: the same rule on the windows' true poses).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from occlab.errors import OcclabError
from occlab.metrics import ego_motion as E

CONDITIONS = ("command", "trajectory", "layout", "previous")
SCENE_WINDOWS = 3  # scenes of 3 VAE windows: windows start every `stride` frames


@dataclass(frozen=True)
class AppSize:
    """What a preset scales in notebook 08."""

    per_command: int  # generated samples per command
    windows: int  # real windows for the trajectory / layout conditions and the measure's check
    steps: int  # DDIM steps
    long_windows: int  # length of the long sequence, in VAE windows
    stride: int  # window stride of the DiT's training windows, in frames (of T)
    note: str = ""


SIZES = {
    "smoke": AppSize(2, 4, 5, 3, 4, note="plumbing only: the smoke VAE and a 20-step DiT; numbers mean nothing"),
    "study": AppSize(16, 24, 25, 8, 2,
                     note="the study VAE (32x32x8 crop, 8 frames, half widths), DiT-small (4.2 M) 1000 steps on "
                          "windows of 24-frame scenes, 25 DDIM steps, 16 samples per command"),
    "paper": AppSize(64, 128, 50, 8, 1, note="released sizes (CarlaSC 128x128x8, 16 frames), 64 samples a command"),
}


def app_size(preset: str) -> AppSize:
    if preset not in SIZES:
        raise OcclabError(f"unknown preset {preset!r}; expected one of {', '.join(SIZES)}")
    return SIZES[preset]


# ---------------------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------------------

def train_models(preset: str, dataset: str = "synthetic_town", data_root: str | None = None, device: str = "cpu",
                 seed: int = 0, progress: bool = True) -> dict:
    """The preset's DynamicCity VAE (run cache) and a DiT with all four conditions on its latents (cached by
    its run key): {vae_ckpt, dit_ckpt, vae_run, dit_run, dit_metrics, data}."""
    from occlab.studies.vae import vae_setup
    from occlab.train.dit_trainer import dit_setup, run_key, train_dit
    from occlab.train.latents import read_vae_checkpoint
    from occlab.train.runs import runs_dir, train_or_load

    config, data, train = vae_setup("dynamiccity", preset, dataset, data_root, device, seed)
    vae = train_or_load("dynamiccity", config, data, train, progress=progress)
    vae_ckpt = vae.path / "checkpoint.pt"
    dit, cfg = dit_setup(vae_ckpt, preset, "pro", CONDITIONS, device, seed)
    if device == "cpu":
        cfg.threads = 1  # measured: 2 threads on 2 shared cores thrash (1.7 s a step against 0.2 s alone)
    if dataset == "synthetic_town":
        cfg.data_options = {"seq_len": SCENE_WINDOWS * data.frames, "stride": app_size(preset).stride}
    key = run_key(dit, cfg, read_vae_checkpoint(vae_ckpt)["fingerprint"])
    result = train_dit(vae_ckpt, runs_dir() / key, dit, cfg, progress=progress)
    return {"vae_ckpt": vae_ckpt, "dit_ckpt": result.checkpoint, "vae_run": vae.id, "dit_run": key,
            "dit_metrics": result.metrics, "data": data, "seed": seed}


def protocol(preset: str, models: dict, conditions: str, ground_truth_in_sampling: str = "never",
             **fields) -> dict:
    """The protocol card of a notebook-08 table: the generation card of the preset's windows, with this notebook's
    split, samples, closed-form measures and its two runs."""
    from occlab.studies.generation import generation_protocol

    size = app_size(preset)
    card = generation_protocol(
        preset, models["data"], (), conditions=conditions, ground_truth_in_sampling=ground_truth_in_sampling,
        split="val windows (conditions, the measure's check); train windows fit the command rule",
        seeds=f"DiT and sample seed {models.get('seed', 0)}",
        samples=f"{size.per_command} per command, {size.windows} val windows; DDIM {size.steps} steps")
    return {**card, "metric_network": "none: measures are computed in closed form (occlab.metrics.ego_motion, "
            "label agreement), no learned network", "runs": [models["vae_run"], models["dit_run"]], **fields}


def real_windows(data, split: str, n: int, stride: int | None = None) -> list:
    """Up to n windows (Sequences) of a split at the VAE's crop and frames, from scenes of SCENE_WINDOWS windows
    (so that they include turns in progress), evenly spread over the split."""
    from occlab.data import make_dataset

    opts = data.source_options(split)
    if data.dataset == "synthetic_town":
        scenes = max(1, -(-n // SCENE_WINDOWS))
        opts.update(seq_len=SCENE_WINDOWS * data.frames, num_sequences=scenes, stride=stride or data.frames)
    ds = make_dataset(data.dataset, data.data_root, split, **opts)
    pick = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
    return [ds.window(int(i)) for i in pick]


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(gen: dict, n: int, cond: dict | None, steps: int, seed: int = 0, guidance: float = 1.0) -> np.ndarray:
    """n decoded samples (n, T, X, Y, Z) uint8 with user conditions (occlab.generate.prepare_conditions)."""
    from occlab.generate import decode_maps, prepare_conditions, sample_latents

    dit_cond = prepare_conditions(cond, n, gen["model"], gen["vae"], gen["stats"], gen["geo"])
    maps = sample_latents(gen["model"], gen["diffusion"], n, steps=steps, cond=dit_cond, seed=seed,
                          guidance=guidance, device=gen["device"])
    return decode_maps(gen, maps)


def command_samples(gen: dict, per_command: int, steps: int, seed: int = 0, guidance: float = 1.0) -> list[dict]:
    """per_command samples of every command, the command alone given: [{command, labels}]."""
    out = []
    for c, name in enumerate(E.COMMANDS):
        labels = sample(gen, per_command, {"command": [c] * per_command}, steps, seed + 101 * c, guidance)
        out += [{"command": c, "labels": lab} for lab in labels]
    return out


# ---------------------------------------------------------------------------------------------------------
# Does a sample follow its command?
# ---------------------------------------------------------------------------------------------------------

def voxel_xy(data) -> tuple[float, float]:
    from occlab.data import get_geometry

    v = get_geometry(data.geometry).voxel_size if data.dataset == "synthetic_town" else (0.4, 0.4, 0.4)
    return float(v[0]), float(v[1])


def fit_rule(windows: list, voxel=(0.4, 0.4)) -> tuple[E.CommandRule, pd.DataFrame]:
    """The command rule fitted on the estimated motion of windows of known command, and their rows."""
    rows = [{"command": w.command, **E.motion_summary(E.estimate_trajectory(w.labels, voxel)),
             **{f"true_{k}": v for k, v in E.motion_summary(w.trajectory).items()}} for w in windows]
    df = pd.DataFrame(rows)
    return E.fit_command_rule(df[["path_m", "yaw_deg"]].to_dict("records"), df["command"].tolist()), df


def motion_rows(source: str, items: list[dict], rule: E.CommandRule, voxel=(0.4, 0.4)) -> pd.DataFrame:
    """One row per sequence: the requested command, the implied motion and command."""
    rows = []
    for it in items:
        s = E.motion_summary(E.estimate_trajectory(it["labels"], voxel))
        rows.append({"source": source, "command": E.COMMANDS[it["command"]], **s,
                     "implied": E.COMMANDS[rule.classify(s)]})
    return pd.DataFrame(rows)


def pose_rows(windows: list, rule: E.CommandRule) -> pd.DataFrame:
    """The rule applied to the windows' true poses: the ceiling of what the motion says about the command."""
    rows = []
    for w in windows:
        s = E.motion_summary(w.trajectory)
        rows.append({"source": "real windows, true poses", "command": E.COMMANDS[w.command], **s,
                     "implied": E.COMMANDS[rule.classify(s)]})
    return pd.DataFrame(rows)


def agreement_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per source and requested command: n, mean path and heading change, agreement with the implied command;
    plus a row per source with the balanced accuracy over the commands present."""
    out = []
    for source, df in rows.groupby("source", sort=False):
        for cmd in E.COMMANDS:
            d = df[df.command == cmd]
            if len(d):
                out.append({"source": source, "command": cmd, "n": len(d), "path_m": d.path_m.mean(),
                            "yaw_deg": d.yaw_deg.mean(), "agreement": float((d.implied == cmd).mean())})
        acc = E.balanced_accuracy([E.COMMANDS.index(c) for c in df.command], [E.COMMANDS.index(c) for c in df.implied])
        present = df.command.nunique()
        out.append({"source": source, "command": "all (balanced)", "n": len(df), "path_m": df.path_m.mean(),
                    "yaw_deg": df.yaw_deg.mean(), "agreement": acc, "chance": 1 / present})
    return pd.DataFrame(out)


def confusion_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Requested (rows) x implied (columns) counts per source."""
    frames = []
    for source, df in rows.groupby("source", sort=False):
        m = E.confusion([E.COMMANDS.index(c) for c in df.command], [E.COMMANDS.index(c) for c in df.implied])
        f = pd.DataFrame(m, columns=[f"implied {c}" for c in E.COMMANDS])
        f.insert(0, "requested", E.COMMANDS)
        f.insert(0, "source", source)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------------------
# Trajectory and layout conditions
# ---------------------------------------------------------------------------------------------------------

def trajectory_table(gen: dict, windows: list, steps: int, seed: int = 0, voxel=(0.4, 0.4)) -> pd.DataFrame:
    """Samples conditioned on real windows' trajectories: requested vs implied path and heading change, beside
    unconditional samples (the same noise) as the reference."""
    traj = np.stack([w.trajectory for w in windows])
    cond = sample(gen, len(windows), {"trajectory": traj}, steps, seed)
    free = sample(gen, len(windows), None, steps, seed)
    rows = []
    for w, c, f in zip(windows, cond, free):
        req = E.motion_summary(w.trajectory)
        got, ref = (E.motion_summary(E.estimate_trajectory(x, voxel)) for x in (c, f))
        rows.append({"requested_path_m": req["path_m"], "requested_yaw_deg": req["yaw_deg"],
                     "conditioned_path_m": got["path_m"], "conditioned_yaw_deg": got["yaw_deg"],
                     "unconditional_path_m": ref["path_m"], "unconditional_yaw_deg": ref["yaw_deg"]})
    return pd.DataFrame(rows)


def trajectory_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean absolute error of path and heading change to the requested ones, conditioned vs unconditional."""
    out = []
    for kind in ("conditioned", "unconditional"):
        out.append({"samples": kind, "n": len(df),
                    "path_err_m": float((df[f"{kind}_path_m"] - df.requested_path_m).abs().mean()),
                    "yaw_err_deg": float((df[f"{kind}_yaw_deg"] - df.requested_yaw_deg).abs().mean()),
                    "path_corr": _corr(df[f"{kind}_path_m"], df.requested_path_m),
                    "yaw_corr": _corr(df[f"{kind}_yaw_deg"], df.requested_yaw_deg)})
    return pd.DataFrame(out)


def _corr(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")


def layout_samples(gen: dict, windows: list, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(conditioned, unconditional) samples (n, T, X, Y, Z) for the BEV layouts of real windows."""
    lay = np.stack([w.layout for w in windows])
    return sample(gen, len(windows), {"layout": lay}, steps, seed), sample(gen, len(windows), None, steps, seed)


def layout_table(windows: list, conditioned: np.ndarray, unconditional: np.ndarray) -> pd.DataFrame:
    """How often the generated BEV (top class of every column, every frame) equals the requested layout, per
    class family, conditioned vs unconditional samples of the same noise."""
    from occlab.data.sequence import bev_layout

    req = np.stack([w.layout for w in windows])  # (n, T, X, Y)
    rows = []
    for kind, samples in (("conditioned", conditioned), ("unconditional", unconditional)):
        got = bev_layout(samples)
        occupied = req > 0
        rows.append({"samples": kind, "n": len(samples), "bev_accuracy": float((got == req)[occupied].mean()),
                     "road_iou": _iou(got == 6, req == 6), "building_iou": _iou(got == 1, req == 1),
                     "vegetation_iou": _iou(got == 9, req == 9), "sidewalk_iou": _iou(got == 8, req == 8)})
    return pd.DataFrame(rows)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Long sequences
# ---------------------------------------------------------------------------------------------------------

def seam_table(labels: np.ndarray, window: int) -> pd.DataFrame:
    """Agreement of consecutive frames (fraction of occupied voxels of either frame with the same class) inside
    the chunks and across their seams: a long sequence that hangs together changes no more at a seam."""
    agree = []
    for t in range(1, len(labels)):
        a, b = labels[t - 1], labels[t]
        occ = (a > 0) | (b > 0)
        agree.append((t % window == 0, float((a == b)[occ].mean()) if occ.any() else float("nan")))
    df = pd.DataFrame(agree, columns=["seam", "agreement"])
    return df.groupby("seam").agreement.agg(["count", "mean"]).reset_index().assign(
        pair=lambda d: d.seam.map({True: "across a seam", False: "inside a chunk"}))[["pair", "count", "mean"]]


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------

def bev_grid(rows: list[tuple[str, list[np.ndarray]]], titles: list[str], out, frame: int = 0):
    """A matplotlib grid of BEV images: one row per (name, [labels (T, X, Y, Z)]), one column per title."""
    import matplotlib.pyplot as plt

    from occlab.render.bev import bev_image

    n_rows, n_cols = len(rows), max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.3 * n_rows), squeeze=False)
    for i, (name, items) in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(items):
                lab = np.asarray(items[j])
                ax.imshow(bev_image(lab[min(frame, len(lab) - 1)] if lab.ndim == 4 else lab))
                ax.set_title(f"{name}\n{titles[j]}" if j == 0 else titles[j], fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def save_json(obj, path) -> Path:
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
    return Path(path)


__all__ = ["CONDITIONS", "SIZES", "AppSize", "agreement_table", "app_size", "bev_grid", "command_samples",
           "confusion_frame", "fit_rule", "layout_samples", "layout_table", "motion_rows", "pose_rows",
           "real_windows", "sample", "seam_table", "train_models", "trajectory_summary", "trajectory_table",
           "voxel_xy"]
