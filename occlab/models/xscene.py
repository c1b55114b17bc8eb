"""X-Scene triplane VAE (Yang et al., 2025), the occupancy branch's autoencoder only (no diffusion), written from
the paper (§3.2 Eq. 2, App. A.2) and checked against the released code (github.com/yuyang-cloud/X-Scene,
xscene/occ_vae).

labels (B, X, Y, Z) -> planes xy, xz, yz (B, C, a, b) -> logits at query points (B, classes, N), or on the whole
grid (B, classes, X, Y, Z) decoded in chunks of `chunk` points.

Windows of the shared trainer, labels (B, T, X, Y, Z) (static scenes: T = 1): every frame is one static scene
(frames folded into the batch, planes (B*T, C, a, b)). In training mode the model draws its own query points
(`sample_queries`, from torch's global RNG, which the trainer seeds) and returns {"logits": (B, K, T*N),
"targets": (B, T*N), planes, mu, logvar}, which the shared OccupancyLoss scores; in eval mode it decodes the
whole grid, logits (B, K, T, X, Y, Z), as the trainer's `evaluate` expects.

Encoder: Embedding(classes, C); 3^3 conv, residual block, then per stride-2 step a (2, 2, 1) strided conv and a
residual block (x, y reduced by `downsample`, z kept); mean over the missing axis of every plane; a parameter-free
InstanceNorm and tanh(0.5 h); optional Gaussian head per plane (`vae`).
Decoder: per-plane residual conv blocks C -> W; at each query point q = (x, y, z) either the triplane deformable
attention of Eq. 2 (`deformable`: per plane, K sampling points at proj(q) + offsets, softmax weights, offsets and
weights linear in a sin/cos encoding PE(q), offsets zero at init) or the ablation (`bilinear`: one bilinear
sample per plane), the three plane features summed; [feature, PE(q)] into a skip-concat MLP -> class logits.

Where the paper is vague, the choice and the reason:
- Encoder and widths: not in the paper; as released (conv width = C = 16, kernel 3, replicate padding,
  InstanceNorm without affine, LeakyReLU 0.1; plane width W = 64; MLP 256 wide, 4 hidden layers with the input
  concatenated again half-way; PE with 6 frequencies, sin(2^f q) then cos(2^f q) for f = 0..5 -> 36 channels).
  At Occ3D (200x200x16, downsample 2, C 16, 18 classes, no VAE) ours has exactly the released parameter count
  (RELEASED_PARAMS_OCC3D, counted by instantiating the released modules).
- "Grouped triplane residual blocks": released as one Conv2d with groups=3 over the three planes zero-padded to
  a common size and stacked on channels; each group sees one plane only and the padding equals a conv's zero
  padding, so it is exactly one residual block per plane (3x3 conv, InstanceNorm(affine), SiLU, zero-init 3x3
  conv, + 1x1 shortcut when widths differ). The paper describes no cross-plane mixing in the VAE decoder and the
  released grouped conv has none, so there is none here (`plane_blocks` stacks more blocks; released 1).
- Offsets and weights: one Linear(PE -> 2K) and one Linear(PE -> K) per plane, as Eq. 2 (W_o, W_w); offsets in
  normalised plane units ([-1, 1] spans the plane), added to the projection before grid_sample; the paper's
  W_o[k] in R^{2xD} are rows 2k, 2k+1 of that Linear. Eq. 2 has no bias; the released Linears (kept) have one.
- Query coordinates: voxel centres (2i + 1) / n - 1 (`planes.voxel_centres`), the convention of grid_sample with
  align_corners=False, so a voxel centre and the same point on the downsampled plane coincide. The released code
  normalises with 2i / (n - 1) - 1 but samples with align_corners=False (a half-cell drift at the borders).
- VAE head: the paper names a "triplane-VAE" without details. The released VAE path (off in its documented
  training command) mixes the planes through a padded rollout with conv and axial attention before a per-plane
  conv to (mu, logvar); here `vae` adds the kit's per-plane Linear(C, 2C) Gaussian head on the tanh-bounded
  planes, so that the shared KL applies; without it the planes are the latent and mu/logvar are None.
- Training queries (`sample_queries`): as the released data loader, every occupied voxel, then every free voxel
  within Euclidean distance 2 of an occupied one, then far free voxels, up to N points (released 200,000), each
  group in random order; N = min(query_points, X*Y*Z) so that every scene of a batch has the same count (the
  released code pads short scenes by repeating occupied voxels; here a grid smaller than N is queried whole).
  Ignored voxels (IGNORE) are read as free by the encoder (released) and never chosen before a valid voxel.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from occlab import planes as P
from occlab.classes import FREE, IGNORE
from occlab.errors import OcclabError
from occlab.models.blocks import DownBlock3d, GaussianHead, InstanceNorm2d, ResidualBlock3d, count_parameters

AXES = P.TRIPLANE_AXES  # "xyz"
PLANES = P.axis_pairs(AXES)  # ["xy", "xz", "yz"]
DECODERS = ("deformable", "bilinear")
DOWNSAMPLE = (2, 4)
NUM_CLASSES_OCC3D_RAW = 18  # free + the 17 Occ3D-nuScenes classes (X-Scene Tab. 2 "17", released num_class 18)

# Parameter count of the released AutoEncoderGroupSkip at Occ3D-nuScenes (num_class 18, geo_feat_channels 16,
# feat_channel_up 64, MLP 256 x 4, xy_down_times 2, use_deform_attn, pos, no VAE), counted by instantiating the
# released modules (xscene/occ_vae/networks).
RELEASED_PARAMS_OCC3D = 498_822


@dataclass
class XSceneVAEConfig:
    """All sizes of an X-Scene triplane VAE. Defaults: the paper's Occ3D-nuScenes configuration (App. A.2)."""

    num_classes: int = NUM_CLASSES_OCC3D_RAW  # 18 raw Occ3D (17 + free); 12 for occlab's mapped Occ3D labels
    grid: tuple[int, int, int] = (200, 200, 16)  # X, Y, Z
    latent_channels: int = 16  # C of every plane (and of the 3D encoder)
    downsample: int = 2  # x, y reduced by 2 (triplane 100x100x16) or 4 (50x50x16); z kept
    decoder: str = "deformable"  # "deformable" (Eq. 2) | "bilinear" (ablation, Tab. 6)
    points: int = 4  # K sampling points per plane
    plane_channels: int = 64  # W: plane width inside the decoder (released feat_channel_up)
    plane_blocks: int = 1  # residual blocks per plane (released 1)
    mlp_hidden: int = 256  # released mlp_hidden_channels
    mlp_layers: int = 4  # released mlp_hidden_layers; even: half before, half after the skip concatenation
    pe_freqs: int = 6  # sin/cos frequencies of (x, y, z) -> 6 * pe_freqs = 36 channels
    vae: bool = True  # Gaussian per plane (False: the planes are the latent, mu/logvar None)
    chunk: int = 65536  # query points per decoding chunk (full grid: 640,000 points at Occ3D)
    query_points: int = 200_000  # training queries per scene (released max_points)
    query_near: float = 2.0  # free voxels within this Euclidean distance (voxels) of an occupied one are "near"

    def __post_init__(self):
        self.grid = tuple(int(v) for v in self.grid)
        if len(self.grid) != 3 or any(v < 1 for v in self.grid):
            raise OcclabError(f"grid must be three positive sizes (X, Y, Z), got {self.grid}")
        if self.num_classes < 2:
            raise OcclabError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.downsample not in DOWNSAMPLE:
            raise OcclabError(f"downsample must be one of {DOWNSAMPLE}, got {self.downsample}")
        if self.decoder not in DECODERS:
            raise OcclabError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        for name in ("latent_channels", "points", "plane_channels", "plane_blocks", "mlp_hidden", "pe_freqs",
                     "chunk", "query_points"):
            if int(getattr(self, name)) < 1:
                raise OcclabError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.mlp_layers < 2 or self.mlp_layers % 2:
            raise OcclabError(f"mlp_layers must be even and at least 2, got {self.mlp_layers}")
        if self.query_near < 1:
            raise OcclabError(f"query_near must be at least 1 voxel, got {self.query_near}")
        X, Y, _ = self.grid
        if X % self.downsample or Y % self.downsample:
            raise OcclabError(f"grid {self.grid}: X and Y must be divisible by downsample {self.downsample}")
        small = [n for n, (a, b) in P.plane_shapes(self.latent_sizes, AXES).items() if a * b < 2]
        if small:
            raise OcclabError(f"grid {self.grid}: planes {small} would hold a single cell (instance norm needs 2)")

    @property
    def input_sizes(self) -> dict[str, int]:
        """{"x": X, "y": Y, "z": Z}."""
        return dict(zip(AXES, self.grid))

    @property
    def latent_sizes(self) -> dict[str, int]:
        """Triplane sizes: x and y divided by `downsample`, z kept."""
        return P.reduce_sizes(self.input_sizes, {"x": self.downsample, "y": self.downsample})

    @property
    def pe_channels(self) -> int:
        """Channels of the sin/cos encoding of a query point (36 as released)."""
        return 2 * self.pe_freqs * len(AXES)

    def plane_shapes(self) -> dict[str, tuple[int, int, int]]:
        """{plane: (C, a, b)} of the latent triplane."""
        return {n: (self.latent_channels, *ab) for n, ab in P.plane_shapes(self.latent_sizes, AXES).items()}

    def compression_ratio(self) -> float:
        """Input voxels / latent floats (DESIGN §4), e.g. Occ3D, downsample 2, C 16: 640000 / 211200 = 3.03."""
        return P.compression_ratio(self.input_sizes, self.latent_sizes, self.latent_channels, AXES)


