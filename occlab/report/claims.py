"""The claims ledger: the orderings the papers rest on, and whether they hold on the data at hand.

A claim compares variants by a metric in a direction. `verdict` says "yes" when our difference has the claimed
sign and exceeds the seed-to-seed spread, "no" when it has the other sign beyond the spread, and
"inconclusive" inside it; a smoke run's verdicts are marked "smoke", never evidence.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Claim:
    """One ordering: `better` beats `worse` in `metric` (higher is better unless `lower`)."""

    id: str
    paper: str  # "DynamicCity Tab. 3"
    statement: str
    metric: str
    better: str  # variant key in the notebook's table
    worse: str
    lower: bool = False
    notebook: str = ""
    paper_values: tuple[float, float] | None = None  # the paper's (better, worse)


CLAIMS: tuple[Claim, ...] = (
    Claim("dc-t3-proj-ess", "DynamicCity Tab. 3", "projection beats average pooling in mIoU (ESS decoder)", "miou",
          "projection/ess", "avgpool/ess", notebook="03_vae_structure", paper_values=(74.22, 68.02)),
    Claim("dc-t3-proj-query", "DynamicCity Tab. 3", "projection beats average pooling in mIoU (query decoder)",
          "miou", "projection/query", "avgpool/query", notebook="03_vae_structure", paper_values=(68.73, 60.97)),
    Claim("dc-t3-ess-faster-proj", "DynamicCity Tab. 3", "ESS is faster per iteration than query (projection)",
          "s_per_iter", "projection/ess", "projection/query", lower=True, notebook="03_vae_structure",
          paper_values=(0.205, 0.292)),
    Claim("dc-t3-ess-faster-avg", "DynamicCity Tab. 3", "ESS is faster per iteration than query (average pooling)",
          "s_per_iter", "avgpool/ess", "avgpool/query", lower=True, notebook="03_vae_structure",
          paper_values=(0.143, 0.236)),
    Claim("dc-t3-ess-lighter", "DynamicCity Tab. 3", "ESS takes less peak memory than query (projection)",
          "peak_mem_gib", "projection/ess", "projection/query", lower=True, notebook="03_vae_structure",
          paper_values=(5.92, 13.59)),
    Claim("dc-t3-ess-miou", "DynamicCity Tab. 3", "ESS beats query in mIoU (projection)", "miou",
          "projection/ess", "projection/query", notebook="03_vae_structure", paper_values=(74.22, 68.73)),
    Claim("dc-t4-miou-1-2", "DynamicCity Tab. 4", "mIoU falls from rates 1,1,1,1 to 1,2,2,1", "miou",
          "1,1,1,1", "1,2,2,1", notebook="04_downsampling", paper_values=(84.67, 76.05)),
    Claim("dc-t4-miou-2-3", "DynamicCity Tab. 4", "mIoU falls from rates 1,2,2,1 to 2,2,2,2", "miou",
          "1,2,2,1", "2,2,2,2", notebook="04_downsampling", paper_values=(76.05, 74.22)),
    Claim("dc-t4-miou-3-4", "DynamicCity Tab. 4", "mIoU falls from rates 2,2,2,2 to 2,4,4,2", "miou",
          "2,2,2,2", "2,4,4,2", notebook="04_downsampling", paper_values=(74.22, 65.15)),
    Claim("dc-t4-cr", "DynamicCity Tab. 4", "the compression ratio rises with the rates (2,4,4,2 vs 1,1,1,1)", "cr",
          "2,4,4,2", "1,1,1,1", notebook="04_downsampling", paper_values=(71.86, 5.78)),
    Claim("dc-t4-memory", "DynamicCity Tab. 4", "peak memory falls with the rates (2,4,4,2 vs 1,1,1,1)",
          "peak_mem_gib", "2,4,4,2", "1,1,1,1", lower=True, notebook="04_downsampling", paper_values=(4.00, 21.63)),
    # SEP-4D Tab. 1 (variants "method/frames"; the study preset's longest sequence is 16 frames)
    Claim("sep-t1-sep-dc", "SEP-4D Tab. 1", "SEP-4D beats DynamicCity in mIoU at 16 frames", "miou",
          "sep4d/16", "dynamiccity/16", notebook="01_reconstruction", paper_values=(76.41, 66.07)),
    Claim("sep-t1-dc-occsora", "SEP-4D Tab. 1", "DynamicCity beats OccSora in mIoU at 16 frames", "miou",
          "dynamiccity/16", "occsora/16", notebook="01_reconstruction", paper_values=(66.07, 33.40)),
    *(Claim(f"sep-t1-length-{m}", "SEP-4D Tab. 1", f"mIoU falls as the sequence grows from 4 to 16 frames ({name})",
            "miou", f"{m}/4", f"{m}/16", notebook="01_reconstruction", paper_values=values)
      for m, name, values in (("occsora", "OccSora", (41.01, 33.40)), ("dynamiccity", "DynamicCity", (76.25, 66.07)),
                              ("sep4d", "SEP-4D", (91.68, 76.41)))),
    # SEP-4D Tab. 3-4 (variants "encoder/fusion")
    Claim("sep-t3-sep-avg", "SEP-4D Tab. 3", "SEP fusion beats averaging in mIoU", "miou", "planar/sep",
          "planar/average", notebook="06_fusion_ablation", paper_values=(76.41, 75.39)),
    Claim("sep-t3-avg-concat", "SEP-4D Tab. 3", "averaging beats concatenation in mIoU", "miou", "planar/average",
          "planar/concat", notebook="06_fusion_ablation", paper_values=(75.39, 63.71)),
    Claim("sep-t3-conv-concat", "SEP-4D Tab. 3", "concatenation is the worst fusion: below conv fusion", "miou",
          "planar/conv", "planar/concat", notebook="06_fusion_ablation", paper_values=(74.78, 63.71)),
    Claim("sep-t3-dynamic-concat", "SEP-4D Tab. 3", "concatenation is the worst fusion: below dynamic weighting",
          "miou", "planar/dynamic", "planar/concat", notebook="06_fusion_ablation", paper_values=(75.61, 63.71)),
    Claim("sep-t4-planar", "SEP-4D Tab. 4", "planar factorization beats the 3D conv + SE encoder in mIoU", "miou",
          "planar/sep", "conv3d_se/sep", notebook="06_fusion_ablation", paper_values=(76.41, 46.74)),
    # DynamicCity Tab. 5 and Tab. 2 (helper h1: variants are rollouts / generators; 3D FID on CarlaSC)
    Claim("dc-t5-pro-vconcat", "DynamicCity Tab. 5", "padded rollout has lower 3D FID than vertical concatenation",
          "fid_3d", "pro", "vconcat", lower=True, notebook="05_rollout_ablation", paper_values=(354.2, 623.2)),
    Claim("dc-t5-vconcat-unfold", "DynamicCity Tab. 5", "vertical concatenation has lower 3D FID than direct unfold",
          "fid_3d", "vconcat", "unfold", lower=True, notebook="05_rollout_ablation", paper_values=(623.2, 9110)),
    Claim("dc-t2-dc-occsora", "DynamicCity Tab. 2", "DynamicCity has lower 3D FID than OccSora", "fid_3d",
          "dynamiccity", "occsora", lower=True, notebook="02_generation", paper_values=(354.2, 1559)),
    # X-Scene Tab. 6 (helper h3, notebook 07): "gain/<res>" = mIoU(deformable) - mIoU(bilinear) at a triplane
    # resolution; "rise/<variant>" = 3D FID of the variant - 3D FID of the full model (occlab.studies.triplane)
    Claim("xs-t6-deform-gain-low", "X-Scene Tab. 6",
          "deformable attention gains more mIoU at the lower triplane resolution than at the higher one",
          "miou_gain", "gain/low", "gain/high", notebook="07_triplane_ablation",
          paper_values=(round(76.6 - 74.2, 2), round(92.4 - 91.8, 2))),
    Claim("xs-t6-resolution", "X-Scene Tab. 6", "the higher triplane resolution gives the higher mIoU", "miou",
          "deformable/high", "deformable/low", notebook="07_triplane_ablation", paper_values=(92.4, 76.6)),
    Claim("xs-t6-layout-vs-boxes", "X-Scene Tab. 6",
          "dropping the layout condition raises 3D FID far more than dropping the boxes", "fid_rise",
          "rise/without_layout", "rise/without_boxes", notebook="07_triplane_ablation",
          paper_values=(round(1584 - 258.8, 1), round(271.4 - 258.8, 1))),
)


TOLERANCE = {"miou": 0.01, "iou": 0.01}  # absolute: a point of mIoU; time and memory: RELATIVE_TOLERANCE
RELATIVE_TOLERANCE = 0.02


def verdict(better: float, worse: float, spread: float, lower: bool = False, smoke: bool = False) -> tuple[str, float]:
    """("yes" | "no" | "inconclusive" | "smoke", signed margin in the claimed direction)."""
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (better, worse)):
        return "inconclusive", float("nan")
    margin = (worse - better) if lower else (better - worse)
    if smoke:
        return "smoke", margin
    if abs(margin) <= spread:
        return "inconclusive", margin
    return ("yes" if margin > 0 else "no"), margin


def evaluate_claims(notebook: str, values: dict[str, dict], preset: str, floor: dict | None = None) -> list[dict]:
    """Verdicts of a notebook's claims from {variant: {metric: mean, metric + "_std": spread, seeds, run_ids}}.

    The spread is the larger seed-to-seed std, but at least a point of mIoU/IoU or 2% of a time or memory.
    `floor` ({metric: value}, e.g. the mean-scene baseline's mIoU, or {variant: {metric: value}} where each
    variant has its own baseline, as sequences of different lengths do): when neither variant beats its floor, the
    models have not learned beyond the trivial answer and the claim is inconclusive whatever the margin.
    """
    per_variant = bool(floor) and all(isinstance(v, dict) for v in floor.values())

    def floor_of(variant: str, metric: str) -> float | None:
        f = (floor or {}).get(variant, {}) if per_variant else (floor or {})
        return f.get(metric)

    out = []
    for c in (c for c in CLAIMS if c.notebook == notebook):
        a, b = values.get(c.better, {}), values.get(c.worse, {})
        va, vb = a.get(c.metric), b.get(c.metric)
        tol = TOLERANCE.get(c.metric, RELATIVE_TOLERANCE * max(abs(va or 0), abs(vb or 0)) if c.metric != "cr" else 0)
        spread = max(a.get(f"{c.metric}_std", 0.0) or 0.0, b.get(f"{c.metric}_std", 0.0) or 0.0, tol)
        holds, margin = verdict(va, vb, spread, c.lower, smoke=preset == "smoke")
        note = "" if c.better in values and c.worse in values else "not run at this preset"
        if note and preset == "smoke":
            holds = "smoke"
        fa, fb = floor_of(c.better, c.metric), floor_of(c.worse, c.metric)
        if None not in (va, vb, fa, fb) and va <= fa + tol and vb <= fb + tol:
            holds, note = ("smoke" if holds == "smoke" else "inconclusive"), "neither beats the mean-scene baseline"
        out.append({"id": c.id, "statement": c.statement, "paper": c.paper, "metric": c.metric,
                    "paper_values": c.paper_values, "ours": [va, vb], "holds": holds, "margin": margin,
                    "spread": spread, "note": note, "seeds": min(a.get("seeds", 0), b.get("seeds", 0)),
                    "run_ids": f"{a.get('run_ids', '')} {b.get('run_ids', '')}".split(), "preset": preset})
    return out


def write_claims(out_dir: str | Path, claims: list[dict]) -> Path:
    """claims.json in a notebook's output folder (NaN written as null)."""
    path = Path(out_dir) / "claims.json"
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in c.items()} for c in claims]
    path.write_text(json.dumps(clean, indent=2))
    return path


