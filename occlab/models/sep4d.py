"""SEP-4D (Gao et al., AAAI 2026): a structure-equivalent-prior 4D occupancy VAE, written from the paper (no code).

labels (B, T, X, Y, Z) -> f_theta per frame (B, Ce, T, X', Y', Z') -> six planes -> a Gaussian per plane
(Eq. 7-8) -> fusion g_theta (Eq. 9-10) -> latent z (B, C, X', Y', Z'*T') -> time expansion (Eq. 11) ->
multi-layer residual 3D transposed-conv decoder -> logits (B, classes, T, X, Y, Z).
Primes mark reduced sizes: T' = T/dT, X' = X/dX, Y' = Y/dY, Z' = Z/dZ.

Where the paper is vague, the choice made here and why:
- f_theta: Embedding(classes, Ce), a 3^3 conv, residual blocks and stride-2 conv downsampling per axis rate
  (the blocks of occlab.models.blocks, as DynamicCity's backbone): the paper says only "a shared 3D convolutional
  feature extractor" per frame, and this keeps the encoders of the two papers comparable.
- Planar factorisation PF (Eq. 6): the paper does not say how a plane is obtained from S_txyz. Chosen:
  attention pooling over the two missing axes, per channel (softmax of a learned Linear(Ce, Ce) score over the
  reduced cells). Its score is zero-initialised, so PF starts as plain average pooling (DynamicCity's
  `avgpool`) and learns where to look; it costs no transformer (DynamicCity's projection module is its
  costliest part).
- E_k (Eq. 7): a 3x3 conv, LeakyReLU, then a conv head to (mu, logvar); on the time planes the head has
  kernel = stride = (dT, 1), so the t axis is reduced by dT there (the paper states no rates; DynamicCity's
  rates (dT, dX, dY, dZ) are kept so the compression ratios of the two models are computed alike).
  z = mu + eps * sigma in training, mu in eval (as DynamicCity).
- g_theta (Eq. 10), `fusion="sep"`: MLP(sum_k phi_k (x) P_k over xy, xz, yz ; sum_k psi_k (.) P_k over tx, ty,
  tz). Read literally: (x) is an outer product, so phi_k is a vector along plane k's missing axis m and
  phi_k (x) P_k lifts the plane to a 3D volume; (.) is a Hadamard product, so psi_k has the plane's own shape.
  "Geometry-aware attention weights": both are computed from the scene's spatial geometry, the profile g_a
  (B, C, n_a) of each spatial axis a (the mean of the spatial planes containing a over their other axis):
  phi_k = n_m * softmax_m(Linear(g_m)) (attention over the missing axis; mean 1), psi_{ta} =
  2 * sigmoid(1x1 conv([P_ta ; g_a broadcast over t])) (the temporal plane gated by the spatial structure at the
  same position, the SEP "time follows structure"). Both projections are zero-initialised: at init phi = psi = 1
  and g_theta is the MLP of the plain broadcast sums. The 3D spatial term is broadcast over t, concatenated with
  the 4D spatio-temporal term and a 2-layer GELU MLP (2C -> fusion_hidden -> C) is applied at every cell of
  (T', X', Y', Z'). Its first layer on the concatenation is computed exactly as W_s a + sum_k W_t (psi_k P_k),
  W_t applied on the planes before broadcasting, so the 2C-wide 4D tensor is never built.
- z: C = latent_channels (the paper's C), stored as (B, C, X', Y', Z'*T') with the frames outer on the last
  axis ("x y (t z)": every latent frame is a contiguous Z' slab), as the paper's R^{C x X x Y x ZT}.
- Compression ratio: input voxels / floats of the Gaussian bottleneck. For the planar encoder that is the six
  sampled planes (z is a deterministic function of them, so storing z would add nothing): the same
  count as DynamicCity's, e.g. 23.14 at CarlaSC, T = 16, C = 16, rates 2,2,2,2. For `conv3d_se` it is the dense
  latent C x X' x Y' x Z'T' itself: dT*dX*dY*dZ / C, i.e. 1.0 at rates 2,2,2,2 and C = 16 (no compression at the
  paper's C; the ablation compares encoders, set a smaller latent_channels to compare at equal ratio).
- Decoder (Eq. 11): "expand the channel dimension of z to match T x C x X x Y x Z" is read as a 1x1 conv
  C -> dT * W0 split into dT frames (channel-to-time, a pixel shuffle along t). Then per frame, at each
  resolution level, `decoder_blocks` pre-activation residual blocks (InstanceNorm, LeakyReLU, 3^3 conv, twice;
  last conv zero-initialised, so every block starts as the identity), and a 3D transposed conv
  (kernel = stride = 2 on the axes still reduced) between levels; norm, LeakyReLU, 1x1 conv to the logits.
  Widths per level are `widths` = (width at the grid reduced x4, x2, x1), the levels present set by max(dX, dY, dZ).
  No positional encoding: the paper mentions none.
- Ablation fusions (Tab. 3; the text names "Conv1D fusion, MLP fusion, simple averaging, dynamic weighting",
  the table Concate, Conv Fusion, Averaging, Dynamic Weighting: the table's names are used). Every one maps the
  same six sampled planes to the same z, so only the fusion differs: `concat` = Linear(6C -> C) on the
  concatenated broadcast planes (Eq. 2 with (+) = concatenation, projected back to C; computed per plane,
  exact); `conv` = the concatenation through one 3^3 Conv3d (6C -> C) per latent frame; `average` = mean of the
  six broadcast planes (no parameters); `dynamic` = per-cell softmax weights over the six planes from a
  Linear(6C -> 6) of the concatenation (zero-initialised: starts as `average`).
- Encoder ablation (Tab. 4, "3D Conv + SEBlock", no planes), `encoder="conv3d_se"`: the same f_theta with a
  squeeze-excitation block after every residual block, a residual temporal conv (kernel 3 along t) and a
  Gaussian conv head with kernel = stride = dT along t, giving the dense latent z directly; `fusion` is unused.
  mu and logvar are then single-entry dicts {"volume": (B, C, X', Y', Z'T')}.

Size. The paper gives no parameter count; it trains on two A6000s at batch 1-2 with training times of 0.8-1.2x
DynamicCity's at every T (Tab. 1) and compares at DynamicCity's CarlaSC setting, i.e. it implies a VAE of
DynamicCity's scale (the released one: 1.70 M parameters, C = 16, rates 2,2,2,2). The `paper` preset is
chosen to match DynamicCity's compute rather than its parameter count: C = 16, rates 2,2,2,2, Ce = 16, MLP 64,
decoder 128 at the reduced grid and 32 at the full grid (DynamicCity's conv_hidden_low/high_res), one residual
block per level. At CarlaSC, T = 16, 11 classes: 1,041,355 parameters (DynamicCity released: 1,699,191) and
406 GMAC per forward pass of one sequence (DynamicCity paper preset: 405 GMAC; torch FlopCounterMode).
Two blocks per level (`decoder_blocks=2`) give 1.98 M parameters at 754 GMAC.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from einops import rearrange

from occlab import planes as P
from occlab.classes import NUM_CLASSES_CARLASC
from occlab.errors import OcclabError
from occlab.models.blocks import LEAKY_SLOPE, DownBlock3d, InstanceNorm3d, ResidualBlock3d, count_parameters

AXES = P.HEXPLANE_AXES  # "txyz"
PLANES = P.axis_pairs(AXES)  # ["tx", "ty", "tz", "xy", "xz", "yz"]
SPATIAL = ("xy", "xz", "yz")  # S_spatial of Eq. 10
TEMPORAL = ("tx", "ty", "tz")  # S_spatio-temporal of Eq. 10
FUSIONS = ("sep", "concat", "conv", "average", "dynamic")
ENCODERS = ("planar", "conv3d_se")
RATES = (1, 2, 4)
VOLUME = "volume"  # the single mu/logvar entry of the conv3d_se encoder


@dataclass
class Sep4DConfig:
    """All sizes of a SEP-4D VAE. Defaults: the `paper` preset at CarlaSC, T = 16."""

    num_classes: int = NUM_CLASSES_CARLASC  # free + 10 (12 with bicycle for Occ3D sets)
    frames: int = 16  # T
    grid: tuple[int, int, int] = (128, 128, 8)  # X, Y, Z
    latent_channels: int = 16  # C of every Gaussian plane and of z
    rates: tuple[int, int, int, int] = (2, 2, 2, 2)  # dT, dX, dY, dZ, each in {1, 2, 4}
    fusion: str = "sep"  # g_theta: "sep" (Eq. 10) | "concat" | "conv" | "average" | "dynamic" (Tab. 3)
    encoder: str = "planar"  # "planar" (planar factorisation) | "conv3d_se" (Tab. 4 baseline, no planes)
    encoder_channels: int = 16  # Ce: width of f_theta and of the planes before their Gaussian
    fusion_hidden: int = 64  # hidden width of g_theta's MLP
    widths: tuple[int, int, int] = (128, 128, 32)  # decoder width at the grid reduced x4, x2, x1 (full)
    decoder_blocks: int = 1  # residual blocks per decoder level
    se_reduction: int = 4  # squeeze-excitation bottleneck Ce / r (conv3d_se only)
    vae: bool = True  # Gaussian latents (False: plain autoencoder, mu and logvar None)

    def __post_init__(self):
        self.grid = tuple(int(v) for v in self.grid)
        self.rates = tuple(int(v) for v in self.rates)
        self.widths = tuple(int(v) for v in self.widths)
        if len(self.grid) != 3:
            raise OcclabError(f"Sep4DConfig.grid must be (X, Y, Z), got {self.grid}")
        if len(self.rates) != 4 or any(r not in RATES for r in self.rates):
            raise OcclabError(f"Sep4DConfig.rates must be (dT, dX, dY, dZ), each one of {RATES}, got {self.rates}")
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise OcclabError(f"Sep4DConfig.widths must be three positive decoder widths (grid reduced x4, x2, x1), "
                              f"got {self.widths}")
        for name, value, allowed in (("fusion", self.fusion, FUSIONS), ("encoder", self.encoder, ENCODERS)):
            if value not in allowed:
                raise OcclabError(f"Sep4DConfig.{name} must be one of {allowed}, got {value!r}")
        if self.num_classes < 2:
            raise OcclabError(f"Sep4DConfig.num_classes must be at least 2, got {self.num_classes}")
        for name in ("frames", "latent_channels", "encoder_channels", "fusion_hidden", "decoder_blocks",
                     "se_reduction"):
            if int(getattr(self, name)) < 1:
                raise OcclabError(f"Sep4DConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if min(self.grid) < 1:
            raise OcclabError(f"Sep4DConfig.grid must be positive, got {self.grid}")
        try:
            latent = self.latent_sizes
        except OcclabError as e:
            raise OcclabError(f"Sep4DConfig.rates {self.rates} must divide (frames, *grid) = "
                              f"{(self.frames, *self.grid)}: {e}") from None
        if latent["x"] * latent["y"] * latent["z"] < 2:
            raise OcclabError(f"Sep4DConfig.rates {self.rates} reduce a frame of {self.grid} to a single cell "
                              f"(instance norm needs 2); use a larger grid or smaller rates")

    @property
    def input_sizes(self) -> dict[str, int]:
        """{"t": T, "x": X, "y": Y, "z": Z} of the input sequence."""
        return dict(zip(AXES, (self.frames, *self.grid)))

    @property
    def volume_sizes(self) -> dict[str, int]:
        """Sizes of f_theta's feature sequence S_txyz (X, Y, Z reduced, T kept)."""
        return P.reduce_sizes(self.input_sizes, dict(zip("xyz", self.rates[1:])))

    @property
    def latent_sizes(self) -> dict[str, int]:
        """Sizes of the latent axes (every axis reduced by its rate): T', X', Y', Z'."""
        return P.reduce_sizes(self.input_sizes, dict(zip(AXES, self.rates)))

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Shape of the fused latent z per sample: (C, X', Y', Z' * T')."""
        s = self.latent_sizes
        return (self.latent_channels, s["x"], s["y"], s["z"] * s["t"])

    def plane_shapes(self) -> dict[str, tuple[int, int, int]]:
        """{name: shape} of the Gaussian latents: six planes (C, a, b), or {"volume": latent_shape} for conv3d_se."""
        if self.encoder == "conv3d_se":
            return {VOLUME: self.latent_shape}
        return {n: (self.latent_channels, *ab) for n, ab in P.plane_shapes(self.latent_sizes, AXES).items()}

    def latent_floats(self) -> int:
        """Floats per sample of the Gaussian bottleneck (the denominator of the compression ratio)."""
        return sum(math.prod(s) for s in self.plane_shapes().values())

    def compression_ratio(self) -> float:
        """Input voxels / latent floats (DESIGN §4), e.g. 23.14 for the planes at CarlaSC, T=16, C=16, rates 2."""
        if self.encoder == "planar":
            return P.compression_ratio(self.input_sizes, self.latent_sizes, self.latent_channels, AXES)
        return math.prod(self.input_sizes.values()) / self.latent_floats()


# ---------------------------------------------------------------------------------------------------------
# Size presets
# ---------------------------------------------------------------------------------------------------------

def sep4d_paper(geometry_grid=(128, 128, 8), frames: int = 16, **kw) -> Sep4DConfig:
    """DynamicCity's scale (module docstring): C 16, Ce 16, MLP 64, decoder 128/128/32, 1 block; 1.04 M at CarlaSC."""
    return Sep4DConfig(grid=tuple(geometry_grid), frames=frames, **kw)


