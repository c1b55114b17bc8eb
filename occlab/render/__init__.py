"""Rendering: PyVista voxel scenes (`occlab.render.scene`) and matplotlib BEV plots (`occlab.render.bev`).

Importing this package is cheap: PyVista and matplotlib load on first use of a name below.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "voxel_mesh": "scene", "plot_frame": "scene", "render_frame": "scene", "render_sequence": "scene",
    "show": "scene", "view_file": "scene", "CAMERAS": "scene",
    "bev_image": "bev", "plot_bev": "bev", "plot_class_stats": "bev", "class_counts": "bev",
    "render_side_by_side": "scene", "render_views": "semantic", "perspective": "semantic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Load the submodule that defines `name` on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