# ---------------------------------------------------------------------------------------------------------
# Size presets
# ---------------------------------------------------------------------------------------------------------

# Every preset takes (grid, frames, **overrides) as the model registry calls them. `frames` is accepted and not
# stored: the model is static and treats each frame of a window as its own scene (train it with frames = 1).

def _frames(frames: int | None) -> None:
    if frames is not None and int(frames) < 1:
        raise OcclabError(f"frames must be at least 1, got {frames}")


def xscene_paper(grid=(200, 200, 16), frames: int | None = None, **kw) -> XSceneVAEConfig:
    """The paper's sizes (Occ3D: triplane 100x100x16 with downsample 2, C 16, W 64, MLP 256 x 4, K 4)."""
    _frames(frames)
    return XSceneVAEConfig(grid=tuple(grid), **kw)


def xscene_small(grid=(32, 32, 8), frames: int | None = None, **kw) -> XSceneVAEConfig:
    """Same architecture at half the widths (C 8, W 32, MLP 128 x 4)."""
    _frames(frames)
    kw = {"latent_channels": 8, "plane_channels": 32, "mlp_hidden": 128, "query_points": 4096, **kw}
    return XSceneVAEConfig(grid=tuple(grid), **kw)


def xscene_tiny(grid=(16, 16, 8), frames: int | None = None, **kw) -> XSceneVAEConfig:
    """Smallest working widths, for unit tests and smoke runs (C 4, W 16, MLP 32 x 2, 4 PE frequencies)."""
    _frames(frames)
    kw = {"latent_channels": 4, "plane_channels": 16, "mlp_hidden": 32, "mlp_layers": 2, "pe_freqs": 4,
          "chunk": 1024, "query_points": 1024, **kw}
    return XSceneVAEConfig(grid=tuple(grid), **kw)