def ledger(report_dir: str | Path) -> dict:
    """Every claim with the verdict its notebook wrote under `report_dir` ("not run" where there is none).

    {"claims": [...], "held": N, "failed": N, "inconclusive": N, "smoke": N, "not_run": N, "preset": ...}
    """
    report = Path(report_dir)
    written: dict[str, dict] = {}
    for c in {c.notebook for c in CLAIMS}:
        path = report / c / "claims.json"
        if path.is_file():
            written.update({v["id"]: {**v, "notebook": c} for v in json.loads(path.read_text())})
    rows = [written.get(c.id) or {"id": c.id, "statement": c.statement, "paper": c.paper, "metric": c.metric,
                                  "paper_values": c.paper_values, "ours": None, "holds": "not run", "margin": None,
                                  "spread": None, "note": "", "seeds": 0, "run_ids": [], "notebook": c.notebook}
            for c in CLAIMS]
    count = {h: sum(r["holds"] == h for r in rows) for h in ("yes", "no", "inconclusive", "smoke", "not run")}
    presets = sorted({r["preset"] for r in rows if r.get("preset")})
    index = report / "index.json"
    preset = json.loads(index.read_text()).get("preset") if index.is_file() else ", ".join(presets) or None
    return {"claims": rows, "held": count["yes"], "failed": count["no"], "inconclusive": count["inconclusive"],
            "smoke": count["smoke"], "not_run": count["not run"], "preset": preset}


__all__ = ["CLAIMS", "Claim", "asdict", "evaluate_claims", "ledger", "verdict", "write_claims"]
