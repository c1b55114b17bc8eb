"""Small building blocks shared by the occlab models (3D conv blocks, a pre-LN transformer, encodings, heads).

Shapes in the comments: N = batch (or batch x frames), C = channels, X, Y, Z = grid, L = tokens, H = heads.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

LEAKY_SLOPE = 0.1


def count_parameters(module: nn.Module | None) -> int:
    """Number of parameters (trainable or not; buffers are not counted); 0 for None."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------
# Instance norm
# ---------------------------------------------------------------------------------------------------------

class _GroupNormForward:
    """Instance norm computed as a group norm with one group per channel: the same function and parameters.

    torch 2.14's F.instance_norm returns a wrong input gradient when the incoming gradient's memory order puts
    the spatial axes before (N, C), e.g. the gradient of a tensor that a later step rearranged into tokens
    (tests/test_blocks.py::test_instance_norm_gradient_for_any_gradient_layout); group norm's is right for every
    layout. Running statistics are not supported (no occlab model tracks them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, *spatial)
        if self.track_running_stats:
            raise ValueError("occlab's instance norms do not track running statistics")
        return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)  # (N, C, *spatial)


class InstanceNorm2d(_GroupNormForward, nn.InstanceNorm2d):
    """nn.InstanceNorm2d with a gradient that is right for every memory layout (see _GroupNormForward)."""


class InstanceNorm3d(_GroupNormForward, nn.InstanceNorm3d):
    """nn.InstanceNorm3d with a gradient that is right for every memory layout (see _GroupNormForward)."""


# ---------------------------------------------------------------------------------------------------------
# 3D convolution blocks
# ---------------------------------------------------------------------------------------------------------

class ResidualBlock3d(nn.Module):
    """x + [conv, InstanceNorm, LeakyReLU(0.1), conv, InstanceNorm (, LeakyReLU)](x); shape-preserving."""

    def __init__(self, channels: int, kernel_size: int = 3, padding_mode: str = "replicate",
                 final_act: bool = False):
        super().__init__()
        pad = kernel_size // 2
        layers = [
            nn.Conv3d(channels, channels, kernel_size, padding=pad, padding_mode=padding_mode),
            InstanceNorm3d(channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv3d(channels, channels, kernel_size, padding=pad, padding_mode=padding_mode),
            InstanceNorm3d(channels),
        ]
        if final_act:
            layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, X, Y, Z)
        return x + self.body(x)  # (N, C, X, Y, Z)


class DownBlock3d(nn.Module):
    """Strided downsampling: Conv3d with kernel = stride = `factors` (1 or 2 per axis), then InstanceNorm."""

    def __init__(self, channels: int, factors: tuple[int, int, int]):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=factors, stride=factors)
        self.norm = InstanceNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, X, Y, Z)
        return self.norm(self.conv(x))  # (N, C, X/fx, Y/fy, Z/fz)


# ---------------------------------------------------------------------------------------------------------
# Transformer (pre-LN, SDPA)
# ---------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention: qkv projection without bias, scaled_dot_product_attention, output projection."""

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, first_row_only: bool = False) -> torch.Tensor:  # (N, L, D)
        """Self-attention; `first_row_only` returns only token 0's output (N, 1, D), attending to all tokens."""
        q, k, v = rearrange(self.qkv(x), "n l (three h d) -> three n h l d", three=3, h=self.heads)  # (N, H, L, D/H)
        if first_row_only:
            q = q[:, :, :1]  # (N, H, 1, D/H)
        p = self.attn_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (N, H, L or 1, D/H)
        x = rearrange(x, "n h l d -> n l (h d)")  # (N, L, D)
        return self.proj_drop(self.proj(x))  # (N, L, D)


