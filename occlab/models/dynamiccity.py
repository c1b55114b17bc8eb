"""DynamicCity HexPlane VAE (Bian et al., ICLR 2025), written from the paper and sized after the released code.

labels (B, T, X, Y, Z) -> six planes tx, ty, tz, xy, xz, yz (B, C, a, b) -> logits (B, classes, T, X, Y, Z).

Encoder: Embedding(classes, C); a per-frame 3D conv backbone reducing X, Y, Z by dX, dY, dZ; a second one for
the time planes whose input also carries a one-hot frame index; a plane reducer (`projection`: a small
transformer over the reduced axes whose learned query token is read; or `avgpool`) with a 1x1 conv, tanh,
1x1 conv head; the t axis of the time planes reduced by dT with strided convs; a Gaussian per plane.
Decoder: `ess` (Expansion & Squeeze: per-plane conv blocks, expansion to a dense 4D volume by broadcasting
and Hadamard product, a per-frame 3D conv decoder) or `query` (sample the planes at every voxel, MLP).

Matching the released code (github.com/3DTopia/DynamicCity, conf/vae/model/vae.yaml): at CarlaSC
(128x128x8, T=16, rates 2,2,2,2, C=16) the released VAE has 1,699,288 parameters with its 12 classes
(1,699,191 with 11); ours has exactly the same count. Deliberate differences from the released code:
- the reducer reads the output of its learned query token, as the paper describes; the released code
  appends the token last and reads position 0 (the first voxel token) instead;
- attention dropout is applied in training only (`attn_dropout`; the released flash-attn call also drops in
  eval) and is a separate field because on CPU any attention dropout forces PyTorch's O(L^2)-memory kernel;
- no fp32 one-hot of the input (an embedding lookup), the positional encoding is a constant buffer.

How the model is computed (never what it computes) is set by `Compute` (model.compute): the fast path (default)
runs the per-frame 3D stages channels-last with group-norm kernels for instance norm, 1x1x1 convolutions as
matrix products, the one-hot frame index of the time backbone as a per-frame bias (its replicate-padded conv of
a constant one-hot is the kernel's sum), the decoder head's positional-encoding half as one product with the
constant encoding instead of a concatenation; `checkpoint` recomputes the per-frame stages in backward, one
`frame_chunk` at a time. The reference path (`fast=False`, no chunks) is the plain module-by-module run; tests
hold the two to the same outputs and gradients.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.utils.checkpoint import checkpoint

from occlab import planes as P
from occlab.classes import NUM_CLASSES_CARLASC
from occlab.errors import OcclabError
from occlab.models.blocks import (LEAKY_SLOPE, DownBlock3d, GaussianHead, GridPositionalEncoding, InstanceNorm2d,
                                  InstanceNorm3d, ResidualBlock3d, Transformer, count_parameters)

AXES = P.HEXPLANE_AXES  # "txyz"
PLANES = P.axis_pairs(AXES)  # ["tx", "ty", "tz", "xy", "xz", "yz"]
ENCODERS = ("projection", "avgpool")
DECODERS = ("ess", "query")
RATES = (1, 2, 4)

# Parameter count of the released VAE at CarlaSC (128x128x8, T=16, rates 2,2,2,2, C=16, query 64), counted by
# instantiating the released modules (dynamic_city/vae/*.py with conf/vae/model/vae.yaml) with their own
# 12 classes (conf/vae/dataset/carlasc.yaml); with 11 classes it is 1,699,191.
RELEASED_PARAMS_CARLASC = 1_699_288


@dataclass
class DynamicCityConfig:
    """All sizes of a DynamicCity VAE. Defaults: the released configuration at CarlaSC, T = 16."""

    num_classes: int = NUM_CLASSES_CARLASC  # free + 10 (12 with bicycle for Occ3D sets)
    frames: int = 16  # T
    grid: tuple[int, int, int] = (128, 128, 8)  # X, Y, Z
    latent_channels: int = 16  # C of every plane
    rates: tuple[int, int, int, int] = (2, 2, 2, 2)  # dT, dX, dY, dZ, each in {1, 2, 4}
    encoder: str = "projection"  # plane reducer: "projection" | "avgpool"
    decoder: str = "ess"  # "ess" (Expansion & Squeeze) | "query"
    expansion: str = "hadamard"  # how planes combine: "hadamard" | "sum"
    query_channels: int = 64  # plane channels inside the decoder
    transformer_depth: int = 2
    transformer_heads: int = 2
    transformer_mlp: int = 32
    dropout: float = 0.1  # transformer MLP and projection dropout (released 0.1)
    attn_dropout: float = 0.1  # attention-probability dropout (released 0.1); 0 keeps CPU attention O(L) memory
    conv_hidden_low_res: int = 128  # 3D decoder width at the reduced grid
    conv_hidden_high_res: int = 32  # 3D decoder width at the full grid
    pe_freqs: int = 3  # sin/cos frequencies of the (t, x, y, z) encoding -> 8 * pe_freqs channels
    query_mlp_hidden: int = 256  # query decoder MLP width (released mlp_hidden_channels)
    query_mlp_layers: int = 4  # query decoder hidden layers (released mlp_hidden_layers)
    vae: bool = True  # Gaussian per plane (False: plain autoencoder, logvar None)

    def __post_init__(self):
        self.grid = tuple(int(v) for v in self.grid)
        self.rates = tuple(int(v) for v in self.rates)
        if len(self.grid) != 3 or len(self.rates) != 4:
            raise OcclabError(f"grid must be (X, Y, Z) and rates (dT, dX, dY, dZ), got {self.grid} and {self.rates}")
        if any(r not in RATES for r in self.rates):
            raise OcclabError(f"rates must each be one of {RATES}, got {self.rates}")
        for name, value, allowed in (("encoder", self.encoder, ENCODERS), ("decoder", self.decoder, DECODERS),
                                     ("expansion", self.expansion, P.OPS)):
            if value not in allowed:
                raise OcclabError(f"{name} must be one of {allowed}, got {value!r}")
        if self.num_classes < 2:
            raise OcclabError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.latent_channels % self.transformer_heads:
            raise OcclabError(f"latent_channels {self.latent_channels} not divisible by {self.transformer_heads} heads")
        P.reduce_sizes(self.input_sizes, dict(zip(AXES, self.rates)))  # raises unless every rate divides
        small = [n for n, (a, b) in P.plane_shapes(self.latent_sizes, AXES).items() if a * b < 2]
        if small:
            raise OcclabError(f"planes {small} would hold a single cell (instance norm needs 2): "
                              f"latent sizes {self.latent_sizes}; use a larger grid or smaller rates")

    @property
    def input_sizes(self) -> dict[str, int]:
        """{"t": T, "x": X, "y": Y, "z": Z} of the input sequence."""
        return dict(zip(AXES, (self.frames, *self.grid)))

    @property
    def volume_sizes(self) -> dict[str, int]:
        """Sizes after the 3D backbones (X, Y, Z reduced, T kept) = the ESS decoder's expanded volume."""
        return P.reduce_sizes(self.input_sizes, dict(zip("xyz", self.rates[1:])))

    @property
    def latent_sizes(self) -> dict[str, int]:
        """Sizes of the HexPlane axes (every axis reduced by its rate)."""
        return P.reduce_sizes(self.input_sizes, dict(zip(AXES, self.rates)))

    def plane_shapes(self) -> dict[str, tuple[int, int, int]]:
        """{plane: (C, a, b)} of the latent HexPlane."""
        return {n: (self.latent_channels, *ab) for n, ab in P.plane_shapes(self.latent_sizes, AXES).items()}

    def compression_ratio(self) -> float:
        """Input voxels / latent floats (DESIGN §4)."""
        return P.compression_ratio(self.input_sizes, self.latent_sizes, self.latent_channels, AXES)