def sep4d_small(geometry_grid=(32, 32, 8), frames: int = 8, **kw) -> Sep4DConfig:
    """Half the paper widths (C 8, Ce 8, MLP 32, decoder 64/64/16, 1 block): 0.26 M parameters.

    One Adam step (CE + Lovasz + KL) at 32x32x8, T = 8, batch 1, fp32 on the 2-core CPU, which other jobs kept
    busy (load 3-5), median of 5 after 2 warm-up steps: 0.39-0.45 s of CPU time per step with 1 thread (0.45-0.6 s
    wall); DynamicCity small by the same measure 0.73 s, whose unloaded 2-thread wall time is 0.375 s
    (benchmarks/README.md), so about 0.2 s is expected here unloaded with 2 threads.
    """
    kw = {"latent_channels": 8, "encoder_channels": 8, "fusion_hidden": 32, "widths": (64, 64, 16),
          "decoder_blocks": 1, **kw}
    return Sep4DConfig(grid=tuple(geometry_grid), frames=frames, **kw)


def sep4d_tiny(geometry_grid=(16, 16, 8), frames: int = 4, **kw) -> Sep4DConfig:
    """Smallest working widths, for unit tests and smoke runs (C 4, Ce 8, MLP 16, decoder 16/16/8)."""
    kw = {"latent_channels": 4, "encoder_channels": 8, "fusion_hidden": 16, "widths": (16, 16, 8),
          "decoder_blocks": 1, **kw}
    return Sep4DConfig(grid=tuple(geometry_grid), frames=frames, **kw)


