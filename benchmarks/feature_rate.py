"""Feature-extraction rate (samples/s) of the generation-metric extractors, printed as JSON.

3D: occlab-f3d (an untrained network of the recipe's shape) on synthetic-town frames. 2D: the semantic renders
alone (BEV + front + rear), InceptionV3 pool3 on those renders (one sample = 3 images; needs fid-helper-
pytorch or $OCCLAB_INCEPTION) and the small occlab-f2d CNN. Every extractor runs through torch-fidelity's
own loop, as generation_metrics does. CPU always; CUDA too when available.

    .venv/bin/python benchmarks/feature_rate.py [--samples 64] [--crop 128 128 8] [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def town_frames(n: int, crop: tuple[int, int, int]) -> torch.Tensor:
    """n single frames of the synthetic town (frames 0, 4, 8, 12 of n / 4 sequences), cropped."""
    from occlab.data.town import generate_sequence

    seqs = [generate_sequence(s, "carlasc", 16) for s in range((n + 3) // 4)]
    frames = np.concatenate([(s.crop(crop) if crop != s.labels.shape[1:] else s).labels[::4] for s in seqs])
    return torch.from_numpy(frames[:n])


def rate(fn, n: int, device: str, repeat: int = 2) -> float:
    """Best samples/s of `repeat` timed runs after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return n / best


def bench(device: str, frames: torch.Tensor, batch: int, tmp: Path, with_inception: bool = False) -> dict:
    """samples/s of each extractor on one device."""
    from occlab.metrics.features2d import F2DNet, save_f2d
    from occlab.metrics.features3d import F3DNet, save_f3d
    from occlab.metrics.generation import LabelSamples, RenderedViews, extract_features
    from occlab.render.semantic import VIEWS, render_views

    n, grid = len(frames), tuple(frames.shape[1:])
    torch.manual_seed(0)
    f3d = save_f3d(F3DNet(grid).eval(), tmp / "f3d.pt")
    f2d = save_f2d(F2DNet().eval(), tmp / "f2d.pt")
    samples = LabelSamples(frames, 1)
    out = {"f3d": rate(lambda: extract_features(samples, "3d", weights=f3d, device=device, batch_size=batch), n,
                       device)}
    lab = frames.to(device)
    out["render_bev_front_rear"] = rate(lambda: [render_views(lab[s:s + batch], VIEWS, 128)
                                                 for s in range(0, n, batch)], n, device)
    views = RenderedViews(samples, VIEWS, 128, device=device)
    views[0]
    out["f2d_with_render"] = rate(lambda: extract_features(RenderedViews(samples, VIEWS, 128, device=device), "2d",
                                                           extractor="f2d", weights=f2d, device=device,
                                                           batch_size=batch), n, device, 1)
    if with_inception:
        out["inception_with_render"] = inception_rate(device, frames, batch)
    return {k: round(v, 2) for k, v in out.items()}


def inception_rate(device: str, frames: torch.Tensor, batch: int) -> float:
    """samples/s of InceptionV3 pool3 on the 3 views of each frame (renders included)."""
    from occlab.metrics.generation import LabelSamples, RenderedViews, extract_features
    from occlab.render.semantic import VIEWS

    samples = LabelSamples(frames, 1)
    return round(rate(lambda: extract_features(RenderedViews(samples, VIEWS, 128, device=device), "2d",
                                               device=device, batch_size=batch), len(frames), device, 1), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--crop", type=int, nargs=3, default=(128, 128, 8))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cpu-inception-samples", type=int, default=8, help="InceptionV3 on CPU is slow: fewer samples")
    args = p.parse_args()
    from occlab.errors import OcclabError
    from occlab.metrics.features2d import inception_path

    try:
        inception = str(inception_path())
    except OcclabError:
        inception = None
    frames = town_frames(args.samples, tuple(args.crop))
    result = {"unit": "samples/s (one sample = one frame; 2D = its 3 views)", "grid": list(frames.shape[1:]),
              "samples": len(frames), "batch": args.batch, "threads": torch.get_num_threads(),
              "torch": str(torch.__version__), "cpu": platform.processor() or platform.machine(),
              "inception_file": inception}
    with tempfile.TemporaryDirectory() as tmp:
        result["cpu_rates"] = bench("cpu", frames, args.batch, Path(tmp))
        if inception and args.cpu_inception_samples > 0:
            small = frames[: args.cpu_inception_samples]
            result["cpu_rates"]["inception_with_render"] = inception_rate("cpu", small, args.batch)
        if torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name()
            result["cuda_rates"] = bench("cuda", frames, args.batch, Path(tmp), inception is not None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