# ---------------------------------------------------------------------------------------------------------
# Size presets
# ---------------------------------------------------------------------------------------------------------

def dynamiccity_paper(geometry_grid=(128, 128, 8), frames: int = 16, **kw) -> DynamicCityConfig:
    """The released sizes (C 16, query 64, 3D decoder 128/32, transformer 2 x 2 heads x mlp 32, query MLP 256 x 4)."""
    return DynamicCityConfig(grid=tuple(geometry_grid), frames=frames, **kw)


def dynamiccity_small(geometry_grid=(32, 32, 8), frames: int = 8, **kw) -> DynamicCityConfig:
    """Same architecture at half the released widths (C 8, query 32, 3D decoder 64/16, mlp 16, query MLP 128 x 4)."""
    kw = {"latent_channels": 8, "query_channels": 32, "conv_hidden_low_res": 64, "conv_hidden_high_res": 16,
          "transformer_mlp": 16, "query_mlp_hidden": 128, **kw}
    return DynamicCityConfig(grid=tuple(geometry_grid), frames=frames, **kw)


def dynamiccity_tiny(geometry_grid=(8, 8, 4), frames: int = 4, **kw) -> DynamicCityConfig:
    """Smallest working widths, for unit tests and smoke runs (C 4, query 8, 3D decoder 16/8, query MLP 32 x 2)."""
    kw = {"latent_channels": 4, "query_channels": 8, "conv_hidden_low_res": 16, "conv_hidden_high_res": 8,
          "transformer_mlp": 8, "query_mlp_hidden": 32, "query_mlp_layers": 2, **kw}
    return DynamicCityConfig(grid=tuple(geometry_grid), frames=frames, **kw)