PRESETS = {"paper": xscene_paper, "small": xscene_small, "tiny": xscene_tiny}


# ---------------------------------------------------------------------------------------------------------
# Query points
# ---------------------------------------------------------------------------------------------------------

def sincos_encoding(coords: torch.Tensor, freqs: int) -> torch.Tensor:
    """(..., A) -> (..., 2 * freqs * A): for f = 0..freqs-1, sin(2^f c) then cos(2^f c) (released order)."""
    parts = []
    for f in range(freqs):
        parts += [torch.sin((2.0 ** f) * coords), torch.cos((2.0 ** f) * coords)]
    return torch.cat(parts, dim=-1)


def near_surface(occupied: torch.Tensor, distance: float) -> torch.Tensor:
    """(B, X, Y, Z) bool -> cells within Euclidean `distance` (voxels) of an occupied cell, the cell included."""
    r = math.floor(distance)
    ticks = torch.arange(-r, r + 1, device=occupied.device, dtype=torch.float32)
    d2 = sum(t ** 2 for t in torch.meshgrid(ticks, ticks, ticks, indexing="ij"))  # (2r+1,)^3 squared distances
    ball = (d2 <= distance ** 2).float()[None, None]  # (1, 1, 2r+1, 2r+1, 2r+1)
    hits = F.conv3d(occupied.float().unsqueeze(1), ball, padding=r)  # (B, 1, X, Y, Z) occupied cells in the ball
    return hits.squeeze(1) > 0.5


