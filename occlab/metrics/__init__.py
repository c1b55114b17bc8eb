"""Metrics: reconstruction (IoU, mIoU, compression ratio, mean-scene baseline) and training cost.

Imports no trainer, model or report code (DESIGN.md §7); generation metrics load their heavy deps lazily.
"""
from __future__ import annotations

from occlab.metrics.cost import CostMeter
from occlab.metrics.recon import (ConfusionMatrix, ReconMetrics, compression_ratio, eval_recon_files,
                                  mean_scene_baseline, metrics_from_confusion, recon_metrics)

__all__ = ["ConfusionMatrix", "CostMeter", "ReconMetrics", "compression_ratio", "eval_recon_files",
           "mean_scene_baseline", "metrics_from_confusion", "recon_metrics"]
