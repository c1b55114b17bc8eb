#!/usr/bin/env bash
# Copies the pure-Python packages that `occlab bench` needs besides torch and numpy (einops, tqdm) from .venv
# into .gpu_deps/ (git-ignored), for a device machine whose image has torch but not the kit's other
# dependencies: carry .gpu_deps there and run with PYTHONPATH=.gpu_deps (see benchmarks/gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c "import einops, os; print(os.path.dirname(os.path.dirname(einops.__file__)))")
rm -rf .gpu_deps && mkdir -p .gpu_deps
cp -r "$site/einops" "$site/tqdm" .gpu_deps/
du -sh .gpu_deps