PRESETS = {"paper": sep4d_paper, "small": sep4d_small, "tiny": sep4d_tiny}


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------

def channel_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear to the channel axis 1 of (B, C, *spatial) -> (B, C_out, *spatial)."""
    return layer(x.movedim(1, -1)).movedim(-1, 1)


def plane_view(p: torch.Tensor, name: str, axes: str = AXES) -> torch.Tensor:
    """(B, C, a, b) -> a broadcastable view over `axes`, e.g. "ty" over "txyz": (B, C, T, 1, Y, 1)."""
    shape = [p.shape[2 + name.index(a)] if a in name else 1 for a in axes]
    return p.reshape(*p.shape[:2], *shape)


def spatial_profiles(planes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """g_a (B, C, n_a) of each spatial axis: the spatial planes containing a, averaged over their other axis."""
    xy, xz, yz = planes["xy"], planes["xz"], planes["yz"]  # (B, C, X, Y), (B, C, X, Z), (B, C, Y, Z)
    return {"x": (xy.mean(3) + xz.mean(3)) / 2,  # (B, C, X)
            "y": (xy.mean(2) + yz.mean(3)) / 2,  # (B, C, Y)
            "z": (xz.mean(2) + yz.mean(2)) / 2}  # (B, C, Z)


# ---------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------

class SqueezeExcite3d(nn.Module):
    """Squeeze-excitation: x * sigmoid(Linear(ReLU(Linear(mean over X, Y, Z of x)))), per channel."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, X, Y, Z)
        gate = torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4))))  # (N, C)
        return x * gate[:, :, None, None, None]  # (N, C, X, Y, Z)