def sample_queries(labels: torch.Tensor, generator: torch.Generator | None = None, num_points: int = 200_000,
                   near: float = 2.0, free: int = FREE, ignore: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """Training query points as the released loader: occupied voxels, then near free, then far free voxels.

    labels: (B, X, Y, Z) integer. Per scene N = min(num_points, X*Y*Z) voxels are taken in order of preference:
    every occupied voxel (not free, not ignored), then every free voxel within Euclidean distance `near` of an
    occupied one, then the other free voxels, then ignored ones (target `ignore`, skipped by the loss); each
    group in random order drawn from `generator` (the same generator state gives the same points).
    Returns coords (B, N, 3) normalised voxel centres (`planes.voxel_centres`) and targets (B, N) long.
    """
    B, X, Y, Z = labels.shape
    n = min(int(num_points), X * Y * Z)
    is_free = labels == free
    occupied = ~is_free & (labels != ignore)
    group = torch.full(labels.shape, 3.0, dtype=torch.float64, device=labels.device)  # ignored voxels last
    group[is_free] = 2.0  # far free
    group[is_free & near_surface(occupied, near)] = 1.0  # free near a surface
    group[occupied] = 0.0
    device = generator.device if generator is not None else labels.device
    keys = torch.rand((B, X * Y * Z), generator=generator, device=device, dtype=torch.float64)  # [0, 1)
    order = torch.argsort(group.flatten(1) + keys.to(labels.device), dim=1)[:, :n]  # (B, N): groups, random inside
    centres = P.voxel_centres({"x": X, "y": Y, "z": Z}, AXES, device=labels.device)  # (X*Y*Z, 3)
    return centres[order], labels.flatten(1).gather(1, order).long()  # (B, N, 3), (B, N)


# ---------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------

class TriplaneBackbone(nn.Module):
    """3^3 conv in, residual block, then per stride-2 step a (2, 2, 1) down conv + residual block (z kept)."""

    def __init__(self, channels: int, downsample: int):
        super().__init__()
        self.conv_in = nn.Conv3d(channels, channels, 3, padding=1, padding_mode="replicate")
        self.res_in = ResidualBlock3d(channels)
        steps = int(math.log2(downsample))
        self.down = nn.ModuleList(
            [nn.Sequential(DownBlock3d(channels, (2, 2, 1)), ResidualBlock3d(channels)) for _ in range(steps)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, X, Y, Z)
        x = self.res_in(self.conv_in(x))  # (B, C, X, Y, Z)
        for step in self.down:
            x = step(x)  # (B, C, X/2.., Y/2.., Z)
        return x  # (B, C, X/d, Y/d, Z)


class TriplaneEncoder(nn.Module):
    """labels (B, X, Y, Z) -> {planes, mu, logvar}: {xy, xz, yz: (B, C, a, b)} (mu, logvar None without VAE)."""

    def __init__(self, cfg: XSceneVAEConfig):
        super().__init__()
        C = cfg.latent_channels
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.num_classes, C)
        self.backbone = TriplaneBackbone(C, cfg.downsample)
        self.norm = InstanceNorm2d(C)  # no parameters, shared by the planes (released)
        if cfg.vae:
            self.gaussians = nn.ModuleDict({n: GaussianHead(C) for n in PLANES})

    def forward(self, labels: torch.Tensor) -> dict:
        cfg = self.cfg
        if tuple(labels.shape[1:]) != cfg.grid or labels.dim() != 4:
            raise OcclabError(f"X-Scene expects labels (B, {', '.join(map(str, cfg.grid))}), got {tuple(labels.shape)}")
        labels = torch.where(labels == IGNORE, FREE, labels).long()  # ignored voxels read as free (released)
        h = rearrange(self.embedding(labels), "b x y z c -> b c x y z")  # (B, C, X, Y, Z)
        vol = self.backbone(h)  # (B, C, X', Y', Z)
        planes = {}
        for name in PLANES:
            (missing,) = [a for a in AXES if a not in name]
            p = vol.mean(dim=2 + AXES.index(missing))  # (B, C, a, b): mean over the axis the plane lacks
            planes[name] = torch.tanh(0.5 * self.norm(p))  # (B, C, a, b) in (-1, 1)
        if not cfg.vae:
            return {"planes": planes, "mu": None, "logvar": None}
        out = {"planes": {}, "mu": {}, "logvar": {}}
        for name in PLANES:
            z, mu, logvar = self.gaussians[name](planes[name])  # (B, C, a, b) x 3
            out["planes"][name], out["mu"][name], out["logvar"][name] = z, mu, logvar
        return out


# ---------------------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------------------

class PlaneResBlock(nn.Module):
    """3x3 conv, InstanceNorm(affine), SiLU, zero-init 3x3 conv, + shortcut (1x1 conv if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = InstanceNorm2d(out_channels, eps=1e-6, affine=True)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        nn.init.zeros_(self.conv_out.weight)  # released zero_module: the block starts as its shortcut
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, a, b)
        return self.shortcut(x) + self.conv_out(self.act(self.norm(self.conv_in(x))))  # (B, C_out, a, b)


class TriplaneResBlocks(nn.Module):
    """`plane_blocks` residual blocks per plane, C -> W then W -> W (released: one grouped conv block)."""

    def __init__(self, cfg: XSceneVAEConfig):
        super().__init__()
        C, W = cfg.latent_channels, cfg.plane_channels
        self.blocks = nn.ModuleDict({n: nn.Sequential(*[PlaneResBlock(C if i == 0 else W, W)
                                                        for i in range(cfg.plane_blocks)]) for n in PLANES})

    def forward(self, planes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # {name: (B, C, a, b)}
        return {n: self.blocks[n](planes[n]) for n in PLANES}  # {name: (B, W, a, b)}


def plane_reference(coords: torch.Tensor, name: str) -> torch.Tensor:
    """(B, N, 3) points -> (B, N, 2) their projection on plane `name`, in the plane's (a, b) axis order."""
    return coords[..., [AXES.index(name[0]), AXES.index(name[1])]]


class TriplaneDeformableAttention(nn.Module):
    """Eq. 2: per plane, K bilinear samples at proj(q) + offsets(PE(q)), softmax(W_w PE(q)) weights; planes summed."""

    def __init__(self, pe_channels: int, points: int):
        super().__init__()
        self.points = points
        self.weights = nn.ModuleDict({n: nn.Linear(pe_channels, points) for n in PLANES})  # W_w
        self.offsets = nn.ModuleDict({n: nn.Linear(pe_channels, 2 * points) for n in PLANES})  # W_o
        for layer in self.offsets.values():  # zero offsets at init: every sample starts at the reference point
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, planes: dict[str, torch.Tensor], coords: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        """planes {name: (B, W, a, b)}, coords (B, N, 3) in [-1, 1], pe (B, N, D) -> features (B, N, W)."""
        out = 0
        for name in PLANES:
            attn = self.weights[name](pe).softmax(dim=-1)  # (B, N, K)
            offsets = rearrange(self.offsets[name](pe), "b n (k two) -> b n k two", two=2)  # (B, N, K, 2) in (a, b)
            loc = plane_reference(coords, name).unsqueeze(2) + offsets  # (B, N, K, 2) in (a, b)
            grid = loc.flip(-1).to(planes[name].dtype)  # grid_sample reads (column, row) = (b, a)
            feats = F.grid_sample(planes[name], grid, mode="bilinear", padding_mode="border",
                                  align_corners=False)  # (B, W, N, K)
            out = out + torch.einsum("bwnk,bnk->bnw", feats, attn.to(feats.dtype))  # (B, N, W)
        return out


class SkipMLP(nn.Module):
    """Point MLP: layers/2 + 1 Linear-ReLU, concatenate the input again, layers/2 Linear-ReLU, Linear to logits."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, layers: int):
        super().__init__()
        first: list[nn.Module] = [nn.Linear(in_channels, hidden), nn.ReLU(inplace=True)]
        for _ in range(layers // 2):
            first += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
        second: list[nn.Module] = [nn.Linear(in_channels + hidden, hidden), nn.ReLU(inplace=True)]
        for _ in range(layers // 2 - 1):
            second += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
        second.append(nn.Linear(hidden, out_channels))
        self.first, self.second = nn.Sequential(*first), nn.Sequential(*second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        return self.second(torch.cat([x, self.first(x)], dim=-1))  # (B, N, K)


class TriplaneDecoder(nn.Module):
    """planes -> per-plane residual blocks -> features at query points (deformable or bilinear) + PE -> MLP."""

    def __init__(self, cfg: XSceneVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.plane_blocks = TriplaneResBlocks(cfg)
        if cfg.decoder == "deformable":
            self.sampler = TriplaneDeformableAttention(cfg.pe_channels, cfg.points)
        self.mlp = SkipMLP(cfg.plane_channels + cfg.pe_channels, cfg.num_classes, cfg.mlp_hidden, cfg.mlp_layers)

    def features(self, planes: dict[str, torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
        """Decoder planes {name: (B, W, a, b)}, coords (B, N, 3) -> [summed plane features, PE] (B, N, W + D)."""
        pe = sincos_encoding(coords, self.cfg.pe_freqs).to(planes[PLANES[0]].dtype)  # (B, N, D)
        if self.cfg.decoder == "deformable":
            feats = self.sampler(planes, coords, pe)  # (B, N, W)
        else:
            feats = P.sample(planes, coords, AXES, op="sum").transpose(1, 2)  # (B, N, W)
        return torch.cat([feats, pe], dim=-1)  # (B, N, W + D)

    def forward(self, planes: dict[str, torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
        """Latent planes {name: (B, C, a, b)}, coords (B, N, 3) -> logits (B, classes, N), `chunk` points at a time."""
        planes = self.plane_blocks(planes)  # (B, W, a, b), once for every chunk
        logits = [self.mlp(self.features(planes, c)) for c in coords.split(self.cfg.chunk, dim=1)]  # (B, n, K)
        return torch.cat(logits, dim=1).transpose(1, 2)  # (B, K, N)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

class XSceneVAE(nn.Module):
    """Triplane VAE: encode(labels) -> planes; decode(planes, coords) -> logits at points or on the whole grid."""

    def __init__(self, config: XSceneVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = TriplaneEncoder(config)
        self.decoder = TriplaneDecoder(config)
        self.initialize_weights()

    def initialize_weights(self):
        """Explicit init, as released: the deformable offsets zero and the plane blocks' last conv zero (done in
        their modules, re-asserted here); every other conv/linear keeps PyTorch's default (Kaiming-uniform), the
        embedding N(0, 1), norms weight 1 / bias 0."""
        for module in self.modules():
            if isinstance(module, TriplaneDeformableAttention):
                for layer in module.offsets.values():
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
            elif isinstance(module, PlaneResBlock):
                nn.init.zeros_(module.conv_out.weight)
                nn.init.zeros_(module.conv_out.bias)

    def grid_coords(self, device=None) -> torch.Tensor:
        """Normalised centres (X*Y*Z, 3) of every voxel, C order (x slowest)."""
        return P.voxel_centres(self.config.input_sizes, AXES, device=device)

    def encode(self, labels: torch.Tensor) -> dict:
        """labels (B, X, Y, Z) integer in [0, classes) (IGNORE read as free) -> {planes, mu, logvar}."""
        return self.encoder(labels)

    def decode(self, planes: dict[str, torch.Tensor], coords: torch.Tensor | None = None) -> torch.Tensor:
        """{name: (B, C, a, b)} -> logits (B, classes, N) at coords (N, 3) or (B, N, 3) in [-1, 1], or without
        coords the whole grid (B, classes, X, Y, Z), decoded `chunk` points at a time."""
        first = planes[PLANES[0]]
        B = first.shape[0]
        full = coords is None
        if full:
            coords = self.grid_coords(first.device)  # (X*Y*Z, 3)
        if coords.dim() == 2:
            coords = coords.unsqueeze(0).expand(B, -1, -1)  # (B, N, 3)
        if coords.dim() != 3 or coords.shape[-1] != 3 or coords.shape[0] != B:
            raise OcclabError(f"query coords must be (N, 3) or ({B}, N, 3), got {tuple(coords.shape)}")
        logits = self.decoder(planes, coords.to(first.dtype))  # (B, K, N)
        return logits.reshape(B, -1, *self.config.grid) if full else logits  # (B, K, X, Y, Z) or (B, K, N)

    def forward(self, labels: torch.Tensor, queries: torch.Tensor | None = None) -> dict:
        """labels (B, X, Y, Z) -> {logits, planes, mu, logvar}; logits (B, K, N) at `queries` (N, 3) or (B, N, 3),
        or (B, K, X, Y, Z) without; channels first for F.cross_entropy and the shared OccupancyLoss.

        labels (B, T, X, Y, Z) (the shared trainer's windows; static scenes have T = 1): each frame is encoded
        as its own scene (planes, mu, logvar (B*T, C, a, b)). With `queries` (N, 3) or (B*T, N, 3): logits
        (B, K, T*N). Without, in training mode: the model samples its own training points per frame
        (`sample_queries` with the config's counts, from torch's global RNG) and returns logits (B, K, T*N) with
        "targets" (B, T*N), frame-major, for the shared OccupancyLoss; in eval mode: the whole grid, logits
        (B, K, T, X, Y, Z), compared by the trainer's `evaluate` with labels (B, T, X, Y, Z).
        """
        if labels.dim() != 5:
            enc = self.encode(labels)
            return {"logits": self.decode(enc["planes"], queries), **enc}
        B, T = labels.shape[:2]
        if tuple(labels.shape[2:]) != self.config.grid:
            raise OcclabError(f"X-Scene expects labels (B, X, Y, Z) or windows (B, T, "
                              f"{', '.join(map(str, self.config.grid))}), got {tuple(labels.shape)}")
        flat = labels.reshape(B * T, *labels.shape[2:])  # (B*T, X, Y, Z): every frame one static scene
        targets = None
        if queries is None and self.training:
            queries, targets = self.sample_queries(flat)  # (B*T, N, 3), (B*T, N)
        enc = self.encode(flat)
        logits = self.decode(enc["planes"], queries)  # (B*T, K, N) or (B*T, K, X, Y, Z)
        if queries is None:  # whole grid: (B, K, T, X, Y, Z)
            return {"logits": logits.reshape(B, T, *logits.shape[1:]).transpose(1, 2), **enc}
        K, N = logits.shape[1:]
        out = {"logits": logits.reshape(B, T, K, N).transpose(1, 2).reshape(B, K, T * N), **enc}  # frame-major
        if targets is not None:
            out["targets"] = targets.reshape(B, T * N)
        return out

    def sample_queries(self, labels: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training queries with the config's counts: coords (B, N, 3), targets (B, N); see `sample_queries`.
        Without a generator the draws come from torch's global RNG (on the labels' device)."""
        return sample_queries(labels, generator, self.config.query_points, self.config.query_near)



def model_info(config: XSceneVAEConfig) -> dict:
    """Parameter counts, plane shapes (name -> [C, a, b]) and compression ratio."""
    model = XSceneVAE(config)
    return {
        "model": "xscene",
        "parameters": count_parameters(model),
        "parameters_by_part": {
            **{f"encoder.{n}": count_parameters(m) for n, m in model.encoder.named_children()},
            **{f"decoder.{n}": count_parameters(m) for n, m in model.decoder.named_children()},
        },
        "input_shape": list(config.grid),
        "plane_shapes": {n: list(s) for n, s in config.plane_shapes().items()},
        "latent_floats": P.latent_floats(config.latent_sizes, AXES, config.latent_channels),
        "compression_ratio": config.compression_ratio(),
        "config": asdict(config),
    }


__all__ = ["NUM_CLASSES_OCC3D_RAW", "PRESETS", "RELEASED_PARAMS_OCC3D", "XSceneVAE", "XSceneVAEConfig", "model_info",
           "sample_queries", "sincos_encoding", "xscene_paper", "xscene_small", "xscene_tiny"]
