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
    """Restore `rng_state()`; the states may have been loaded onto a GPU (map_location), torch wants them on CPU."""
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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


def save_network(kind: str, version: int | str, model: torch.nn.Module, path: str | os.PathLike,
                 meta: dict | None = None) -> Path:
    """A small network's checkpoint (kind, version, its `config` dict, weights, meta), written atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_atomic({"kind": kind, "version": version, "config": model.config, "state_dict": state,
                        "meta": meta or {}}, path)


def load_network(kind: str, path: str | os.PathLike) -> dict:
    """A checkpoint written by save_network, checked to be of `kind`."""
    ckpt = load(path)
    if ckpt.get("kind") != kind:
        raise OcclabError(f"{path}: not an occlab {kind} checkpoint (kind {ckpt.get('kind')!r})")
    return ckpt