class FrameEncoder(nn.Module):
    """f_theta: Embedding, 3^3 conv, residual block, then per stride-2 step a down conv + residual block
    (each followed by squeeze-excitation when `se_reduction`): labels (B*T, X, Y, Z) -> (B*T, Ce, X', Y', Z')."""

    def __init__(self, num_classes: int, channels: int, rates: tuple[int, int, int], se_reduction: int = 0):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, channels)
        self.conv_in = nn.Conv3d(channels, channels, 3, padding=1, padding_mode="replicate")

        def res() -> nn.Module:
            block = ResidualBlock3d(channels)
            return nn.Sequential(block, SqueezeExcite3d(channels, se_reduction)) if se_reduction else block

        self.res_in = res()
        steps = [int(math.log2(r)) for r in rates]  # stride-2 steps per axis
        self.down = nn.ModuleList()
        for i in range(max(steps)):
            factors = tuple(2 if s > i else 1 for s in steps)  # halve the axes still to be reduced
            self.down.append(nn.Sequential(DownBlock3d(channels, factors), res()))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # (N, X, Y, Z) integer
        x = rearrange(self.embedding(labels), "n x y z c -> n c x y z")  # (N, Ce, X, Y, Z)
        x = self.res_in(self.conv_in(x))  # (N, Ce, X, Y, Z)
        for step in self.down:
            x = step(x)  # (N, Ce, X/2.., Y/2.., Z/2..)
        return x  # (N, Ce, X', Y', Z')


