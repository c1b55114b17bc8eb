"""Checkpoints written atomically and read with `weights_only=True`; RNG state for exact resumption."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from occlab.errors import OcclabError


def rng_state() -> dict:
    """Every torch random state the training step draws from (dropout, latent sampling)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (tensors and plain Python containers only)."""
    path = Path(path)
    if not path.is_file():
        raise OcclabError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise OcclabError(f"{path}: not a readable occlab checkpoint ({type(e).__name__}: {e})") from None