class Mlp(nn.Module):
    """Token MLP: Linear(D, hidden), GELU, dropout, Linear(hidden, D), dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, D)
        x = self.drop1(self.act(self.fc1(x)))  # (N, L, hidden)
        return self.drop2(self.fc2(x))  # (N, L, D)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + Attention(LN(x)), then x + Mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, attn_dropout=attn_dropout, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout=dropout)

    def forward(self, x: torch.Tensor, first_row_only: bool = False) -> torch.Tensor:  # (N, L, D)
        """`first_row_only`: token 0's output only (N, 1, D): exact, it still attends to every token."""
        x = (x[:, :1] if first_row_only else x) + self.attn(self.norm1(x), first_row_only)  # (N, L or 1, D)
        return x + self.mlp(self.norm2(x))  # (N, L or 1, D)


class Transformer(nn.Module):
    """`depth` pre-LN blocks, no final norm. Very large batches of sequences run in chunks (GPU kernel limits)."""

    max_batch = 32768

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, attn_dropout: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(
            [TransformerBlock(dim, heads, mlp_dim, attn_dropout=attn_dropout, dropout=dropout) for _ in range(depth)])

    def _run(self, x: torch.Tensor, first_row_only: bool) -> torch.Tensor:  # (N, L, D)
        for i, block in enumerate(self.blocks):
            x = block(x, first_row_only and i == len(self.blocks) - 1)
        return x  # (N, L, D), or (N, 1, D) with first_row_only

    def forward(self, x: torch.Tensor, first_row_only: bool = False) -> torch.Tensor:  # (N, L, D)
        """All outputs, or (`first_row_only`) token 0's alone: the last block then skips every other row's
        query and MLP, which nothing reads (the projection module reads only its query token)."""
        if x.shape[0] <= self.max_batch:
            return self._run(x, first_row_only)
        return torch.cat([self._run(chunk, first_row_only) for chunk in x.split(self.max_batch)], dim=0)


# ---------------------------------------------------------------------------------------------------------
# Encodings and heads
# ---------------------------------------------------------------------------------------------------------

def sincos_grid_encoding(shape: tuple[int, ...], freqs: int, dtype: torch.dtype = torch.float32,
                         device=None) -> torch.Tensor:
    """sin/cos of 2^f times the integer cell coordinates of a grid: (2 * freqs * len(shape), *shape).

    Channel order (as the released DynamicCity decoder): for f = 0..freqs-1, sin(2^f c) then cos(2^f c),
    each for the coordinates c = (t, x, y, z) (or whichever axes `shape` has) in order.
    """
    ticks = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
    coords = torch.stack(torch.meshgrid(*ticks, indexing="ij"))  # (A, *shape): integer coordinates
    parts = []
    for f in range(freqs):
        parts += [torch.sin((2.0 ** f) * coords), torch.cos((2.0 ** f) * coords)]  # (A, *shape) each
    return torch.cat(parts, dim=0).to(dtype)  # (2 * freqs * A, *shape)


class GridPositionalEncoding(nn.Module):
    """Constant sin/cos grid encoding, built once as a non-persistent buffer (moves with .to(), not saved)."""

    def __init__(self, shape: tuple[int, ...], freqs: int):
        super().__init__()
        self.shape = tuple(int(n) for n in shape)
        self.channels = 2 * freqs * len(self.shape)
        self.register_buffer("encoding", sincos_grid_encoding(self.shape, freqs), persistent=False)

    def forward(self) -> torch.Tensor:
        return self.encoding  # (2 * freqs * A, *shape)


class GaussianHead(nn.Module):
    """Per-position Linear(C, 2C) -> (mu, logvar); z = mu + eps * exp(logvar / 2) in training, mu in eval."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Linear(channels, 2 * channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (B, C, *spatial)
        h = self.proj(x.movedim(1, -1))  # (B, *spatial, 2C)
        mu, logvar = (t.movedim(-1, 1) for t in h.chunk(2, dim=-1))  # (B, C, *spatial) each
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation
        else:
            z = mu
        return z, mu, logvar  # (B, C, *spatial) x 3