class PlanarFactorization(nn.Module):
    """PF (Eq. 6): S_txyz (B, Ce, T, X', Y', Z') -> six planes (B, Ce, a, b), each by per-channel attention
    pooling over its two missing axes (softmax of a Linear score; zero-initialised, i.e. average pooling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.score = nn.ModuleDict({n: nn.Linear(channels, channels) for n in PLANES})

    def forward(self, vol: torch.Tensor) -> dict[str, torch.Tensor]:  # (B, Ce, T, X', Y', Z')
        vol = rearrange(vol, "b c t x y z -> b t x y z c")  # channels last for the Linear scores
        planes = {}
        for name in PLANES:
            reduced = " ".join(a for a in AXES if a not in name)
            h = rearrange(vol, f"b t x y z c -> b {name[0]} {name[1]} ({reduced}) c")  # (B, a, b, n, Ce)
            w = self.score[name](h).softmax(dim=-2)  # (B, a, b, n, Ce): attention over the n reduced cells
            planes[name] = rearrange((w * h).sum(dim=-2), "b i j c -> b c i j")  # (B, Ce, a, b)
        return planes


class PlaneGaussian(nn.Module):
    """E_k (Eq. 7-8): 3x3 conv, LeakyReLU, head (kernel = stride = (dT, 1) on time planes) -> z, mu, logvar."""

    def __init__(self, in_channels: int, out_channels: int, t_rate: int, vae: bool):
        super().__init__()
        self.vae = vae
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1, padding_mode="replicate")
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.head = nn.Conv2d(in_channels, (2 if vae else 1) * out_channels, kernel_size=(t_rate, 1),
                              stride=(t_rate, 1))

    def forward(self, p: torch.Tensor):  # (B, Ce, a, b)
        h = self.head(self.act(self.conv(p)))  # (B, 2C or C, a / rate, b)
        if not self.vae:
            return h, None, None
        mu, logvar = h.chunk(2, dim=1)  # (B, C, a', b) each
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu  # Eq. 8
        return z, mu, logvar  # (B, C, a', b) x 3


class PlanarEncoder(nn.Module):
    """labels (B, T, X, Y, Z) -> six Gaussian planes {tx, ty, tz, xy, xz, yz: (B, C, a, b)} at the latent sizes."""

    def __init__(self, cfg: Sep4DConfig):
        super().__init__()
        Ce, C, dT = cfg.encoder_channels, cfg.latent_channels, cfg.rates[0]
        self.vae = cfg.vae
        self.frames = FrameEncoder(cfg.num_classes, Ce, cfg.rates[1:])
        self.factorize = PlanarFactorization(Ce)
        self.gaussians = nn.ModuleDict({n: PlaneGaussian(Ce, C, dT if "t" in n else 1, cfg.vae) for n in PLANES})

    def forward(self, labels: torch.Tensor) -> dict:  # (B, T, X, Y, Z)
        B = labels.shape[0]
        h = self.frames(rearrange(labels, "b t x y z -> (b t) x y z"))  # (B*T, Ce, X', Y', Z')
        planes = self.factorize(rearrange(h, "(b t) c x y z -> b c t x y z", b=B))  # {name: (B, Ce, a, b)}
        out = {"planes": {}, "mu": {}, "logvar": {}}
        for name in PLANES:
            out["planes"][name], out["mu"][name], out["logvar"][name] = self.gaussians[name](planes[name])
        if not self.vae:
            return {"planes": out["planes"], "mu": None, "logvar": None}
        return out  # planes, mu, logvar: {name: (B, C, a', b')} each


class VolumeEncoder(nn.Module):
    """Tab. 4 baseline "3D Conv + SEBlock" (no planes): f_theta with squeeze-excitation, a residual temporal conv,
    a Gaussian head reducing t by dT -> the dense latent z (B, C, X', Y', Z'T') directly."""

    def __init__(self, cfg: Sep4DConfig):
        super().__init__()
        Ce, C, dT = cfg.encoder_channels, cfg.latent_channels, cfg.rates[0]
        self.vae = cfg.vae
        self.frames = FrameEncoder(cfg.num_classes, Ce, cfg.rates[1:], se_reduction=cfg.se_reduction)
        self.temporal = nn.Conv3d(Ce, Ce, (3, 1, 1), padding=(1, 0, 0), padding_mode="replicate")  # along t only
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.head = nn.Conv3d(Ce, (2 if cfg.vae else 1) * C, kernel_size=(dT, 1, 1), stride=(dT, 1, 1))

    def forward(self, labels: torch.Tensor) -> dict:  # (B, T, X, Y, Z)
        B = labels.shape[0]
        h = self.frames(rearrange(labels, "b t x y z -> (b t) x y z"))  # (B*T, Ce, X', Y', Z')
        X = h.shape[2]
        h = rearrange(h, "(b t) c x y z -> b c t (x y) z", b=B)  # (B, Ce, T, X'Y', Z')
        h = self.head(self.act(h + self.temporal(h)))  # (B, 2C or C, T', X'Y', Z')
        h = rearrange(h, "b c t (x y) z -> b c x y (t z)", x=X)  # (B, 2C or C, X', Y', Z'T')
        if not self.vae:
            return {"planes": {VOLUME: h}, "mu": None, "logvar": None}
        mu, logvar = h.chunk(2, dim=1)  # (B, C, X', Y', Z'T') each
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {"planes": {VOLUME: z}, "mu": {VOLUME: mu}, "logvar": {VOLUME: logvar}}


# ---------------------------------------------------------------------------------------------------------
# Fusion g_theta: six sampled planes {name: (B, C, a, b)} -> (B, C, T', X', Y', Z')
# ---------------------------------------------------------------------------------------------------------

class SepFusion(nn.Module):
    """Eq. 10: MLP([sum_k phi_k (x) P_k over xy, xz, yz (3D) ; sum_k psi_k (.) P_k over tx, ty, tz (4D)])."""

    def __init__(self, cfg: Sep4DConfig):
        super().__init__()
        C, H = cfg.latent_channels, cfg.fusion_hidden
        self.phi = nn.ModuleDict({n: nn.Linear(C, C) for n in SPATIAL})  # g_m -> attention logits along m
        self.psi = nn.ModuleDict({n: nn.Conv2d(2 * C, C, 1) for n in TEMPORAL})  # [P_ta ; g_a] -> gate
        self.fc_spatial = nn.Linear(C, H)  # first MLP layer, spatial half of the 2C input
        self.fc_temporal = nn.Linear(C, H, bias=False)  # first MLP layer, spatio-temporal half
        self.act = nn.GELU()
        self.fc_out = nn.Linear(H, C)

    def spatial(self, planes: dict[str, torch.Tensor], g: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_k phi_k (x) P_k: each spatial plane lifted to 3D by an attention profile along its missing axis."""
        vol = 0
        for name, pattern in (("xy", "bcxy,bcz->bcxyz"), ("xz", "bcxz,bcy->bcxyz"), ("yz", "bcyz,bcx->bcxyz")):
            m = next(a for a in "xyz" if a not in name)  # the missing axis
            phi = channel_linear(self.phi[name], g[m]).softmax(dim=-1) * g[m].shape[-1]  # (B, C, n_m), mean 1
            vol = vol + torch.einsum(pattern, planes[name], phi)  # (B, C, X', Y', Z')
        return vol

    def temporal(self, planes: dict[str, torch.Tensor], g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """psi_k (.) P_k: each time plane gated by the spatial profile of its spatial axis."""
        out = {}
        for name in TEMPORAL:
            p, prof = planes[name], g[name[1]]  # (B, C, T', n_a), (B, C, n_a)
            cond = torch.cat([p, prof[:, :, None].expand_as(p)], dim=1)  # (B, 2C, T', n_a)
            out[name] = 2 * torch.sigmoid(self.psi[name](cond)) * p  # (B, C, T', n_a)
        return out

    def forward(self, planes: dict[str, torch.Tensor]) -> torch.Tensor:
        g = spatial_profiles(planes)  # {a: (B, C, n_a)}
        a = rearrange(self.spatial(planes, g), "b c x y z -> b 1 x y z c")  # (B, 1, X', Y', Z', C)
        h = self.fc_spatial(a)  # (B, 1, X', Y', Z', H): broadcast over t
        for name, q in self.temporal(planes, g).items():
            q = self.fc_temporal(rearrange(q, "b c t n -> b t n c"))  # (B, T', n_a, H)
            h = h + plane_view(q.movedim(-1, 1), name).movedim(1, -1)  # (B, T', X', Y', Z', H)
        z = self.fc_out(self.act(h))  # (B, T', X', Y', Z', C)
        return rearrange(z, "b t x y z c -> b c t x y z")  # (B, C, T', X', Y', Z')


class ConcatFusion(nn.Module):
    """Tab. 3 "Concate": Linear(6C -> C) on the concatenated broadcast planes, as sum_k W_k P_k + b (exact)."""

    def __init__(self, cfg: Sep4DConfig):
        super().__init__()
        C = cfg.latent_channels
        self.proj = nn.ModuleDict({n: nn.Linear(C, C, bias=False) for n in PLANES})  # the 6 blocks of W
        self.bias = nn.Parameter(torch.zeros(C))

    def forward(self, planes: dict[str, torch.Tensor]) -> torch.Tensor:
        projected = {n: channel_linear(self.proj[n], planes[n]) for n in PLANES}  # (B, C, a, b)
        vol = P.expand(projected, AXES, op="sum")  # (B, C, T', X', Y', Z')
        return vol + self.bias[:, None, None, None, None]


class ConvFusion(nn.Module):
    """Tab. 3 "Conv Fusion": the six broadcast planes concatenated (6C) through a 3^3 Conv3d to C, per latent frame."""

    def __init__(self, cfg: Sep4DConfig):
        super().__init__()
        C = cfg.latent_channels
        self.conv = nn.Conv3d(6 * C, C, 3, padding=1)

    def forward(self, planes: dict[str, torch.Tensor]) -> torch.Tensor:
        sizes = P.sizes_of(planes, AXES)
        views = [plane_view(planes[n], n).expand(-1, -1, *sizes.values()) for n in PLANES]  # (B, C, T', X', Y', Z')
        h = rearrange(torch.cat(views, dim=1), "b c t x y z -> (b t) c x y z")  # (B*T', 6C, X', Y', Z')
        return rearrange(self.conv(h), "(b t) c x y z -> b c t x y z", t=sizes["t"])  # (B, C, T', X', Y', Z')


class AverageFusion(nn.Module):
    """Tab. 3 "Averaging": the mean of the six broadcast planes (no parameters)."""

    def __init__(self, cfg: Sep4DConfig):
        super().__init__()

    def forward(self, planes: dict[str, torch.Tensor]) -> torch.Tensor:
        return P.expand(planes, AXES, op="sum") / len(PLANES)  # (B, C, T', X', Y', Z')


class DynamicFusion(nn.Module):
    """Tab. 3 "Dynamic Weighting": per-cell softmax weights over the six planes from Linear(6C -> 6) of their
    concatenation (computed per plane, exact; zero-initialised, i.e. averaging at init)."""

    def __init__(self, cfg: Sep4DConfig):
        super().__init__()
        C = cfg.latent_channels
        self.score = nn.ModuleDict({n: nn.Linear(C, len(PLANES), bias=False) for n in PLANES})
        self.bias = nn.Parameter(torch.zeros(len(PLANES)))

    def forward(self, planes: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = {n: channel_linear(self.score[n], planes[n]) for n in PLANES}  # (B, 6, a, b)
        logits = P.expand(scores, AXES, op="sum") + self.bias[:, None, None, None, None]  # (B, 6, T', X', Y', Z')
        w = logits.softmax(dim=1)
        return sum(w[:, k:k + 1] * plane_view(planes[n], n) for k, n in enumerate(PLANES))  # (B, C, T', X', Y', Z')


FUSION_MODULES = {"sep": SepFusion, "concat": ConcatFusion, "conv": ConvFusion, "average": AverageFusion,
                  "dynamic": DynamicFusion}


# ---------------------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------------------

class ResBlock3d(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x)))))), 3^3 convs; the last conv zero-init."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            InstanceNorm3d(channels, affine=True),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv3d(channels, channels, 3, padding=1),
            InstanceNorm3d(channels, affine=True),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv3d(channels, channels, 3, padding=1),
        )

    @property
    def conv_out(self) -> nn.Conv3d:
        return self.body[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, W, X, Y, Z)
        return x + self.body(x)  # (N, W, X, Y, Z)


