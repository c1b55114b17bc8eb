"""OccSora 4D scene tokenizer (Wang et al., 2024): a VQ-VAE over occupancy sequences, written from the paper and
sized after the released code.

labels (B, T, X, Y, Z) -> tokens (B, T', X', Y') of a K-code book of D floats -> logits (B, classes, T, X, Y, Z).

Encoder: a per-voxel class embedding (E channels) with the height folded into channels, (B, Z*E, T, X, Y);
log2(max rate) strided Conv3d (kernel 4, stride 2 along the axes still to reduce, ReLU), a 3^3 conv, residual
blocks with axial attention over t, x and y, norm + ReLU, two 1x1 convs to the code width D.
Quantiser: nearest code (squared L2), straight-through estimator, codebook + beta * commitment loss.
Decoder: two 1x1 convs back to the hidden width, the same residual blocks, norm + ReLU, strided transposed
convs (kernel 4) back to (B, Z*E, T, X, Y); the logit of class k at height z is the dot product of the E
channels of z with the class embedding of k (weights tied with the input embedding, as released).

Loss (trainer side, released config/train_vqvae.py): 10 x unweighted cross-entropy + 1 x Lovász-softmax + 1 x the
VQ loss this model returns as `vq_loss`; the shared OccupancyLoss adds `vq_loss` itself, the CE weight of 10 and
the absence of class weights are trainer settings. Released optimiser: AdamW lr 1e-3, weight decay 0.01, cosine
schedule after 200 warm-up steps, gradient norm clipped at 35, batch 1, fp32.

Matching the released code (github.com/wzzheng/OccSora, model/VAE/vae_2d_resnet.py, quantizer.py, attention.py,
config/train_vqvae.py: n_hiddens 512, 4 residual layers, downsample (8, 8, 8), expansion 8, n_e 512, e_dim 128,
beta 1): at nuScenes-occupancy scale (200x200x16, T = 32, 18 classes) the released tokenizer has 137,369,744
parameters, counted by instantiating the released modules; `occsora_paper` with 18 classes has exactly the same
count (137,369,688 with our 11). Latent (128, 4, 25, 25): 2,500 tokens of a 512-code book per 32 frames.
Choices where the paper is silent or the release disagrees with itself:
- the released VAE forward replaces the quantised latent by a debugging file (np.load('/samples_array.npy'))
  and does not parse (a stray parenthesis); we follow its encoder -> quantiser -> decoder path;
- the released decoder head squeezes the batch axis (batch 1 only); ours takes any batch;
- codebook: learned by the codebook loss (no EMA), initialised U(-1/K, 1/K), as released. The released quantiser
  is taming-transformers' `legacy` one (beta on the codebook term); with the released beta = 1 both forms are
  equal; ours puts beta on the commitment term as in the VQ-VAE paper (which uses 0.25);
- norms are BatchNorm3d as released (`norm="group"` is an option: BatchNorm at batch 1 differs between train and
  eval); the stacked 1x1 convs (pre_vq_conv + quant_conv, post_quant_conv + post_vq_conv) are kept so that the
  parameter count matches, although each pair is one linear map;
- dead-code restart is ours, off by default (see VectorQuantizer).
Compression ratio: none of the papers in paper_tables/ prints one for OccSora (X-Scene Tab. 1 prints the latent
size "(T/8; 25; 25; 512)"). `compression_ratio()` follows the kit's definition (DESIGN §4: input voxels / latent
floats, a token counting as its D code floats): 512 Z / D at rates (8, 8, 8), 64 at nuScenes (Z = 16, D = 128),
32 at CarlaSC (Z = 8); `compression_ratio_tokens()` gives input voxels per token (8192 at nuScenes).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from occlab.classes import NUM_CLASSES_CARLASC
from occlab.errors import OcclabError
from occlab.models.blocks import Attention, count_parameters

AXES = "txyz"
NORMS = ("batch", "group")

# Parameter count of the released tokenizer at nuScenes-occupancy (200x200x16, T=32), counted by instantiating the
# released modules (VAERes2D with config/train_vqvae.py) with their own 18 classes; with 11 classes 137,369,688.
RELEASED_PARAMS_NUSCENES = 137_369_744


@dataclass
class OccSoraConfig:
    """All sizes of an OccSora tokenizer. Defaults: the released configuration at nuScenes-occupancy, T = 32."""

    num_classes: int = NUM_CLASSES_CARLASC  # free + 10 (released: 18 nuScenes-occupancy labels)
    frames: int = 32  # T (released return_len 32)
    grid: tuple[int, int, int] = (200, 200, 16)  # X, Y, Z; Z is folded into channels
    embed_dim: int = 8  # class embedding per voxel E (released `expansion`); input channels Z * E
    hidden: int = 512  # width of the strided convs and residual blocks (released n_hiddens)
    res_blocks: int = 4  # axial-attention residual blocks in the encoder and again in the decoder
    heads: int = 2  # axial attention heads
    downsample: tuple[int, int, int] = (8, 8, 8)  # dT, dX, dY, each a power of 2
    kernel_size: int = 4  # kernel of the strided (transposed) convs
    codebook_size: int = 512  # K
    code_dim: int = 128  # D, floats per code
    beta: float = 1.0  # commitment weight (released 1; VQ-VAE paper 0.25)
    norm: str = "batch"  # "batch" (released BatchNorm3d) | "group" (GroupNorm, batch-independent)
    dead_code_restart: bool = False  # re-seed idle codes from encoder outputs in training (ours, off as released)
    restart_decay: float = 0.9  # EMA decay of the per-step assignment count of every code
    restart_threshold: float = 0.05  # a code whose count EMA falls below this is re-seeded

    def __post_init__(self):
        self.grid = tuple(int(v) for v in self.grid)
        self.downsample = tuple(int(v) for v in self.downsample)
        if len(self.grid) != 3 or any(v < 1 for v in self.grid):
            raise OcclabError(f"grid must be three positive sizes (X, Y, Z), got {self.grid}")
        if self.frames < 1:
            raise OcclabError(f"frames must be positive, got {self.frames}")
        if len(self.downsample) != 3 or any(r < 1 or r & (r - 1) for r in self.downsample):
            raise OcclabError(f"downsample must be (dT, dX, dY), each a power of 2, got {self.downsample}")
        if max(self.downsample) < 2:
            raise OcclabError(f"downsample must reduce at least one axis, got {self.downsample}")
        for axis, n, r in zip("txy", (self.frames, *self.grid[:2]), self.downsample):
            if n % r:
                raise OcclabError(f"downsample: the {axis} size {n} is not divisible by its rate {r}")
        if math.prod(self.latent_sizes.values()) < 2:
            raise OcclabError(f"downsample {self.downsample} leaves a single latent cell for frames {self.frames} "
                              f"and grid {self.grid} (the norms need 2); use smaller rates")
        for name in ("num_classes", "codebook_size"):
            if getattr(self, name) < 2:
                raise OcclabError(f"{name} must be at least 2, got {getattr(self, name)}")
        for name in ("embed_dim", "code_dim", "res_blocks", "heads"):
            if getattr(self, name) < 1:
                raise OcclabError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden < 2 or self.hidden % 2 or self.hidden % self.heads:
            raise OcclabError(f"hidden must be even and divisible by heads ({self.heads}), got {self.hidden}")
        if self.kernel_size < 2:
            raise OcclabError(f"kernel_size must be at least the stride 2, got {self.kernel_size}")
        if self.beta < 0:
            raise OcclabError(f"beta must be non-negative, got {self.beta}")
        if self.norm not in NORMS:
            raise OcclabError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not 0.0 < self.restart_decay < 1.0:
            raise OcclabError(f"restart_decay must be in (0, 1), got {self.restart_decay}")
        if self.restart_threshold < 0:
            raise OcclabError(f"restart_threshold must be non-negative, got {self.restart_threshold}")

    @property
    def input_sizes(self) -> dict[str, int]:
        """{"t": T, "x": X, "y": Y, "z": Z} of the input sequence."""
        return dict(zip(AXES, (self.frames, *self.grid)))

    @property
    def latent_sizes(self) -> dict[str, int]:
        """{"t": T', "x": X', "y": Y'} of the token grid (Z is folded into channels, so no z axis)."""
        return {a: n // r for a, n, r in zip("txy", (self.frames, *self.grid[:2]), self.downsample)}

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(D, T', X', Y') of the quantised latent of one sequence."""
        return (self.code_dim, *self.latent_sizes.values())

    @property
    def tokens(self) -> int:
        """Tokens per sequence, T' * X' * Y'."""
        return math.prod(self.latent_sizes.values())

    def compression_ratio(self) -> float:
        """Input voxels / latent floats, a token counting as its D code floats (DESIGN §4; 64 at nuScenes)."""
        from occlab.metrics.recon import compression_ratio as _compression_ratio  # the one definition of the kit

        return _compression_ratio(list(self.input_sizes.values()), [self.latent_shape])

    def compression_ratio_tokens(self) -> float:
        """Input voxels per token (8192 at nuScenes, T = 32); no paper table prints either ratio for OccSora."""
        return math.prod(self.input_sizes.values()) / self.tokens


# ---------------------------------------------------------------------------------------------------------
# Size presets
# ---------------------------------------------------------------------------------------------------------

def occsora_paper(geometry_grid=(200, 200, 16), frames: int = 32, **kw) -> OccSoraConfig:
    """The released sizes (hidden 512, 4 residual blocks x 2 heads, rates 8, 8, 8, E 8, codebook 512 x 128)."""
    return OccSoraConfig(grid=tuple(geometry_grid), frames=frames, **kw)


def occsora_small(geometry_grid=(32, 32, 8), frames: int = 8, **kw) -> OccSoraConfig:
    """Study size: hidden 128, 2 residual blocks, rates 4, 8, 8 (two stride-2 steps in T so that T = 4 works; a
    32x32, T = 8 crop gives a 2 x 4 x 4 token grid), codebook 512 x 128 and E 8 as released. C.R. 16 at any T,
    next to DynamicCity's and SEP-4D's 15.5 at the study size (at CarlaSC the paper sizes give 32 against 23)."""
    kw = {"hidden": 128, "res_blocks": 2, "downsample": (4, 8, 8), **kw}
    return OccSoraConfig(grid=tuple(geometry_grid), frames=frames, **kw)


def occsora_tiny(geometry_grid=(16, 16, 8), frames: int = 4, **kw) -> OccSoraConfig:
    """Smallest working sizes, for unit tests and smoke runs (E 4, hidden 32, 1 block, rates 2, 4, 4, codes 64 x 16)."""
    kw = {"embed_dim": 4, "hidden": 32, "res_blocks": 1, "downsample": (2, 4, 4), "codebook_size": 64,
          "code_dim": 16, **kw}
    return OccSoraConfig(grid=tuple(geometry_grid), frames=frames, **kw)


PRESETS = {"paper": occsora_paper, "small": occsora_small, "tiny": occsora_tiny}


# ---------------------------------------------------------------------------------------------------------
# Convolution and attention blocks
# ---------------------------------------------------------------------------------------------------------

def make_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm3d (released) or GroupNorm with up to 32 groups."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _same_pads(kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[tuple[int, int]]:
    """'Same' padding (left, right) per axis: k - s in total, the extra cell on the left (released SamePadConv3d)."""
    return [((k - s) // 2 + (k - s) % 2, (k - s) // 2) for k, s in zip(kernel, stride)]


class SamePadConv3d(nn.Module):
    """Conv3d whose output is input / stride per axis; symmetric pads go into the conv, asymmetric ones into F.pad."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride=1, bias: bool = True):
        super().__init__()
        kernel = (kernel_size,) * 3
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        pads = _same_pads(kernel, stride)
        symmetric = all(a == b for a, b in pads)
        self.pad = None if symmetric else tuple(p for pair in reversed(pads) for p in pair)  # F.pad: last axis first
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, bias=bias,
                              padding=tuple(a for a, _ in pads) if symmetric else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C_in, T, X, Y)
        if self.pad is not None:
            x = F.pad(x, self.pad)  # zeros, (k - s) per axis
        return self.conv(x)  # (N, C_out, T/sT, X/sX, Y/sY)


class SamePadConvTranspose3d(nn.Module):
    """ConvTranspose3d whose output is input * stride per axis, cropped as the released SamePadConvTranspose3d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride=1, bias: bool = True):
        super().__init__()
        kernel = (kernel_size,) * 3
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        # released: pad the input by the 'same' pads, then crop k - 1 cells per side of the full output; that is a
        # crop of (k - 1 - left * s) on the left and the rest of the k - s extra cells on the right of the unpadded one
        crops = []
        for k, s, (left, _) in zip(kernel, stride, _same_pads(kernel, stride)):
            lo = k - 1 - left * s
            crops.append((lo, k - s - lo))
        common = tuple(min(lo, hi) for lo, hi in crops)
        self.crop = tuple((lo - c, hi - c) for (lo, hi), c in zip(crops, common))
        self.convt = nn.ConvTranspose3d(in_channels, out_channels, kernel, stride=stride, padding=common, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C_in, T, X, Y)
        x = self.convt(x)  # (N, C_out, ~T*sT, ~X*sX, ~Y*sY)
        if any(lo or hi for lo, hi in self.crop):
            x = x[(..., *(slice(lo, x.shape[2 + i] - hi) for i, (lo, hi) in enumerate(self.crop)))]
        return x  # (N, C_out, T*sT, X*sX, Y*sY)


class AxialAttention3d(nn.Module):
    """Sum of three multi-head self-attentions, each along one axis (t, x or y) of a (N, C, T, X, Y) volume."""

    # one sequence per line of cells along the attended axis
    SEQUENCES: ClassVar[dict[str, str]] = {"t": "(n x y) t c", "x": "(n t y) x c", "y": "(n t x) y c"}

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.ModuleDict({a: Attention(dim, heads) for a in "txy"})  # fused qkv (no bias), proj (bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, T, X, Y)
        N, _, T, X, Y = x.shape
        out = 0
        for axis, attn in self.attn.items():
            seq = rearrange(x, f"n c t x y -> {self.SEQUENCES[axis]}")  # (N * others, L_axis, C)
            out = out + rearrange(attn(seq), f"{self.SEQUENCES[axis]} -> n c t x y", n=N, t=T, x=X, y=Y)
        return out  # (N, C, T, X, Y)


class AttentionResidualBlock(nn.Module):
    """x + [norm, ReLU, 3^3 conv C -> C/2, norm, ReLU, 1^3 conv C/2 -> C, norm, ReLU, axial attention](x)."""

    def __init__(self, channels: int, heads: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(
            make_norm(norm, channels),
            nn.ReLU(),
            SamePadConv3d(channels, channels // 2, 3, bias=False),
            make_norm(norm, channels // 2),
            nn.ReLU(),
            SamePadConv3d(channels // 2, channels, 1, bias=False),
            make_norm(norm, channels),
            nn.ReLU(),
            AxialAttention3d(channels, heads),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, T, X, Y)
        return x + self.body(x)  # (N, C, T, X, Y)


def stride_steps(rates: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Strides of the successive stride-2 steps: every step halves the axes still to be reduced, e.g.
    (2, 4, 4) -> [(2, 2, 2), (1, 2, 2)]."""
    steps = [int(math.log2(r)) for r in rates]
    return [tuple(2 if s > i else 1 for s in steps) for i in range(max(steps))]


# ---------------------------------------------------------------------------------------------------------
# Encoder, quantiser, decoder
# ---------------------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """(B, Z*E, T, X, Y) -> (B, D, T', X', Y'): strided convs + ReLU, 3^3 conv, residual blocks, norm, ReLU, 1x1s."""

    def __init__(self, cfg: OccSoraConfig):
        super().__init__()
        H, K = cfg.hidden, cfg.kernel_size
        in_channels = cfg.grid[2] * cfg.embed_dim
        self.downs = nn.ModuleList(SamePadConv3d(in_channels if i == 0 else H, H, K, stride=s)
                                   for i, s in enumerate(stride_steps(cfg.downsample)))
        self.conv_last = SamePadConv3d(H, H, 3)
        self.res = nn.Sequential(*[AttentionResidualBlock(H, cfg.heads, cfg.norm) for _ in range(cfg.res_blocks)],
                                 make_norm(cfg.norm, H), nn.ReLU())
        # released: pre_vq_conv (H -> D) followed by the quantiser's own quant_conv (D -> D), both 1x1
        self.to_code = nn.Sequential(SamePadConv3d(H, cfg.code_dim, 1), SamePadConv3d(cfg.code_dim, cfg.code_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Z*E, T, X, Y)
        for down in self.downs:
            x = F.relu(down(x))  # (B, H, T/2.., X/2.., Y/2..)
        x = self.res(self.conv_last(x))  # (B, H, T', X', Y')
        return self.to_code(x)  # (B, D, T', X', Y')


def perplexity(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp(entropy) of the code histogram of `indices` (a scalar tensor, no host synchronisation)."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()  # (K,)
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-10))).sum())


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> dict:
    """{"perplexity": exp(entropy) of the code histogram, "dead_codes": codes never used, "used": codes used}.

    Uniform use of 4 of 8 codes gives perplexity 4, 4 dead, 4 used; a collapsed codebook has perplexity 1.
    """
    counts = torch.bincount(indices.reshape(-1).long().cpu(), minlength=codebook_size)
    used = int((counts > 0).sum())
    return {"perplexity": float(perplexity(indices.long().cpu(), codebook_size)), "dead_codes": codebook_size - used,
            "used": used}


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantiser with a straight-through estimator, in fp32 whatever the autocast.

    Loss as the VQ-VAE paper: mean((z_q - sg(z))^2) (codebook) + beta * mean((sg(z_q) - z)^2) (commitment), sg the
    stop-gradient; the codebook is a plain learned parameter (no EMA), as released.

    Dead-code restart (ours, off by default as the release has none): every code keeps an EMA (decay
    `restart_decay`) of how many tokens it received per training step; after a training step has been quantised,
    codes unused in it whose EMA is below `restart_threshold` are re-seeded with randomly drawn encoder outputs of
    the batch (their EMA reset to 1) for the next steps; the current step's quantisation is never affected, and the
    re-seeded rows get no gradient from it. Under DDP rank 0's codebook is then broadcast. The EMA counts tokens, so
    with fewer tokens per step than codes many codes are idle by construction: lower the threshold or raise the
    decay then. Adam's moments of a re-seeded row are kept.
    """

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 1.0, dead_code_restart: bool = False,
                 restart_decay: float = 0.9, restart_threshold: float = 0.05):
        super().__init__()
        self.codebook_size, self.code_dim, self.beta = codebook_size, code_dim, beta
        self.dead_code_restart, self.restart_decay, self.restart_threshold = (dead_code_restart, restart_decay,
                                                                              restart_threshold)
        self.codebook = nn.Embedding(codebook_size, code_dim)  # (K, D)
        self.register_buffer("usage", torch.ones(codebook_size))  # EMA of tokens per step, per code

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared L2) of each row of flat (N, D) -> (N,) long."""
        w = self.codebook.weight.detach().float()  # (K, D)
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ w.t() + w.pow(2).sum(1)  # (N, K)
        return d.argmin(1)  # (N,)

    @torch.no_grad()
    def _restart(self, idx: torch.Tensor, flat: torch.Tensor) -> None:
        """Update the usage EMA with this step's assignments idx (N,); re-seed the codes unused now whose EMA is below
        the threshold with random rows of flat (N, D). No host synchronisation. The codebook is not saved for
        backward (the embedding look-up needs only the indices), so the in-place update is safe."""
        counts = torch.bincount(idx, minlength=self.codebook_size).to(self.usage.dtype)  # (K,)
        self.usage.mul_(self.restart_decay).add_(counts, alpha=1 - self.restart_decay)
        dead = (self.usage < self.restart_threshold) & (counts == 0)  # (K,)
        picks = flat[torch.randint(flat.shape[0], (self.codebook_size,), device=flat.device)]  # (K, D)
        w = self.codebook.weight
        w.copy_(torch.where(dead[:, None], picks.to(w.dtype), w))
        self.usage.copy_(torch.where(dead, torch.ones_like(self.usage), self.usage))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(w, 0)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of indices (B, T', X', Y') -> (B, D, T', X', Y')."""
        return rearrange(self.codebook(indices), "b t x y d -> b d t x y")

    def forward(self, z: torch.Tensor) -> dict:  # (B, D, T', X', Y')
        """-> {"latent": z_q with straight-through gradient (B, D, T', X', Y'), "indices": (B, T', X', Y') long,
        "vq_loss": scalar, "perplexity": scalar}."""
        B, _, T, X, Y = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            flat = rearrange(z, "b d t x y -> (b t x y) d")  # (N, D)
            idx = self.nearest(flat.detach())  # (N,)
            z_q = F.embedding(idx, self.codebook.weight.float())  # (N, D), gradient to the codebook only
            codebook_loss = F.mse_loss(z_q, flat.detach())
            commitment_loss = F.mse_loss(flat, z_q.detach())
            z_q = flat + (z_q - flat).detach()  # straight-through: forward z_q, gradient to z
            if self.training and self.dead_code_restart:
                self._restart(idx, flat.detach())  # for the next steps
        indices = idx.view(B, T, X, Y)
        return {
            "latent": rearrange(z_q, "(b t x y) d -> b d t x y", b=B, t=T, x=X, y=Y),  # (B, D, T', X', Y')
            "indices": indices,  # (B, T', X', Y')
            "vq_loss": codebook_loss + self.beta * commitment_loss,
            "perplexity": perplexity(idx, self.codebook_size),
        }


class Decoder(nn.Module):
    """(B, D, T', X', Y') -> (B, Z*E, T, X, Y): 1x1 convs, residual blocks, norm, ReLU, transposed convs + ReLU."""

    def __init__(self, cfg: OccSoraConfig):
        super().__init__()
        H, K = cfg.hidden, cfg.kernel_size
        out_channels = cfg.grid[2] * cfg.embed_dim
        # released: the quantiser's post_quant_conv (D -> D) followed by post_vq_conv (D -> H), both 1x1
        self.from_code = nn.Sequential(SamePadConv3d(cfg.code_dim, cfg.code_dim, 1), SamePadConv3d(cfg.code_dim, H, 1))
        self.res = nn.Sequential(*[AttentionResidualBlock(H, cfg.heads, cfg.norm) for _ in range(cfg.res_blocks)],
                                 make_norm(cfg.norm, H), nn.ReLU())
        steps = stride_steps(cfg.downsample)
        self.ups = nn.ModuleList(SamePadConvTranspose3d(H, out_channels if i == len(steps) - 1 else H, K, stride=s)
                                 for i, s in enumerate(steps))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, D, T', X', Y')
        h = self.res(self.from_code(z))  # (B, H, T', X', Y')
        for i, up in enumerate(self.ups):
            h = up(h)  # (B, H or Z*E, T*2.., X*2.., Y*2..)
            if i < len(self.ups) - 1:
                h = F.relu(h)
        return h  # (B, Z*E, T, X, Y)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

class OccSora(nn.Module):
    """VQ-VAE tokenizer: encode(labels) -> tokens, decode(latent) / decode_indices(tokens) -> logits."""

    def __init__(self, config: OccSoraConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.embedding = nn.Embedding(cfg.num_classes, cfg.embed_dim)  # input embedding and tied output head
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.dead_code_restart,
                                         cfg.restart_decay, cfg.restart_threshold)
        self.decoder = Decoder(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        """Explicit init, as released: class embedding N(0, 1); codebook U(-1/K, 1/K); attention q, k, v and output
        weights N(0, 1/dim) (VideoGPT, one layer); every conv keeps PyTorch's default, norms weight 1 / bias 0."""
        nn.init.normal_(self.embedding.weight, std=1.0)
        K = self.config.codebook_size
        nn.init.uniform_(self.quantizer.codebook.weight, -1.0 / K, 1.0 / K)
        for m in self.modules():
            if isinstance(m, Attention):
                dim = m.proj.weight.shape[0]
                nn.init.normal_(m.qkv.weight, std=dim ** -0.5)
                nn.init.normal_(m.proj.weight, std=dim ** -0.5)

    def _check(self, labels: torch.Tensor) -> None:
        cfg = self.config
        if labels.dim() != 5 or tuple(labels.shape[1:]) != (cfg.frames, *cfg.grid):
            raise OcclabError(f"OccSora expects labels (B, {cfg.frames}, {', '.join(map(str, cfg.grid))}), "
                              f"got {tuple(labels.shape)}")

    def encode(self, labels: torch.Tensor) -> dict:
        """labels (B, T, X, Y, Z) integer in [0, classes) -> {latent (B, D, T', X', Y') quantised with a
        straight-through gradient, z (the encoder output before quantisation), indices (B, T', X', Y'), vq_loss,
        perplexity}."""
        self._check(labels)
        h = self.embedding(labels.long())  # (B, T, X, Y, Z, E)
        h = rearrange(h, "b t x y z e -> b (z e) t x y")  # (B, Z*E, T, X, Y): height folded into channels
        z = self.encoder(h)  # (B, D, T', X', Y')
        return {"z": z, **self.quantizer(z)}

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Quantised latent (B, D, T', X', Y') -> logits (B, classes, T, X, Y, Z), channels first (F.cross_entropy)."""
        h = self.decoder(latent)  # (B, Z*E, T, X, Y)
        h = rearrange(h, "b (z e) t x y -> b t x y z e", z=self.config.grid[2])  # (B, T, X, Y, Z, E)
        logits = h @ self.embedding.weight.t().to(h.dtype)  # (B, T, X, Y, Z, K): tied class embedding
        return logits.movedim(-1, 1)  # (B, K, T, X, Y, Z)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T', X', Y') long -> logits (B, classes, T, X, Y, Z)."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, labels: torch.Tensor) -> dict:
        """labels (B, T, X, Y, Z) -> {logits (B, K, T, X, Y, Z), vq_loss, indices, perplexity, latent, z}."""
        enc = self.encode(labels)
        return {"logits": self.decode(enc["latent"]), **enc}



def model_info(config: OccSoraConfig) -> dict:
    """Parameter counts, latent shape [D, T', X', Y'], tokens and compression ratios."""
    model = OccSora(config)  # 0.5 GB at the paper size; not on the meta device (see dynamiccity.model_info)
    return {
        "model": "occsora",
        "parameters": count_parameters(model),
        "parameters_by_part": {n: count_parameters(m) for n, m in model.named_children()},
        "input_shape": list(config.input_sizes.values()),
        "latent_shape": list(config.latent_shape),
        "latent_floats": math.prod(config.latent_shape),
        "latent_tokens": config.tokens,
        "compression_ratio": config.compression_ratio(),
        "compression_ratio_tokens": config.compression_ratio_tokens(),
        "config": asdict(config),
    }


__all__ = ["OccSora", "OccSoraConfig", "PRESETS", "RELEASED_PARAMS_NUSCENES", "VectorQuantizer", "codebook_usage",
           "model_info", "occsora_paper", "occsora_small", "occsora_tiny", "perplexity"]
