"""Frames per second of the procedural town, labels and visibility mask included, on one core.

    .venv/bin/python benchmarks/town_fps.py [--geometry carlasc occ3d] [--frames 16 64] [--seeds 4]

Prints one JSON line per (geometry, frames): median over seeds of frames/s for whole sequences, and the
share of time spent per frame (rendering + mask) versus per sequence (plan, routes, traffic).
"""
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from occlab.data import get_geometry  # noqa: E402
from occlab.data.town import generate_sequence  # noqa: E402
from occlab.data.town.raycast import visibility  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--geometry", nargs="+", default=["carlasc", "occ3d"])
    p.add_argument("--frames", nargs="+", type=int, default=[16, 64])
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    for geometry in args.geometry:
        generate_sequence(0, geometry, 2)  # warm the geometry tables
        geo = get_geometry(geometry)
        for frames in args.frames:
            rates, mask_ms = [], []
            for seed in range(1, args.seeds + 1):
                t0 = time.perf_counter()
                seq = generate_sequence(seed, geometry, frames)
                rates.append(frames / (time.perf_counter() - t0))
                t1 = time.perf_counter()
                for t in range(frames):
                    visibility(seq.labels[t], geo)
                mask_ms.append((time.perf_counter() - t1) / frames * 1e3)
            print(json.dumps({"geometry": geometry, "frames": frames, "seeds": args.seeds,
                              "fps_median": round(float(np.median(rates)), 1), "fps_min": round(min(rates), 1),
                              "fps_max": round(max(rates), 1), "mask_ms_per_frame": round(float(np.median(mask_ms)), 2)}))


if __name__ == "__main__":
    main()