PRESETS = {"paper": dynamiccity_paper, "small": dynamiccity_small, "tiny": dynamiccity_tiny}


# ---------------------------------------------------------------------------------------------------------
# How the model is computed: fast kernels, activation checkpointing, frame chunks
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Compute:
    """How a DynamicCity runs (not part of its config: same parameters, same outputs within rounding)."""

    fast: bool = True  # channels-last kernels, 1x1x1 convs as matmuls, frame index and PE as products
    checkpoint: bool = False  # recompute the per-frame 3D stages in backward (activation checkpointing)
    frame_chunk: int = 0  # rows (B*T frames) per chunk of the per-frame 3D stages; 0: all (4 with checkpoint)

    def chunk(self, rows: int) -> int:
        """Rows per chunk for `rows` frames."""
        size = self.frame_chunk or (4 if self.checkpoint else rows)
        return max(1, min(size, rows))


def _cl(x: torch.Tensor) -> torch.Tensor:
    """(N, C, X, Y, Z) in channels-last-3D memory (a no-op when it already is)."""
    return x.contiguous(memory_format=torch.channels_last_3d)


def _layer(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One layer of a 3D stage on a channels-last (N, C, X, Y, Z) tensor, with the fast kernel where one exists."""
    if isinstance(m, InstanceNorm3d):
        # a group norm (blocks.InstanceNorm3d), at least fp32 (under bf16 autocast the next conv casts back): the
        # CPU's bf16 channels-last group-norm backward is 3x slower than the fp32 one
        return m(x.to(torch.promote_types(x.dtype, torch.float32)))
    if isinstance(m, nn.Conv3d) and m.kernel_size == (1, 1, 1) and m.stride == (1, 1, 1) and m.groups == 1:
        y = F.linear(x.permute(0, 2, 3, 4, 1), m.weight.flatten(1), m.bias)  # (N, X, Y, Z, C_out)
        return y.permute(0, 4, 1, 2, 3)  # (N, C_out, X, Y, Z), channels-last memory
    return m(x)


def _sequential(layers, x: torch.Tensor) -> torch.Tensor:
    for m in layers:
        x = _layer(m, x)
    return x


def _residual(block: ResidualBlock3d, x: torch.Tensor) -> torch.Tensor:
    """ResidualBlock3d on a channels-last tensor."""
    return x + _sequential(block.body, x)  # (N, C, X, Y, Z)


def _rows(fn, compute: Compute, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run a per-row (per-frame) function over chunks of rows, checkpointed if asked; concatenate its outputs."""
    rows = inputs[0].shape[0]
    size = compute.chunk(rows)
    ckpt = compute.checkpoint and torch.is_grad_enabled()
    outs = []
    for start in range(0, rows, size):
        part = [t[start:start + size] for t in inputs]
        outs.append(checkpoint(fn, *part, use_reentrant=False) if ckpt else fn(*part))
    if len(outs) == 1:
        return outs[0]
    return tuple(torch.cat(o, dim=0) for o in zip(*outs))


# ---------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------

class VoxelBackbone(nn.Module):
    """Per-frame 3D conv backbone: 3^3 conv in, residual block, then per stride-2 step a down conv + residual block."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, int, int]):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels, 3, padding=1, padding_mode="replicate")
        self.res_in = ResidualBlock3d(channels)
        steps = [int(math.log2(r)) for r in rates]  # stride-2 steps per axis
        self.down = nn.ModuleList()
        for i in range(max(steps)):
            factors = tuple(2 if s > i else 1 for s in steps)  # halve the axes still to be reduced
            self.down.append(nn.Sequential(DownBlock3d(channels, factors), ResidualBlock3d(channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B*T, C_in, X, Y, Z)
        x = self.res_in(self.conv_in(x))  # (B*T, C, X, Y, Z)
        for step in self.down:
            x = step(x)  # (B*T, C, X/2.., Y/2.., Z/2..)
        return x  # (B*T, C, X/dX, Y/dY, Z/dZ)

    def fast_after_conv_in(self, x: torch.Tensor) -> torch.Tensor:  # (B*T, C, X, Y, Z) channels-last
        """Everything after conv_in, channels-last with the fast kernels."""
        x = _residual(self.res_in, x)  # (B*T, C, X, Y, Z)
        for down, res in self.down:
            x = _residual(res, _sequential([down.conv, down.norm], x))  # (B*T, C, X/2.., Y/2.., Z/2..)
        return x  # (B*T, C, X/dX, Y/dY, Z/dZ)


class AxisReducer(nn.Module):
    """Reduce (B, C, *source axes) to (B, C, *kept axes), then 1x1 conv, tanh, 1x1 conv (Linear on channels).

    `projection` (the paper's Projection Module, released): the reduced cells of every kept position become
    tokens; a learned query token is prepended, a learned positional encoding added, a small pre-LN transformer
    run, and the query token's output read. `avgpool` (never released; written from the paper's "average
    pooling" baseline): the plain mean over the reduced axes, followed by the same 1x1 conv head, so that the
    ablation differs only in the reduction.
    """

    def __init__(self, cfg: DynamicCityConfig, source: str, kept: str, sizes: dict[str, int]):
        super().__init__()
        C = cfg.latent_channels
        self.kind, self.source, self.kept = cfg.encoder, source, kept
        self.reduced = "".join(a for a in source if a not in kept)
        self.kept_sizes = {a: sizes[a] for a in kept}
        self.reduce_dims = tuple(2 + source.index(a) for a in self.reduced)  # tensor dims of the reduced axes
        if self.kind == "projection":
            n = math.prod(sizes[a] for a in self.reduced)
            self.to_tokens = f"b c {' '.join(source)} -> (b {' '.join(kept)}) ({' '.join(self.reduced)}) c"
            self.query = nn.Parameter(torch.empty(1, 1, C))
            self.pos = nn.Parameter(torch.empty(1, n + 1, C))  # query token + n reduced cells
            self.transformer = Transformer(C, cfg.transformer_depth, cfg.transformer_heads, cfg.transformer_mlp,
                                           attn_dropout=cfg.attn_dropout, dropout=cfg.dropout)
        self.head = nn.Sequential(nn.Linear(C, C), nn.Tanh(), nn.Linear(C, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, *source), e.g. (B, C, T, X, Y, Z)
        if self.kind == "projection":
            tokens = rearrange(x, self.to_tokens)  # (B * kept, n, C), e.g. "xy": (B*X*Y, T*Z, C)
            query = self.query.expand(tokens.shape[0], -1, -1)  # (B * kept, 1, C)
            tokens = torch.cat([query, tokens], dim=1) + self.pos  # (B * kept, 1 + n, C)
            # on CPU the transformer stays fp32 under autocast: bf16 attention at head dim 8 is slower there
            with torch.autocast("cpu", enabled=False) if x.device.type == "cpu" else nullcontext():
                tokens = tokens.to(torch.promote_types(tokens.dtype, torch.float32))  # fp32 (fp64 stays)
                h = self.transformer(tokens, first_row_only=True)[:, 0]  # (B * kept, C): the query's output
            h = self.head(h)  # (B * kept, C)
            return rearrange(h, f"(b {' '.join(self.kept)}) c -> b c {' '.join(self.kept)}", **self.kept_sizes)
        h = x.mean(dim=self.reduce_dims)  # (B, C, *kept)
        return self.head(h.movedim(1, -1)).movedim(-1, 1)  # (B, C, *kept)


class TimeDownsampler(nn.Module):
    """Reduce the t axis of a time plane (B, C, T, a) by dT with kernel = stride = (2, 1) convs, LeakyReLU between."""

    def __init__(self, channels: int, rate: int):
        super().__init__()
        steps = int(math.log2(rate))
        layers: list[nn.Module] = []
        for i in range(steps):
            layers.append(nn.Conv2d(channels, channels, kernel_size=(2, 1), stride=(2, 1)))
            if i < steps - 1:
                layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
        self.down = nn.Sequential(*layers)  # empty (identity) for dT = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, a)
        return self.down(x)  # (B, C, T/dT, a)


class HexPlaneEncoder(nn.Module):
    """labels (B, T, X, Y, Z) -> six Gaussian planes {tx, ty, tz, xy, xz, yz: (B, C, a, b)}."""

    def __init__(self, cfg: DynamicCityConfig):
        super().__init__()
        C, T = cfg.latent_channels, cfg.frames
        self.cfg = cfg
        vol = cfg.volume_sizes  # {t: T, x: X/dX, y: Y/dY, z: Z/dZ}
        self.embedding = nn.Embedding(cfg.num_classes, C)
        self.spatial = VoxelBackbone(C, C, cfg.rates[1:])
        self.temporal = VoxelBackbone(C + T, C, cfg.rates[1:])  # + one-hot frame index
        # spatial branch: txyz -> xyz (reduce t) -> xy, xz, yz; time branch: txyz -> tx, ty, tz
        self.reducers = nn.ModuleDict({"xyz": AxisReducer(cfg, "txyz", "xyz", vol)})
        for name in PLANES:
            self.reducers[name] = AxisReducer(cfg, "xyz" if "t" not in name else "txyz", name, vol)
        self.time_down = nn.ModuleDict({n: TimeDownsampler(C, cfg.rates[0]) for n in PLANES if "t" in n})
        if cfg.vae:
            self.gaussians = nn.ModuleDict({n: GaussianHead(C) for n in PLANES})
        self.compute = Compute()  # shared with the model (DynamicCity sets it)

    def _frames_reference(self, labels: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (n, X, Y, Z), frame index (n,) -> both backbones' outputs (n, C, X', Y', Z'), module by module."""
        n, X, Y, Z = labels.shape
        h = rearrange(self.embedding(labels.long()), "n x y z c -> n c x y z")  # (n, C, X, Y, Z)
        frame = F.one_hot(frames, self.cfg.frames).to(h.dtype)  # (n, T) one-hot frame index
        frame = repeat(frame, "n k -> n k x y z", x=X, y=Y, z=Z)  # (n, T, X, Y, Z)
        return self.spatial(h), self.temporal(torch.cat([h, frame], dim=1))  # (n, C, X', Y', Z') x 2

    def _frames_fast(self, labels: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same, channels-last; the time backbone's one-hot frame channels enter as a per-frame bias: a
        replicate-padded conv of a constant channel is that channel's kernel sum at every voxel."""
        h = self.embedding(labels.long()).permute(0, 4, 1, 2, 3)  # (n, C, X, Y, Z), channels-last memory
        C = h.shape[1]
        spatial = self.spatial.fast_after_conv_in(self.spatial.conv_in(h))  # (n, C, X', Y', Z')
        conv = self.temporal.conv_in  # Conv3d(C + T, C, 3, padding=1, replicate)
        padded = F.pad(h, conv._reversed_padding_repeated_twice, mode="replicate")  # (n, C, X+2, Y+2, Z+2)
        t = F.conv3d(padded, conv.weight[:, :C], conv.bias)  # (n, C, X, Y, Z)
        frame_bias = conv.weight[:, C:].sum(dim=(2, 3, 4)).t()[frames]  # (n, C)
        t = t + frame_bias[:, :, None, None, None]  # (n, C, X, Y, Z)
        return spatial, self.temporal.fast_after_conv_in(t)  # (n, C, X', Y', Z') x 2

    def forward(self, labels: torch.Tensor) -> dict:
        cfg = self.cfg
        B, T, X, Y, Z = labels.shape
        if (T, X, Y, Z) != (cfg.frames, *cfg.grid):
            raise OcclabError(f"DynamicCity expects labels (B, {cfg.frames}, {', '.join(map(str, cfg.grid))}), "
                              f"got {tuple(labels.shape)}")
        frames = torch.arange(B * T, device=labels.device) % T  # (B*T,) frame index of every row
        stage = self._frames_fast if self.compute.fast else self._frames_reference
        vol, tvol = _rows(stage, self.compute, labels.reshape(B * T, X, Y, Z), frames)  # (B*T, C, X', Y', Z') x 2
        vol = rearrange(vol, "(b t) c x y z -> b c t x y z", b=B)  # (B, C, T, X', Y', Z')
        tvol = rearrange(tvol, "(b t) c x y z -> b c t x y z", b=B)  # (B, C, T, X', Y', Z')

        xyz = self.reducers["xyz"](vol)  # (B, C, X', Y', Z')
        planes = {}
        for name in PLANES:
            if "t" in name:
                p = self.reducers[name](tvol)  # (B, C, T, a)
                planes[name] = self.time_down[name](p)  # (B, C, T/dT, a)
            else:
                planes[name] = self.reducers[name](xyz)  # (B, C, a, b)
        if not cfg.vae:
            return {"planes": planes, "mu": planes, "logvar": None}
        out = {"planes": {}, "mu": {}, "logvar": {}}
        for name in PLANES:
            z, mu, logvar = self.gaussians[name](planes[name])  # (B, C, a, b) x 3
            out["planes"][name], out["mu"][name], out["logvar"][name] = z, mu, logvar
        return out


# ---------------------------------------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------------------------------------

class PlaneConvBlock(nn.Module):
    """Residual plane block C_in -> C_out: 3x3 conv, InstanceNorm(affine), SiLU, zero-init 3x3 conv, + 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = InstanceNorm2d(out_channels, eps=1e-6, affine=True)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        nn.init.zeros_(self.conv_out.weight)  # released: zero_module -> the block starts as its shortcut
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, a, b)
        h = self.conv_out(self.act(self.norm(self.conv_in(x))))  # (B, C_out, a, b)
        return self.shortcut(x) + h  # (B, C_out, a, b)


class PlaneUpsampler(nn.Module):
    """Transposed conv (kernel = stride = factors), InstanceNorm, LeakyReLU, 3x3 conv, InstanceNorm, LeakyReLU."""

    def __init__(self, channels: int, factors: tuple[int, int]):
        super().__init__()
        self.body = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel_size=factors, stride=factors),
            InstanceNorm2d(channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            InstanceNorm2d(channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, a, b)
        return self.body(x)  # (B, C, a * fa, b * fb)


class ESSDecoder(nn.Module):
    """Expansion & Squeeze: planes -> dense (B, Q, T, X', Y', Z') -> per-frame 3D conv decoder -> logits.

    Every plane gets a PlaneUpsampler as released: time planes upsample t by dT, spatial planes use factor 1
    (a 1x1 transposed conv); X, Y, Z are restored by the 3D decoder's final transposed conv.
    """

    def __init__(self, cfg: DynamicCityConfig):
        super().__init__()
        C, Q, K = cfg.latent_channels, cfg.query_channels, cfg.num_classes
        Hl, Hh = cfg.conv_hidden_low_res, cfg.conv_hidden_high_res
        dT, dX, dY, dZ = cfg.rates
        self.cfg = cfg
        self.plane_convs = nn.ModuleDict({n: PlaneConvBlock(C, Q) for n in PLANES})
        self.upsamplers = nn.ModuleDict({n: PlaneUpsampler(Q, (dT if n[0] == "t" else 1, 1)) for n in PLANES})
        self.conv_in = nn.Sequential(nn.Conv3d(Q, Hl, 1), nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
        self.res3 = ResidualBlock3d(Hl, 3, padding_mode="zeros", final_act=True)
        self.res1 = ResidualBlock3d(Hl, 1, padding_mode="zeros", final_act=True)
        self.up = nn.ConvTranspose3d(Hl, Hh, kernel_size=(dX, dY, dZ), stride=(dX, dY, dZ))
        self.pe = GridPositionalEncoding((cfg.frames, *cfg.grid), cfg.pe_freqs)  # (8F, T, X, Y, Z) constant
        self.head = nn.Sequential(
            nn.Conv3d(Hh + self.pe.channels, K, 1),
            InstanceNorm3d(K),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv3d(K, K, 1),
        )

        self.compute = Compute()  # shared with the model (DynamicCity sets it)

    def forward(self, planes: dict[str, torch.Tensor]) -> torch.Tensor:  # {name: (B, C, a, b)}
        planes = {n: self.upsamplers[n](self.plane_convs[n](planes[n])) for n in PLANES}  # (B, Q, a, b), t full
        B, T = planes["tx"].shape[0], self.cfg.frames
        # everything after the expansion is per frame: run it in chunks of frames (exact; instance norms are
        # per frame); the rows are frames t of every sample b, so chunk over t and keep b whole
        times = torch.arange(T, device=planes["tx"].device)  # (T,)
        stage = self._frames_fast if self.compute.fast else self._frames_reference
        chunk = Compute(self.compute.fast, self.compute.checkpoint,
                        max(1, self.compute.chunk(B * T) // B))  # frames per chunk
        spatial = {n: planes[n] for n in ("xy", "xz", "yz")}  # (B, Q, a, b): every chunk reads them whole
        logits = _rows(lambda t, tx, ty, tz: (stage(t, tx, ty, tz, spatial),), chunk, times,
                       *(planes[n].movedim(2, 0) for n in ("tx", "ty", "tz")))[0]  # (T, B, ...), chunks on t
        if self.compute.fast:
            return rearrange(logits, "t b x y z k -> b k t x y z")  # (B, K, T, X, Y, Z), channels-last memory
        return rearrange(logits, "t b k x y z -> b k t x y z")  # (B, K, T, X, Y, Z)

    def _pe(self, times: torch.Tensor) -> torch.Tensor:
        """The constant encoding of the consecutive frames `times` (8F, t, X, Y, Z): a view, never a copy."""
        pe = self.pe()  # (8F, T, X, Y, Z)
        if times.numel() == pe.shape[1]:
            return pe
        start = int(times[0])
        return pe[:, start:start + times.numel()]

    def _frames_reference(self, times: torch.Tensor, tx, ty, tz, spatial: dict) -> torch.Tensor:
        """Frames `times` (t,), time planes (t, B, Q, a) -> logits (t, B, K, X, Y, Z), module by module."""
        planes = {**spatial, "tx": tx.movedim(0, 2), "ty": ty.movedim(0, 2), "tz": tz.movedim(0, 2)}
        vol = P.expand(planes, AXES, op=self.cfg.expansion)  # (B, Q, t, X', Y', Z')
        B = vol.shape[0]
        h = rearrange(vol, "b c t x y z -> (b t) c x y z")  # (B*t, Q, X', Y', Z')
        h = self.res1(self.res3(self.conv_in(h)))  # (B*t, Hl, X', Y', Z')
        h = self.up(h)  # (B*t, Hh, X, Y, Z)
        pe = repeat(self._pe(times), "c t x y z -> (b t) c x y z", b=B)  # (B*t, 8F, X, Y, Z)
        logits = self.head(torch.cat([h, pe], dim=1))  # (B*t, K, X, Y, Z)
        return rearrange(logits, "(b t) k x y z -> t b k x y z", b=B)  # (t, B, K, X, Y, Z)

    def _frames_fast(self, times: torch.Tensor, tx, ty, tz, spatial: dict) -> torch.Tensor:
        """The same channels-last: expansion straight into (B, t, X', Y', Z', Q), 1x1x1 convs as matmuls, and
        the head's first conv split into its feature half and a product with the constant encoding (no concat).
        Returns logits (t, B, X, Y, Z, K)."""
        views = [tx.permute(1, 0, 3, 2)[:, :, :, None, None],  # (B, t, X', 1, 1, Q)
                 ty.permute(1, 0, 3, 2)[:, :, None, :, None],  # (B, t, 1, Y', 1, Q)
                 tz.permute(1, 0, 3, 2)[:, :, None, None, :]]  # (B, t, 1, 1, Z', Q)
        for n in ("xy", "xz", "yz"):
            p = spatial[n].permute(0, 2, 3, 1)  # (B, a, b, Q)
            views.append(p[:, None, :, :, None] if n == "xy" else
                         p[:, None, :, None, :] if n == "xz" else p[:, None, None, :, :])
        vol = P.combine(views, self.cfg.expansion)  # (B, t, X', Y', Z', Q)
        B, t = vol.shape[:2]
        h = vol.reshape(B * t, *vol.shape[2:]).permute(0, 4, 1, 2, 3)  # (B*t, Q, X', Y', Z'), channels-last
        h = _cl(h)  # a "sum" expansion may come out broadcast
        h = _sequential(self.conv_in, h)  # (B*t, Hl, X', Y', Z')
        h = _residual(self.res1, _residual(self.res3, h))  # (B*t, Hl, X', Y', Z')
        h = self.up(h)  # (B*t, Hh, X, Y, Z), channels-last
        first = self.head[0]  # Conv3d(Hh + 8F, K, 1)
        w = first.weight.flatten(1)  # (K, Hh + 8F)
        Hh = h.shape[1]
        y = F.linear(h.permute(0, 2, 3, 4, 1), w[:, :Hh])  # (B*t, X, Y, Z, K)
        pe = self._pe(times)  # (8F, t, X, Y, Z)
        pe_term = F.linear(pe.flatten(1).t(), w[:, Hh:], first.bias)  # (t*X*Y*Z, K): the encoding's half
        y = (y.reshape(B, -1, y.shape[-1]) + pe_term).reshape(y.shape)  # (B*t, X, Y, Z, K)
        y = _sequential(self.head[1:], y.permute(0, 4, 1, 2, 3))  # (B*t, K, X, Y, Z), channels-last
        return rearrange(y.permute(0, 2, 3, 4, 1), "(b t) x y z k -> t b x y z k", b=B)  # (t, B, X, Y, Z, K)


class QueryDecoder(nn.Module):
    """Per-point query: plane conv blocks, bilinear look-up of all six planes at every voxel centre, combine,
    concatenate the (t, x, y, z) sin/cos encoding, point-wise MLP -> logits.

    Never released; written from the paper ("querying each point individually"). Chosen: the same plane conv
    blocks as ESS (C -> Q), no plane upsampling (bilinear sampling at the full-resolution voxel centres,
    align_corners=False, so a coarse plane is interpolated), the same Hadamard/sum combination, and an MLP of
    `query_mlp_layers` hidden Linear layers of `query_mlp_hidden` units with LeakyReLU(0.1), as the released
    config's unused mlp_hidden_channels / mlp_hidden_layers (256 x 4). It runs its MLP at every voxel, so it is
    far heavier than ESS in time and memory, as the paper's Tab. 3 reports.
    """

    def __init__(self, cfg: DynamicCityConfig):
        super().__init__()
        C, Q, K = cfg.latent_channels, cfg.query_channels, cfg.num_classes
        self.cfg = cfg
        self.plane_convs = nn.ModuleDict({n: PlaneConvBlock(C, Q) for n in PLANES})
        self.pe = GridPositionalEncoding((cfg.frames, *cfg.grid), cfg.pe_freqs)  # (8F, T, X, Y, Z) constant
        self.register_buffer("coords", P.voxel_centres(cfg.input_sizes, AXES), persistent=False)  # (N, 4)
        layers: list[nn.Module] = []
        width = Q + self.pe.channels
        for _ in range(cfg.query_mlp_layers):
            layers += [nn.Linear(width, cfg.query_mlp_hidden), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
            width = cfg.query_mlp_hidden
        layers.append(nn.Linear(width, K))
        self.mlp = nn.Sequential(*layers)

    def forward(self, planes: dict[str, torch.Tensor]) -> torch.Tensor:  # {name: (B, C, a, b)}
        planes = {n: self.plane_convs[n](planes[n]) for n in PLANES}  # (B, Q, a, b)
        feats = P.sample(planes, self.coords, AXES, op=self.cfg.expansion)  # (B, Q, N), N = T*X*Y*Z
        B = feats.shape[0]
        pe = self.pe().flatten(1).expand(B, -1, -1)  # (B, 8F, N)
        h = torch.cat([feats, pe], dim=1).transpose(1, 2)  # (B, N, Q + 8F)
        logits = self.mlp(h)  # (B, N, K)
        T, X, Y, Z = self.cfg.input_sizes.values()
        return rearrange(logits, "b (t x y z) k -> b k t x y z", t=T, x=X, y=Y, z=Z)  # (B, K, T, X, Y, Z)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

class DynamicCity(nn.Module):
    """HexPlane VAE: encode(labels) -> planes, decode(planes) -> logits (B, classes, T, X, Y, Z)."""

    def __init__(self, config: DynamicCityConfig):
        super().__init__()
        self.config = config
        self.encoder = HexPlaneEncoder(config)
        self.decoder = ESSDecoder(config) if config.decoder == "ess" else QueryDecoder(config)
        self.compute = Compute()
        self.initialize_weights()

    @property
    def compute(self) -> Compute:
        """How the model runs (fast kernels, checkpointing, frame chunks); assigning it reaches every part."""
        return self.encoder.compute

    @compute.setter
    def compute(self, value: Compute) -> None:
        self.encoder.compute = value
        self.decoder.compute = value

    def initialize_weights(self):
        """Explicit init. As released: the reducers' query tokens and positional encodings ~ N(0, 1), the plane
        conv blocks' last conv zero (done in PlaneConvBlock); every other conv/linear keeps PyTorch's default
        (Kaiming-uniform), the embedding N(0, 1), norms weight 1 / bias 0."""
        for reducer in self.encoder.reducers.values():
            if reducer.kind == "projection":
                nn.init.normal_(reducer.query, std=1.0)
                nn.init.normal_(reducer.pos, std=1.0)

    def encode(self, labels: torch.Tensor) -> dict:
        """labels (B, T, X, Y, Z) integer in [0, classes) -> {planes, mu, logvar}: {name: (B, C, a, b)} each."""
        return self.encoder(labels)

    def decode(self, planes: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: (B, C, a, b)} -> logits (B, classes, T, X, Y, Z), channels first for F.cross_entropy."""
        return self.decoder(planes)

    def forward(self, labels: torch.Tensor) -> dict:
        """labels (B, T, X, Y, Z) -> {logits (B, K, T, X, Y, Z), planes, mu, logvar}."""
        enc = self.encode(labels)
        return {"logits": self.decode(enc["planes"]), **enc}



def model_info(config: DynamicCityConfig) -> dict:
    """Parameter counts, plane shapes (name -> [C, a, b]) and compression ratio."""
    model = DynamicCity(config)  # a few MB; not on the meta device, whose normal_ crashes once VTK has rendered
    return {
        "model": "dynamiccity",
        "parameters": count_parameters(model),
        "parameters_by_part": {
            **{f"encoder.{n}": count_parameters(m) for n, m in model.encoder.named_children()},
            "decoder": count_parameters(model.decoder),
        },
        "input_shape": list(config.input_sizes.values()),
        "plane_shapes": {n: list(s) for n, s in config.plane_shapes().items()},
        "latent_floats": P.latent_floats(config.latent_sizes, AXES, config.latent_channels),
        "compression_ratio": config.compression_ratio(),
        "config": asdict(config),
    }


__all__ = ["Compute", "DynamicCity", "DynamicCityConfig", "PRESETS", "RELEASED_PARAMS_CARLASC", "dynamiccity_paper",
           "dynamiccity_small", "dynamiccity_tiny", "model_info"]