class TimeExpansion(nn.Module):
    """Eq. 11: z (B, C, X', Y', Z'T') -> (B*T, W, X', Y', Z'): 1x1 conv C -> dT*W, channels split into dT frames."""

    def __init__(self, channels: int, width: int, t_rate: int, latent_frames: int):
        super().__init__()
        self.t_rate, self.latent_frames = t_rate, latent_frames
        self.proj = nn.Conv3d(channels, t_rate * width, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, X', Y', Z'T')
        h = rearrange(z, "b c x y (t z) -> (b t) c x y z", t=self.latent_frames)  # (B*T', C, X', Y', Z')
        h = self.proj(h)  # (B*T', dT*W, X', Y', Z')
        return rearrange(h, "n (r w) x y z -> (n r) w x y z", r=self.t_rate)  # (B*T, W, X', Y', Z'), t = t'*dT + r


class Decoder(nn.Module):
    """Multi-layer residual decoder: z -> time expansion -> per level residual blocks, 2x transposed conv -> logits."""

    def __init__(self, cfg: Sep4DConfig):
        super().__init__()
        dT, spatial = cfg.rates[0], cfg.rates[1:]
        self.cfg = cfg
        logs = [int(math.log2(r)) for r in spatial]
        steps = max(logs)  # x2 upsampling steps (0, 1 or 2)
        widths = cfg.widths[2 - steps:]  # the levels present: reduced x2^steps ... full
        self.expand = TimeExpansion(cfg.latent_channels, widths[0], dT, cfg.latent_sizes["t"])
        self.levels = nn.ModuleList([nn.Sequential(*[ResBlock3d(w) for _ in range(cfg.decoder_blocks)])
                                     for w in widths])
        self.ups = nn.ModuleList()
        for j in range(steps):  # mirror of the encoder: the axes reduced most are restored first
            factors = tuple(2 if s >= steps - j else 1 for s in logs)
            self.ups.append(nn.ConvTranspose3d(widths[j], widths[j + 1], kernel_size=factors, stride=factors))
        self.head = nn.Sequential(InstanceNorm3d(widths[-1], affine=True), nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
                                  nn.Conv3d(widths[-1], cfg.num_classes, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, X', Y', Z'T')
        B = z.shape[0]
        h = self.expand(z)  # (B*T, W0, X', Y', Z')
        for j, level in enumerate(self.levels):
            h = level(h)  # (B*T, Wj, ...)
            if j < len(self.ups):
                h = self.ups[j](h)  # (B*T, Wj+1, 2x on the axes being restored)
        logits = self.head(h)  # (B*T, K, X, Y, Z)
        return rearrange(logits, "(b t) k x y z -> b k t x y z", b=B)  # (B, K, T, X, Y, Z)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

class Sep4D(nn.Module):
    """SEP-4D VAE: encode(labels) -> planes + fused latent z, decode(z) -> logits (B, classes, T, X, Y, Z)."""

    def __init__(self, config: Sep4DConfig):
        super().__init__()
        self.config = config
        planar = config.encoder == "planar"
        self.encoder = PlanarEncoder(config) if planar else VolumeEncoder(config)
        self.fusion = FUSION_MODULES[config.fusion](config) if planar else None  # conv3d_se: z from the encoder
        self.decoder = Decoder(config)
        self.initialize_weights()

    def initialize_weights(self):
        """Explicit init. Zero: the PF attention scores (average pooling at init), g_theta's phi and psi
        projections (phi = psi = 1: plain broadcast sums), the dynamic-weighting scores (averaging), the last
        conv of every decoder residual block (identity). Every other conv/linear keeps PyTorch's default
        (Kaiming-uniform), the embedding N(0, 1), norms weight 1 / bias 0."""

        def zero(m: nn.Module):
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

        if isinstance(self.encoder, PlanarEncoder):
            for m in self.encoder.factorize.score.values():
                zero(m)
        if isinstance(self.fusion, SepFusion):
            for m in [*self.fusion.phi.values(), *self.fusion.psi.values()]:
                zero(m)
        if isinstance(self.fusion, DynamicFusion):
            for m in self.fusion.score.values():
                zero(m)
            nn.init.zeros_(self.fusion.bias)
        for level in self.decoder.levels:
            for block in level:
                zero(block.conv_out)

    def _check(self, labels: torch.Tensor):
        cfg = self.config
        if labels.dim() != 5 or tuple(labels.shape[1:]) != (cfg.frames, *cfg.grid):
            raise OcclabError(f"SEP-4D expects labels (B, {cfg.frames}, {', '.join(map(str, cfg.grid))}), "
                              f"got {tuple(labels.shape)}")

    def fuse(self, planes: dict[str, torch.Tensor]) -> torch.Tensor:
        """g_theta: {name: (B, C, a, b)} -> z (B, C, X', Y', Z'T'); conv3d_se: {"volume": z} -> z."""
        if self.fusion is None:
            return planes[VOLUME]
        return rearrange(self.fusion(planes), "b c t x y z -> b c x y (t z)")  # (B, C, X', Y', Z'T')

    def encode(self, labels: torch.Tensor) -> dict:
        """labels (B, T, X, Y, Z) integer in [0, classes) -> {planes, mu, logvar: {name: tensor}, latent: z}."""
        self._check(labels)
        enc = self.encoder(labels.long())
        return {**enc, "latent": self.fuse(enc["planes"])}

    def decode(self, latent) -> torch.Tensor:
        """z (B, C, X', Y', Z'T') (or a dict of planes, fused first) -> logits (B, classes, T, X, Y, Z)."""
        if isinstance(latent, dict):
            latent = self.fuse(latent)
        return self.decoder(latent)

    def forward(self, labels: torch.Tensor) -> dict:
        """labels (B, T, X, Y, Z) -> {logits (B, K, T, X, Y, Z), planes, mu, logvar, latent}."""
        enc = self.encode(labels)
        return {"logits": self.decoder(enc["latent"]), **enc}



def model_info(config: Sep4DConfig) -> dict:
    """Parameter counts, latent shapes (name -> [C, a, b]) and compression ratio (keys as DynamicCity's)."""
    model = Sep4D(config)
    return {
        "model": "sep4d",
        "parameters": count_parameters(model),
        "parameters_by_part": {
            **{f"encoder.{n}": count_parameters(m) for n, m in model.encoder.named_children()},
            "fusion": count_parameters(model.fusion),
            "decoder": count_parameters(model.decoder),
        },
        "input_shape": list(config.input_sizes.values()),
        "plane_shapes": {n: list(s) for n, s in config.plane_shapes().items()},
        "latent_floats": config.latent_floats(),
        "compression_ratio": config.compression_ratio(),
        "config": asdict(config),
    }


__all__ = ["FUSIONS", "ENCODERS", "PRESETS", "Sep4D", "Sep4DConfig", "model_info", "sep4d_paper", "sep4d_small",
           "sep4d_tiny"]
