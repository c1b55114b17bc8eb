"""Metrics: reconstruction (IoU, mIoU, compression ratio, mean-scene baseline) and training cost.

Imports no trainer, model or report code (DESIGN.md §7); generation metrics load their heavy deps lazily.
"""
from __future__ import annotations

from occlab.metrics.cost import CostMeter
from occlab.metrics.recon import (ConfusionMatrix, ReconMetrics, compression_ratio, eval_recon_files,
                                  mean_scene_baseline, metrics_from_confusion, recon_metrics)

_GENERATION = ("generation_metrics", "eval_gen_dirs", "extract_features", "metrics_from_features")

__all__ = ["ConfusionMatrix", "CostMeter", "ReconMetrics", "compression_ratio", "eval_recon_files",
           "mean_scene_baseline", "metrics_from_confusion", "recon_metrics", *_GENERATION]


def __getattr__(name: str):
    """Generation metrics load on first use (they bring torch-fidelity and spconv along)."""
    if name in _GENERATION:
        from occlab.metrics import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'occlab.metrics' has no attribute {name!r}")
