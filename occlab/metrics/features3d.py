"""The 3D feature network of the generation metrics: a sparse-convolution (spconv) occupancy autoencoder.

Protocol (DESIGN.md §4; the papers never released their 3D metric network, so the kit defines one):
- Input: one frame of labels (X,Y,Z); free (0) and ignored (255) voxels are empty, every other voxel is an
  active site whose feature is a learned embedding of its class (16) and its position in the grid (x, y, z
  scaled to [-1, 1]), so that the pooled features see where things are relative to the ego.
- Encoder: a 2x2x2 stride-2 SparseConv3d then a SubMConv3d 3x3x3 block, three times (widths 32, 64, 128;
  an axis already of size 1 is not strided), BatchNorm + ReLU. Bottleneck: the mean over the active sites of
  each xy quadrant of the grid (front-left, front-right, rear-left, rear-right of the ego) and the max over
  all of them, 5 x 128 floats, then Linear(640 -> 256): these 256 floats are the features of FID, KID and
  precision/recall ("features"). The quadrants keep the layout around the ego visible (a shifted scene is
  not the same scene).
- Head: Linear(256 -> A) on the features gives the logits of the Inception Score ("logits"), trained on a
  scene attribute of the dataset (occlab.train.features: traffic density, 3 classes, for the synthetic town
  and CarlaSC), by default as a linear probe on the detached features (`probe=True`).
- Decoder (a training aid only): Linear to a 32-channel grid at 1/16 of X and Y, trilinear upsampling to 1/4
  of the grid, two 3D convolutions to class logits; trained with a soft cross-entropy against the class
  fractions of each 4x4x4 block (the per-block histogram).
- Checkpoints are cached per dataset, geometry and grid under $OCCLAB_CACHE/metrics/f3d-<dataset>-v1/
  (default ~/.cache/occlab); the network is registered with torch-fidelity as feature extractor "occlab-f3d"
  (its weights path is the checkpoint file).

spconv from PyPI as `spconv` is a CPU-only build; CUDA needs `spconv-cu126` (or another -cuXXX build) in its
place; without it the 3D network runs on the CPU (`sparse_device`), which is fast enough for the metrics.
spconv on CPU (DESIGN.md §5): its stream getter calls CUDA, so it is patched to return 0 when CUDA is not
available, and its CPU kernels race with more than one thread (silently wrong sums), so every sparse forward
and backward on CPU runs under `single_thread()`. Its kernels also read the index tensor's raw memory:
`torch.nonzero` returns column-major strides, so indices are made contiguous (otherwise the results are wrong).
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from occlab.classes import FREE, IGNORE
from occlab.errors import OcclabError

VERSION = 1
NAME = "occlab-f3d"
WIDTHS = (32, 64, 128)
EMBED = 16
FEATURES = 256
POOL = (2, 2)  # the bottleneck averages each xy quadrant of the grid separately


def cache_root() -> Path:
    """$OCCLAB_CACHE/metrics (default ~/.cache/occlab/metrics): where metric networks are cached."""
    return Path(os.environ.get("OCCLAB_CACHE", Path.home() / ".cache" / "occlab")) / "metrics"


def checkpoint_path(kind: str, dataset: str, geometry: str, grid: tuple[int, int, int]) -> Path:
    """Cache location of a metric network: <cache>/<kind>-<dataset>-v1/<geometry>-<X>x<Y>x<Z>.pt."""
    return cache_root() / f"{kind}-{dataset}-v{VERSION}" / f"{geometry}-{'x'.join(map(str, grid))}.pt"


def patch_spconv() -> None:
    """Make spconv's stream getter return 0 without CUDA (its CPU backward otherwise fails); idempotent."""
    from spconv.pytorch import cppcore, ops

    if getattr(ops, "_occlab_patched", False):
        return
    real = cppcore.get_current_stream

    def stream() -> int:
        return real() if torch.cuda.is_available() else 0

    for mod in (ops, cppcore):
        mod.get_current_stream = stream
    for name in ("spconv.pytorch.hash", "spconv.pytorch.utils"):
        mod = __import__(name, fromlist=["get_current_stream"])
        if hasattr(mod, "get_current_stream"):
            mod.get_current_stream = stream
    ops._occlab_patched = True


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block on n CPU threads and restore the thread count after it (None: leave threads alone)."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread(device: torch.device | str = "cpu", enabled: bool = True):
    """Run CPU sparse convolutions (forward and backward) on one thread; restores the thread count."""
    return num_threads(1 if enabled and torch.device(device).type == "cpu" else None)


