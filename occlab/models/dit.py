"""HexPlane DiT of DynamicCity (Bian et al., ICLR 2025): a DiT with adaLN-Zero over the tokens of a HexPlane.

HexPlane (six planes tx, ty, tz, xy, xz, yz, each (B, C, a, b)) -> a 2D map of p x p patches -> tokens ->
transformer -> epsilon prediction of the same shape. Written in the style of facebookresearch/DiT `models.py`
(patch embedding, fixed 2D sin-cos positional embedding, timestep embedder, adaLN-Zero blocks, zero-initialised
final layer) and checked against the released code (github.com/3DTopia/DynamicCity, `dynamic_city/diffusion/
models.py`, `embedders.py`, `utils/hexplane_utils.py`, `conf/dit/model/dit.yaml`).

Token layouts (`TokenLayout`, every size computed from the plane shapes; DynamicCity Tab. 5):
- `pro`, Padded Rollout: one (X+T+Z) x (Y+Z+T) map (square when X = Y; CarlaSC latent 64x64, T' 8, Z' 4 ->
  76 x 76), rows [xy | xz | tx^T], [ty | tz | 0], [yz^T | 0 | 0]. Patches holding only padding are dropped
  before the transformer and restored as zeros after. Same arrangement and transposes as the released
  `hexplane_to_rollout` / `rollout_to_hexplane`, and the same dropped patches as its `patch_mask` (the
  rollout mask at sizes / 2) when every latent size is a multiple of the patch size. Ours differs in that it
  is computed for any patch size and sizes (a patch is padding only when it holds no plane cell; a map that
  is not a multiple of p is zero-padded at its right and bottom), X != Y gives a rectangular map, and the
  planes come back as views of the map.
- `vconcat`, vertical concatenation: the planes stacked along the rows as they are (xy, xz, yz, tx, ty, tz,
  no transposes, so no axis is aligned between neighbours), the width zero-padded to the widest plane.
- `unfold`, direct unfold: each plane patchified on its own (zero-padded to a multiple of p), the tokens
  concatenated (xy, xz, yz, tx, ty, tz), then laid out row-major on a near-square grid of patches
  (ceil(sqrt(N)) wide): the positional embedding sees only the position in the sequence, as a naive token
  sequence would. The released code has neither alternative; this is our reading of the paper's text.
With padding dropped and sizes that are multiples of p, all three give the same tokens (at other positions).
- `grid` (not a HexPlane layout): OccSora's tokenizer latent (C, T', X', Y') with its frames side by side as one
  (C, X', T' * Y') map (occlab.models.grid_latent), so that OccSora's generation row uses this same DiT.

DiT (released `DiT-DC/2` at CarlaSC: depth 16, width 384, 8 heads, patch 2, mlp ratio 4, qkv bias, tanh GELU,
LayerNorm eps 1e-6 without affine; the same weight init). Conditions, each switched on by the config:
command (Embedding of static/forward/left/right + a null token), trajectory (MLP over the flattened per-frame
(dx, dy, yaw), (B, T, 3)), layout (a BEV map (B, K, H, W) float or (B, H, W) integer classes, resized to the
xy block, patch-embedded and added to the tokens of the xy block), previous HexPlane (laid out as x,
patch-embedded, added to every token). Each is replaced by its null (null token / zeros) with p = 0.1 in
training for classifier-free guidance, or where `drop` says, or where the condition is not given.

Checked: loaded with the same random weights, our forward equals the released DiT-DC/2 forward (eps-only,
fp32, CarlaSC latent, batch 2) to 7e-7 unconditionally and with the previous HexPlane, trajectory and command
in "adaln" mode; our rollout, cell mask and padding patches equal the released ones exactly.

Deliberate differences from the released code:
- epsilon only: C output channels (released `learn_sigma=True`: 2C, the second half a learned variance
  trained by the VB term); the positional embedding is a buffer (released: a frozen nn.Parameter of the full
  grid, which its printed parameter count includes). Released count at CarlaSC without conditions:
  43,730,432 = ours 43,151,296 + 554,496 (pos. embedding 38 x 38 x 384) + 24,640 (variance outputs).
- spatial conditions (layout, previous HexPlane) are added to the input tokens by default (`spatial_cond=
  "tokens"`); `"adaln"` adds them, plus the positional embedding per condition, to a per-token adaLN
  conditioning vector as released. The released layout embedder has width 1 (`LayoutCondEmbedder(...,
  embed_dim=1)`, a scalar per token broadcast over the width), takes T per-frame channels at X/4 resized
  to the latent and covers the whole map (its bias reaches every token); ours has the full width, takes K
  channels (or classes) and touches only the xy block.
- without spatial conditions the adaLN modulation is computed once per sample (the released code computes it
  for every token, on identical vectors); dropped padding is restored in the input dtype (released: fp16).
- the command has a learned null token (released: dropped embeddings are zeros), the trajectory and
  spatial conditions drop to zeros as released.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from occlab import planes as P
from occlab.classes import NUM_CLASSES_CARLASC
from occlab.errors import OcclabError
from occlab.models.blocks import count_parameters

from occlab.models.grid_latent import GRID, GridLayout, token_layout
from occlab.planes import AXES, PLANES, ROLLOUTS, STACK_ORDER, TokenLayout, pad_to_multiple, patchify, unpatchify
SPATIAL_COND = ("tokens", "adaln")
CONDITIONS = ("command", "trajectory", "layout", "previous")
COMMANDS = ("static", "forward", "left", "right")  # as occlab.data.COMMANDS and the released Command enum

# Parameter count the released trainer prints for DiT-DC/2 at CarlaSC (latent T' 8, X' Y' 64, Z' 4, C 16, no
# conditions), counted by instantiating dynamic_city/diffusion/models.py with conf/dit/model/dit.yaml.
RELEASED_PARAMS_CARLASC = 43_730_432



# ---------------------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------------------

@dataclass
class DiTConfig:
    """All sizes of a HexPlane DiT. Defaults: the released DiT-DC/2 at the CarlaSC latent (VAE rates 2,2,2,2)."""

    channels: int = 16  # C of every latent plane
    sizes: tuple[int, ...] = (8, 64, 64, 4)  # latent T', X', Y', Z' (a "grid" latent: T', X', Y')
    rollout: str = "pro"  # token layout: "pro" | "unfold" | "vconcat"; "grid": OccSora's (C, T', X', Y') latent
    patch_size: int = 2
    depth: int = 16
    width: int = 384
    heads: int = 8
    mlp_ratio: float = 4.0
    drop_padding: bool = True  # drop pure-padding patches before the transformer
    command_cond: bool = False
    num_commands: int = len(COMMANDS)
    trajectory_cond: bool = False
    frames: int = 16  # input frames T of the trajectory (B, T, 3)
    trajectory_layers: int = 3  # released: 3 Linear layers with ReLU
    layout_cond: bool = False
    layout_channels: int = NUM_CLASSES_CARLASC  # K of a float BEV map, or classes of an integer one (one-hot)
    layout_interp: str = "nearest"  # F.interpolate mode resizing the BEV map to the xy block (released nearest)
    previous_cond: bool = False  # the previous HexPlane (long sequences by rollout)
    cond_dropout: float = 0.1  # per condition, per sample, in training
    spatial_cond: str = "tokens"  # layout / previous added to the tokens, or to a per-token adaLN vector

    def __post_init__(self):
        self.sizes = tuple(int(v) for v in self.sizes)
        if self.rollout not in (*ROLLOUTS, GRID):
            raise OcclabError(f"rollout must be one of {(*ROLLOUTS, GRID)}, got {self.rollout!r}")
        dims = 3 if self.rollout == GRID else 4
        if len(self.sizes) != dims or min(self.sizes) < 1:
            what = "grid latent (T, X, Y)" if dims == 3 else "latent (T, X, Y, Z)"
            raise OcclabError(f"sizes must be the {what} for rollout {self.rollout!r}, got {self.sizes}")
        if self.spatial_cond not in SPATIAL_COND:
            raise OcclabError(f"spatial_cond must be one of {SPATIAL_COND}, got {self.spatial_cond!r}")
        if self.width % self.heads or self.width % 4:
            raise OcclabError(f"width {self.width} must be divisible by {self.heads} heads and by 4 (2D sin-cos)")
        if not 0 <= self.cond_dropout < 1:
            raise OcclabError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")

    @property
    def latent_sizes(self) -> dict[str, int]:
        return dict(zip(AXES, self.sizes))

    def plane_shapes(self) -> dict[str, tuple[int, int]]:
        """{plane: (a, b)} of the latent HexPlane ({"grid": (X', T' * Y')} of a grid latent's map)."""
        if self.rollout == GRID:
            return dict(GridLayout(self.sizes, self.patch_size).shapes)
        return P.plane_shapes(self.latent_sizes, AXES)

    def layout(self) -> TokenLayout | GridLayout:
        return token_layout(self.rollout, self.sizes, self.patch_size)

    @property
    def conditions(self) -> list[str]:
        flags = (self.command_cond, self.trajectory_cond, self.layout_cond, self.previous_cond)
        return [n for n, on in zip(CONDITIONS, flags) if on]


def dit_paper(sizes=(8, 64, 64, 4), channels: int = 16, **kw) -> DiTConfig:
    """Released DiT-DC/2 (conf/dit/model/dit.yaml): depth 16, width 384, 8 heads, patch 2 (about 43 M)."""
    return DiTConfig(sizes=tuple(sizes), channels=channels, **kw)


def dit_small(sizes=(4, 16, 16, 4), channels: int = 8, frames: int = 8, **kw) -> DiTConfig:
    """Study size (latent of `dynamiccity_small`): depth 6, width 192, 3 heads of 64, patch 2 (about 4.2 M)."""
    kw = {"depth": 6, "width": 192, "heads": 3, **kw}
    return DiTConfig(sizes=tuple(sizes), channels=channels, frames=frames, **kw)


def dit_tiny(sizes=(2, 4, 4, 2), channels: int = 4, frames: int = 4, **kw) -> DiTConfig:
    """Unit tests and smoke runs (latent of `dynamiccity_tiny`): depth 2, width 32, 2 heads, patch 2."""
    kw = {"depth": 2, "width": 32, "heads": 2, **kw}
    return DiTConfig(sizes=tuple(sizes), channels=channels, frames=frames, **kw)


PRESETS = {"paper": dit_paper, "small": dit_small, "tiny": dit_tiny}


def config_for_vae(vae_config, preset: str = "small", **kw) -> DiTConfig:
    """A DiT preset sized for the latent of a VAE config (anything with latent_sizes, latent_channels, frames)."""
    if preset not in PRESETS:
        raise OcclabError(f"unknown DiT preset {preset!r}; expected one of {sorted(PRESETS)}")
    s = vae_config.latent_sizes  # {t, x, y, z} of a HexPlane, {t, x, y} of a grid latent
    return PRESETS[preset](sizes=tuple(s[a] for a in AXES if a in s), channels=vae_config.latent_channels,
                           frames=vae_config.frames, **kw)


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------

def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): sin of pos * 10000^(-2i/dim) then cos (MAE / DiT, in float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(M,) row and column indices -> (M, dim): first half encodes the column, second the row (as DiT)."""
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: 256 sinusoidal frequencies (cos then sin, as GLIDE/DiT), Linear, SiLU, Linear."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, dim/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, dim % 2))  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,)
        return self.mlp(self.embedding(t, self.frequencies).to(self.mlp[0].weight.dtype))  # (B, D)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias (as the released DiT), scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))  # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + gate * Attn(modulate(LN(x))), x + gate * MLP(modulate(LN(x)))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # x (B, N, D), c (B, 1 or N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)


class FinalLayer(nn.Module):
    """LN, adaLN shift/scale, Linear to p * p * C per token (zero-initialised with the modulation)."""

    def __init__(self, dim: int, patch: int, channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p * p * C)


class TrajectoryEmbedder(nn.Module):
    """(B, T, 3) per-frame (dx, dy, yaw) -> flattened -> Linear, (ReLU, Linear) x (layers - 1) -> (B, D)."""

    def __init__(self, frames: int, width: int, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Linear(3 * frames, width)]
        for _ in range(layers - 1):
            mods += [nn.ReLU(), nn.Linear(width, width)]
        self.mlp = nn.Sequential(*mods)
        self.frames = frames

    def forward(self, traj: torch.Tensor) -> torch.Tensor:
        if tuple(traj.shape[1:]) != (self.frames, 3):
            raise OcclabError(f"trajectory must be (B, {self.frames}, 3), got {tuple(traj.shape)}")
        return self.mlp(traj.reshape(traj.shape[0], -1).to(self.mlp[0].weight.dtype))  # (B, D)


class PlaneMapInput:
    """The input side shared by the DiTs over planes laid out on one map (HexPlane here, triplane in
    occlab.models.xscene_diffusion): the map of an input and its kept patch tokens. Needs `layout`,
    `config.channels`, `config.patch_size`, `cell_mask`, `keep` and `drops_padding` on the model."""

    input_name = "DiT"  # how shape errors name the model

    def _as_map(self, x) -> torch.Tensor:
        m = self.layout.to_map(x) if isinstance(x, Mapping) else x
        want = (self.config.channels, *self.layout.map_shape)
        if m.dim() != 4 or tuple(m.shape[1:]) != want:
            raise OcclabError(f"{self.input_name} input must be (B, {want[0]}, {want[1]}, {want[2]}), "
                              f"got {tuple(m.shape)}")
        return m

    def _tokens(self, m: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p * p * C) of the kept patches; padding cells of partial patches zeroed."""
        if self.layout.partial:
            m = m * self.cell_mask.to(m.dtype)
        tokens = patchify(pad_to_multiple(m, self.config.patch_size), self.config.patch_size)
        return tokens[:, self.keep] if self.drops_padding else tokens


class DiT(PlaneMapInput, nn.Module):
    """HexPlane DiT: forward(x, t, cond=None, drop=None) -> epsilon prediction shaped like x.

    x: the layout's map (B, C, H, W) (see `TokenLayout.to_map`) or a planes dict {name: (B, C, a, b)}.
    t: (B,) timesteps. cond: {"command": (B,) long, "trajectory": (B, T, 3), "layout": (B, K, H, W) float or
    (B, H, W) integer, "previous": map or planes dict}; enabled conditions that are absent are null.
    drop: None (training: each condition dropped with p = cond_dropout; eval: none), a bool (drop every
    condition of every sample, or none), a (B,) bool tensor (all conditions of those samples), or a dict
    {condition: (B,) bool}. Outputs on padding cells are exactly zero.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        self.layout = lay = config.layout()
        p, D = c.patch_size, c.width
        patch_dim = p * p * c.channels

        keep = (~lay.padding).reshape(-1).nonzero().squeeze(1) if c.drop_padding else torch.arange(lay.num_patches)
        self.register_buffer("keep", keep, persistent=False)  # (N,) kept patch indices, row-major
        self.drops_padding = c.drop_padding and lay.num_padding > 0
        gw = lay.grid[1]
        rows, cols = keep // gw, keep % gw
        self.register_buffer("pos_embed", sincos_2d(D, rows, cols), persistent=False)  # (N, D) fixed
        self.register_buffer("cell_mask", lay.cell_mask.float(), persistent=False)  # (H, W)
        slot = torch.full((lay.num_patches,), -1, dtype=torch.long)
        slot[keep] = torch.arange(len(keep))
        self.register_buffer("xy_tokens", slot[lay.xy_patches()], persistent=False)  # xy patches among tokens

        self.x_embedder = nn.Linear(patch_dim, D)  # = Conv2d(C, D, p, stride p) on the kept patches
        self.t_embedder = TimestepEmbedder(D)
        self.command_embedder = nn.Embedding(c.num_commands + 1, D) if c.command_cond else None  # last = null
        self.trajectory_embedder = (TrajectoryEmbedder(c.frames, D, c.trajectory_layers)
                                    if c.trajectory_cond else None)
        self.layout_embedder = nn.Linear(p * p * c.layout_channels, D) if c.layout_cond else None
        self.previous_embedder = nn.Linear(patch_dim, D) if c.previous_cond else None
        self.blocks = nn.ModuleList([DiTBlock(D, c.heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_layer = FinalLayer(D, p, c.channels)
        self.initialize_weights()

    def initialize_weights(self):
        """As DiT / released: Xavier-uniform Linear weights, zero biases; timestep MLP and command embedding
        N(0, 0.02); adaLN modulations and the final linear zero (adaLN-Zero: the model outputs 0 at init)."""
        def basic(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.command_embedder is not None:
            nn.init.normal_(self.command_embedder.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for mod in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    # -- helpers ------------------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return int(self.keep.numel())

    def loss_mask(self) -> torch.Tensor:
        """(H, W) float, 1 on plane cells: the mask of the epsilon loss on maps (padding carries no target)."""
        return self.cell_mask

    def _drops(self, batch: int, drop, device) -> dict[str, torch.Tensor]:
        names = self.config.conditions
        if drop is None:
            if self.training and self.config.cond_dropout > 0:
                return {n: torch.rand(batch, device=device) < self.config.cond_dropout for n in names}
            drop = False
        if isinstance(drop, bool):
            return {n: torch.full((batch,), drop, dtype=torch.bool, device=device) for n in names}
        if isinstance(drop, Mapping):
            unknown = set(drop) - set(CONDITIONS)
            if unknown:
                raise OcclabError(f"unknown conditions in drop: {sorted(unknown)}; expected {CONDITIONS}")
            none = torch.zeros(batch, dtype=torch.bool, device=device)
            return {n: torch.as_tensor(drop[n], device=device).to(torch.bool).expand(batch) if n in drop else none
                    for n in names}
        drop = torch.as_tensor(drop, device=device).to(torch.bool).reshape(batch)
        return {n: drop for n in names}

    def _layout_tokens(self, bev: torch.Tensor, keep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        c, p = self.config, self.config.patch_size
        if not bev.is_floating_point():  # (B, H, W) classes -> one-hot; ignore ids (>= K) give zeros
            classes = torch.arange(c.layout_channels, device=bev.device)
            bev = (bev.long()[:, None] == classes[None, :, None, None])
        bev = bev.to(out.dtype)
        if bev.dim() != 4 or bev.shape[1] != c.layout_channels:
            raise OcclabError(f"layout must be (B, {c.layout_channels}, H, W) or (B, H, W), got {tuple(bev.shape)}")
        X, Y = self.layout.sizes["x"], self.layout.sizes["y"]
        if tuple(bev.shape[-2:]) != (X, Y):
            bev = F.interpolate(bev, size=(X, Y), mode=c.layout_interp)
        emb = self.layout_embedder(patchify(pad_to_multiple(bev, p), p))  # (B, gx * gy, D)
        emb = emb * keep[:, None, None].to(emb.dtype)
        return out.index_add(1, self.xy_tokens, emb.to(out.dtype))  # added to the xy block's tokens

    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, x, t: torch.Tensor, cond: Mapping | None = None, drop=None):
        cfg = self.config
        cond = dict(cond or {})
        unknown = set(cond) - set(CONDITIONS)
        if unknown:
            raise OcclabError(f"unknown conditions {sorted(unknown)}; expected some of {CONDITIONS}")
        as_planes = isinstance(x, Mapping)
        m = self._as_map(x)  # (B, C, H, W)
        B = m.shape[0]
        t = torch.as_tensor(t, device=m.device).reshape(-1).expand(B)

        h = self.x_embedder(self._tokens(m)) + self.pos_embed.to(m.dtype)  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        drops = self._drops(B, drop, m.device)
        for name in cfg.conditions:  # absent conditions are null
            drops[name] = drops[name] | (cond.get(name) is None)

        if self.command_embedder is not None:
            cmd = cond.get("command")
            cmd = torch.zeros(B, dtype=torch.long, device=m.device) if cmd is None else cmd.to(m.device).long()
            c = c + self.command_embedder(torch.where(drops["command"], cfg.num_commands, cmd.reshape(B)))
        if self.trajectory_embedder is not None and cond.get("trajectory") is not None:
            keep = (~drops["trajectory"])[:, None]
            c = c + self.trajectory_embedder(cond["trajectory"].to(m.device)) * keep.to(c.dtype)

        spatial = None
        if cfg.layout_cond or cfg.previous_cond:
            spatial = torch.zeros_like(h)
            pos = self.pos_embed.to(h.dtype) if cfg.spatial_cond == "adaln" else None
            if cfg.layout_cond:
                if cond.get("layout") is not None:
                    spatial = self._layout_tokens(cond["layout"].to(m.device), ~drops["layout"], spatial)
                spatial = spatial if pos is None else spatial + pos
            if cfg.previous_cond:
                if cond.get("previous") is not None:
                    prev = self._tokens(self._as_map(cond["previous"]).to(h.dtype))
                    keep = (~drops["previous"])[:, None, None].to(h.dtype)
                    spatial = spatial + self.previous_embedder(prev) * keep
                spatial = spatial if pos is None else spatial + pos

        c = c.unsqueeze(1)  # (B, 1, D): one adaLN modulation per sample
        if spatial is not None:
            if cfg.spatial_cond == "tokens":
                h = h + spatial
            else:
                c = c + spatial  # (B, N, D): per-token modulation, as released
        for block in self.blocks:
            h = block(h, c)
        out = self.final_layer(h, c)  # (B, N, p * p * C)

        if self.drops_padding:  # dropped patches come back as zeros
            out = out.new_zeros(B, self.layout.num_patches, out.shape[-1]).index_copy(1, self.keep, out)
        H, W = self.layout.map_shape
        eps = unpatchify(out, self.layout.grid, cfg.patch_size)[..., :H, :W]
        eps = eps * self.cell_mask.to(eps.dtype)  # padding cells are zero, whether or not their patches were dropped
        return self.layout.from_map(eps) if as_planes else eps  # like x



def model_info(config: DiTConfig) -> dict:
    """Parameter counts (total and by part), token layout and counts."""
    model = DiT(config)
    lay = model.layout
    parts = {name: count_parameters(mod) for name, mod in model.named_children()}
    return {
        "model": "dit",
        "parameters": count_parameters(model),
        "parameters_by_part": {k: v for k, v in parts.items() if v},
        "rollout": config.rollout,
        "plane_shapes": {n: [config.channels, *ab] for n, ab in config.plane_shapes().items()},
        "map_shape": [config.channels, *lay.map_shape],
        "patch_grid": list(lay.grid),
        "patches": lay.num_patches,
        "padding_patches": lay.num_padding,
        "tokens": model.num_tokens,
        "conditions": config.conditions,
        "config": asdict(config),
    }


__all__ = ["AXES", "COMMANDS", "CONDITIONS", "GRID", "PLANES", "PRESETS", "RELEASED_PARAMS_CARLASC", "ROLLOUTS",
           "STACK_ORDER", "DiT", "DiTBlock", "DiTConfig", "GridLayout", "PlaneMapInput", "TokenLayout",
           "config_for_vae", "dit_paper", "dit_small", "dit_tiny", "model_info", "patchify", "sincos_2d", "token_layout", "unpatchify"]