def sparse_device(device: torch.device | str) -> torch.device:
    """Where the sparse network can run: CUDA needs a CUDA build of spconv (spconv-cu1xx), else the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        from spconv.cppconstants import CPU_ONLY_BUILD

        if CPU_ONLY_BUILD:
            warnings.warn("spconv is the CPU-only build (PyPI `spconv`): the 3D feature network runs on the CPU; "
                          "install spconv-cu126 instead of spconv for CUDA", RuntimeWarning, stacklevel=2)
            return torch.device("cpu")
    return device


def _strides(grid: tuple[int, int, int], stages: int = 3) -> list[tuple[int, int, int]]:
    """Per stage, stride 2 on every axis still longer than 1."""
    out, size = [], list(grid)
    for _ in range(stages):
        s = tuple(2 if n > 1 else 1 for n in size)
        size = [math.ceil(n / k) for n, k in zip(size, s)]
        out.append(s)
    return out


def sparse_input(labels: torch.Tensor, embed: nn.Embedding, spatial: list[int]):
    """A SparseConvTensor of the occupied voxels of (B,X,Y,Z) labels: class embedding + position in [-1, 1]."""
    import spconv.pytorch as spconv

    occ = (labels != FREE) & (labels != IGNORE)
    idx = occ.nonzero().to(torch.int32).contiguous()  # contiguous: spconv reads the raw memory
    size = torch.tensor(labels.shape[1:], device=labels.device, dtype=torch.float32)
    pos = (idx[:, 1:].float() + 0.5) / size * 2 - 1
    feats = torch.cat([embed(labels[occ].long()), pos.to(embed.weight.dtype)], 1)
    return spconv.SparseConvTensor(feats, idx, spatial, labels.shape[0])


class F3DNet(nn.Module):
    """Sparse occupancy autoencoder with an attribute head (module docstring)."""

    def __init__(self, grid: tuple[int, int, int], num_classes: int = 11, num_attributes: int = 3,
                 widths: tuple[int, ...] = WIDTHS, features: int = FEATURES, probe: bool = True):
        super().__init__()
        import spconv.pytorch as spconv

        patch_spconv()
        self.config = {"grid": list(grid), "num_classes": num_classes, "num_attributes": num_attributes,
                       "widths": list(widths), "features": features, "probe": probe}
        self.grid, self.num_classes = tuple(grid), num_classes
        strides = _strides(self.grid, len(widths))
        f = [math.prod(s[a] for s in strides) for a in range(3)]  # pad so that every stride divides
        self.spatial = [math.ceil(n / k) * k for n, k in zip(grid, f)]
        self.embed = nn.Embedding(num_classes, EMBED)
        blocks, cin = [], EMBED + 3
        for i, (w, s) in enumerate(zip(widths, strides)):
            blocks += [spconv.SparseConv3d(cin, w, s, stride=s, bias=False), nn.BatchNorm1d(w), nn.ReLU(),
                       spconv.SubMConv3d(w, w, 3, padding=1, bias=False, indice_key=f"subm{i}"),
                       nn.BatchNorm1d(w), nn.ReLU()]
            cin = w
        self.encoder = spconv.SparseSequential(*blocks)
        self.bottleneck = nn.Linear((POOL[0] * POOL[1] + 1) * cin, features)
        self.head = nn.Linear(features, max(num_attributes, 1))
        self.coarse = (math.ceil(grid[0] / 16), math.ceil(grid[1] / 16), math.ceil(grid[2] / 16))
        self.target = tuple(math.ceil(n / 4) for n in grid)
        self.dec_in = nn.Linear(features, 32 * math.prod(self.coarse))
        self.dec = nn.Sequential(nn.Conv3d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv3d(32, num_classes, 1))

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """Pooled bottleneck features (B, 256) of (B,X,Y,Z) integer labels."""
        if labels.ndim != 4 or tuple(labels.shape[1:]) != self.grid:
            raise OcclabError(f"the 3D feature network was trained on grid {self.grid}; got labels of shape "
                              f"{tuple(labels.shape)}; train one for this grid (occlab train f3d --crop X Y Z)")
        b = labels.shape[0]
        bad = (labels >= self.num_classes) & (labels != IGNORE)
        if bool(bad.any()):
            raise OcclabError(f"labels {torch.unique(labels[bad])[:10].tolist()} are outside the 3D feature network's "
                              f"classes 0..{self.num_classes - 1} (and {IGNORE} = ignore)")
        if not bool(((labels != FREE) & (labels != IGNORE)).any()):  # spconv fails on no active site at all
            return self.bottleneck(torch.zeros(b, self.bottleneck.in_features, device=labels.device))
        with single_thread(labels.device):
            x = self.encoder(sparse_input(labels, self.embed, self.spatial))
        feats, ind = x.features, x.indices.long()
        shape = torch.tensor(x.spatial_shape, device=feats.device)
        cell = (ind[:, 1:3] * torch.tensor(POOL, device=feats.device) // shape[:2]).clamp(max=POOL[0] - 1)
        group = (ind[:, 0] * POOL[0] + cell[:, 0]) * POOL[1] + cell[:, 1]  # sample and xy quadrant
        cells = b * POOL[0] * POOL[1]
        count = torch.bincount(group, minlength=cells).clamp(min=1).to(feats.dtype)[:, None]
        mean = torch.zeros(cells, feats.shape[1], dtype=feats.dtype, device=feats.device).index_add(0, group, feats)
        top = torch.zeros(b, feats.shape[1], dtype=feats.dtype, device=feats.device).scatter_reduce(
            0, ind[:, :1].expand_as(feats), feats, "amax", include_self=False)
        return self.bottleneck(torch.cat([(mean / count).view(b, -1), top], 1))

    def forward(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """features (B,256), logits (B,A) and the coarse reconstruction logits (B,C,X/4,Y/4,Z/4)."""
        z = self.encode(labels)
        h = self.dec_in(F.relu(z)).view(-1, 32, *self.coarse)
        h = F.interpolate(h, size=self.target, mode="trilinear", align_corners=False)
        return {"features": z, "logits": self.head(z), "recon": self.dec(F.relu(h))}

    def block_fractions(self, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's target: class fractions of each 4x4x4 block (B,C,X/4,Y/4,Z/4); ignore counts as free."""
        lab = torch.where(labels == IGNORE, FREE, labels).long()
        onehot = F.one_hot(lab, self.num_classes).permute(0, 4, 1, 2, 3).float()
        return F.adaptive_avg_pool3d(onehot, self.target)

    def loss(self, labels: torch.Tensor, attributes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Soft cross-entropy of the block histograms + cross-entropy of the attribute (-1 = unknown, skipped)."""
        out = self(labels)
        recon = -(self.block_fractions(labels) * F.log_softmax(out["recon"], 1)).sum(1).mean()
        cls = torch.zeros((), device=labels.device)
        acc = torch.full((), float("nan"), device=labels.device)
        if attributes is not None and self.config["num_attributes"] > 0 and bool((attributes >= 0).any()):
            known = attributes >= 0
            logits = self.head(out["features"].detach()) if self.config["probe"] else out["logits"]
            cls = F.cross_entropy(logits[known], attributes[known])
            acc = (logits[known].argmax(1) == attributes[known]).float().mean()
        return {"loss": recon + cls, "recon": recon, "cls": cls, "acc": acc}


def save_f3d(model: F3DNet, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write an f3d checkpoint (config, weights, meta) atomically."""
    from occlab.checkpoint import save_network

    return save_network("f3d", VERSION, model, path, meta)


def load_f3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> F3DNet:
    """A checkpoint written by save_f3d, in eval mode."""
    from occlab.checkpoint import load_network

    ckpt = load_network("f3d", path)
    c = ckpt["config"]
    model = F3DNet(tuple(c["grid"]), c["num_classes"], c["num_attributes"], tuple(c["widths"]), c["features"],
                   c.get("probe", True))
    model.load_state_dict(ckpt["state_dict"])
    model.meta = ckpt.get("meta", {})
    return model.to(device).eval()


@lru_cache(maxsize=1)
def _extractor_class() -> type:
    """The torch-fidelity extractor class ("occlab-f3d": integer labels (B,X,Y,Z) -> features, logits)."""
    from occlab.metrics.extractor import checkpoint_extractor

    def outputs(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.is_floating_point():
            raise OcclabError(f"occlab-f3d expects integer labels (B,X,Y,Z), got {x.dtype}")
        z = net.encode(x)
        return {"features": z, "logits": net.head(z)}

    return checkpoint_extractor(NAME, load_f3d, outputs)


def register() -> str:
    """Register "occlab-f3d" with torch-fidelity (idempotent); returns the name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, _extractor_class())
    return NAME


__all__ = [
    "NAME",
    "F3DNet",
    "cache_root",
    "checkpoint_path",
    "load_f3d",
    "patch_spconv",
    "register",
    "save_f3d",
    "single_thread",
    "sparse_device",
    "sparse_input",
]
