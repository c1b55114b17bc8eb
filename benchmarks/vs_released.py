"""The authors' released DynamicCity VAE (or DiT) training step against occlab's, alternately in one run (issue #10 §4).

    .venv/bin/python benchmarks/vs_released.py --released PATH [--model vae|dit] [--small] [--steps 3] [--threads 2]
        [--json] [--no-memory]

PATH is a checkout of github.com/3DTopia/DynamicCity at commit eaf0c6e that you fetched yourself
(git clone https://github.com/3DTopia/DynamicCity PATH && git -C PATH checkout eaf0c6e). Their modules are
imported from PATH (sys.path insert); none of their code is copied here or into occlab, and nothing under PATH
is written (no bytecode either).

Configuration (issue #10 §2): CarlaSC 128x128x8, T = 16 (`--small`: 64x64x8, T = 8), batch 1, rates 2,2,2,2,
16 latent channels, CE + Lovász + KL, fp32, `--threads` threads (default 2), attention dropout 0 (the transformer
MLP/projection dropout 0.1 of both stays). Ours is `occlab.bench.step_fn(BenchSpec(...))`, the step of
`occlab bench step`; the grid, frames and rates of theirs are read from our model's config. Theirs: their
`DynamicCityAE` built from their own yaml (PATH/conf/vae/{model/vae,dataset/carlasc,trainer/train}.yaml, the
defaults list of conf/vae/carlasc.yaml) with spatial_size, sequence_length, down_x/y/z and hex_down_t set from
that configuration and amp off; one step is their `VAETrainer.step(voxels)` (forward, their compute_loss: CE with
their class weights + Lovász-softmax + KL, weighted 1 / 1 / 0.0015) and `VAETrainer.backward_step(loss)`
(zero_grad, backward, Adam step), called on a VAETrainer made without its __init__ (which opens the dataset and
wandb), its attributes set with their own helpers (build_losses, calculate_ce_weight, setup_optimizer).
Input: the synthetic town sequence occlab's bench uses (seed 1, CarlaSC classes), the same tensor for both.

`--model dit` (issue #10 §1 "DiT-DC/2 train, batch 2"): batch 2, fp32, `--threads`, no conditioning (their
conf/dit/model/dit.yaml: x_attn, hex/layout/traj/cmd_cond all false). Ours is `step_fn(BenchSpec(model=
"dynamiccity-dit", batch=2))`: our DiT-DC/2 (`dit_paper()`) on random latent planes laid out as our padded rollout,
our Gaussian diffusion's masked epsilon MSE, AdamW lr 1e-4. Theirs is their `DiTTrainer` built by its own __init__
with load_data=False (its own flag) from their conf/dit/carlasc.yaml composition (dataset, trainer, model; batch_size
set to 2, amp left on as their __init__ asserts), the one thing replaced being `load_conf(vae_name)` (it reads a
trained VAE's saved config): it returns their VAE yaml at this configuration (above), from which their __init__ derives
the latent (T, X, Y, Z) = (8, 64, 64, 4), their padded rollout map (X+T+Z, Y+Z+T) = 76 x 76 and its patch mask; so the
model is their `DiT_models['DiT-DC/2']` with their kwargs (in_channels 16, learn_sigma, patch_mask: 1416 of the 38 x 38
patches), their diffusion `create_diffusion("")` (1000 linear steps, MSE on epsilon + the VB term of the learned
variance, the rollout mask), AdamW lr 1e-4, weight decay 0, and an EMA copy. One step is their `forward_step(batch)`
(t and noise from torch's RNG; its autocast('cuda') is inactive on a CPU tensor) and `backward_step(loss)` (zero_grad,
GradScaler('cuda'), disabled without CUDA, so a plain backward and AdamW step, then their EMA update). Input, the same
shape for both (B, 16, 76, 76): theirs their `hexplane_to_rollout` of six random planes (zeros in the padding, as
their dataset gives it; the conditioning entries of the batch are zeros, unused), ours random over the whole map
(the padding is masked out of the loss and its patches dropped, so its values do not matter); both rollouts are the
same 76 x 76 layout. Differences that stay (each side as released): theirs predicts 2C channels (the learned
variance) and holds its positional embedding as a frozen nn.Parameter (counted), ours C channels and a buffer. Both
steps end with an EMA update of a model copy (their backward_step; occlab's bench step as its trainer). fp32 note: their
`unpatchify` scatters the kept tokens into `torch.zeros(...).half()` (written for their fp16 autocast; a float32
source fails index_put), so a forward hook casts their final layer's output to fp16 before it; everything else of
their step is fp32.

Timing: one warm-up step of each, then `--steps` rounds of one step each, the order swapped every round;
median, min and max per side. Peak memory (unless --no-memory), measured first: each side in a fresh
subprocess of its own (warm-up + one step; peak RSS as /proc's VmHWM, torch's import included), one after the
other; the released side's process builds occlab's model once to read the configuration and frees it.

Shims (installed in sys.modules before their modules are imported; their files are not edited):
- flash_attn (always: flash-attn has no CPU kernels; issue #10 §1 "flash-attn replaced by SDPA"):
  flash_attn_qkvpacked_func / flash_attn_kvpacked_func as torch's scaled_dot_product_attention on the same
  (batch, tokens, heads, head_dim) layout, softmax scale 1/sqrt(head_dim), dropout_p honoured. Attention
  dropout 0 is set on their built Attention modules (attn_drop = 0.0), as BenchSpec's attn_dropout = 0.
- timm (only if not installed): timm.layers.Mlp (also as timm.models.vision_transformer.Mlp, which their DiT
  imports) as timm builds it for their calls (fc1, the given activation, dropout, fc2, dropout; same parameters);
  timm.models.vision_transformer.PatchEmbed as timm builds PatchEmbed(img_size, patch_size, in_chans, embed_dim,
  bias) (a Conv2d of kernel = stride = patch, flattened to (B, N, D), no norm; img_size, patch_size, grid_size and
  num_patches as timm sets them; the input size checked as timm's strict_img_size does);
  timm.scheduler.CosineLRScheduler, imported by vae_trainer.py but unused by their multisteplr config, raises if
  constructed.
- omegaconf (only if not installed): OmegaConf.load as a YAML read with OmegaConf's float rule (1e-10 is a
  float), for their constants.py. Their config itself is always read by this script the same way into dicts
  with attribute access (hydra is not needed).
- wandb (only if not installed): an empty module; their wlog is never called here.
- dynamic_city.trainer: a bare package object, so that importing vae_trainer.py does not run the package's
  __init__ (which imports both trainers); `--model dit` imports dynamic_city.trainer.dit_trainer from it. Their
  imports run with PATH as working directory (constants.py opens conf/others/constants.yaml relative to it).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from occlab.bench import peak_rss_gib, timed, town_labels
from occlab.errors import OcclabError

EXPECTED_COMMIT = "eaf0c6e"
FETCH = f"fetch github.com/3DTopia/DynamicCity at {EXPECTED_COMMIT} and pass the folder holding dynamic_city/ and conf/"
REQUIRED = ("dynamic_city/vae/vae.py", "dynamic_city/trainer/vae_trainer.py", "dynamic_city/utils/loss_utils.py",
            "conf/vae/model/vae.yaml", "conf/vae/dataset/carlasc.yaml", "conf/vae/trainer/train.yaml")
REQUIRED_DIT = ("dynamic_city/diffusion/models.py", "dynamic_city/diffusion/gaussian_diffusion.py",
                "dynamic_city/diffusion/respace.py", "dynamic_city/trainer/dit_trainer.py",
                "dynamic_city/utils/hexplane_utils.py", "conf/dit/dataset/carlasc.yaml", "conf/dit/model/dit.yaml",
                "conf/dit/trainer/train.yaml")
SIDES = ("released", "occlab")
MODELS = ("vae", "dit")
DIT_BATCH = 2  # issue #10 §1: "DiT-DC/2 train, batch 2"
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# Their checkout: checks, shims, config
# ---------------------------------------------------------------------------------------------------------

def check_released(path, kind: str = "vae") -> Path:
    """PATH as an absolute Path, or an OcclabError naming PATH and what is expected there (for model `kind`)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise OcclabError(f"--released {path}: no such folder; {FETCH}")
    missing = [f for f in REQUIRED + (REQUIRED_DIT if kind == "dit" else ()) if not (root / f).is_file()]
    if missing:
        raise OcclabError(f"--released {path}: no {', '.join(missing)} under {root}; this is not a checkout of the "
                          f"authors' DynamicCity code; {FETCH}")
    return root.resolve()


def released_commit(root: Path) -> str | None:
    """The checkout's commit, or None when PATH is not a git work tree (e.g. an archive)."""
    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], check=False, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    top = git("rev-parse", "--show-toplevel")  # PATH itself, not a repository that happens to hold it
    return git("rev-parse", "HEAD") if top and Path(top).resolve() == root else None


class _YamlLoader:
    """yaml.SafeLoader plus OmegaConf's float rule (PyYAML reads 1e-10 as a string)."""

    _loader = None

    @classmethod
    def get(cls):
        if cls._loader is None:
            import yaml

            class Loader(yaml.SafeLoader):
                pass
            Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
            Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
                r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
                r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
            cls._loader = Loader
        return cls._loader


class Node(dict):
    """A config dict with attribute access (what their code reads from an OmegaConf DictConfig)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    __setattr__ = dict.__setitem__


def load_yaml(path) -> Node:
    """One YAML file as nested Nodes."""
    import yaml

    def wrap(v):
        return Node({k: wrap(x) for k, x in v.items()}) if isinstance(v, dict) else v
    return wrap(yaml.load(Path(path).read_text(), Loader=_YamlLoader.get()))


def released_conf(root: Path, grid, frames: int, rates, num_classes: int | None = None) -> Node:
    """Their conf/vae/carlasc.yaml composition (dataset, trainer, model), set to this configuration, fp32."""
    conf = Node(name="vs_released", dataset=load_yaml(root / "conf/vae/dataset/carlasc.yaml"),
                trainer=load_yaml(root / "conf/vae/trainer/train.yaml"), model=load_yaml(root / "conf/vae/model/vae.yaml"))
    rt, rx, ry, rz = (int(math.log2(r)) for r in rates)
    conf.dataset.spatial_size, conf.dataset.sequence_length = list(grid), frames
    if num_classes is not None:
        conf.dataset.num_classes = num_classes
    conf.model.update(down_x=rx, down_y=ry, down_z=rz, hex_down_t=rt, hex_down_x=0, hex_down_y=0, hex_down_z=0)
    conf.trainer.amp = False
    return conf


def _module(name: str, **attrs) -> types.ModuleType:
    """A stand-in module holding `attrs`."""
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__file__ = f"<vs_released shim {name}>"
    return mod


def _sdpa(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn's layout (B, N, H, D) through torch SDPA's (B, H, N, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)  # (B, N, H, D)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False):
    """qkv (B, N, 3, H, D) -> (B, N, H, D)."""
    q, k, v = qkv.unbind(2)
    return _sdpa(q, k, v, dropout_p, softmax_scale, causal)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False):
    """q (B, N, H, D), kv (B, M, 2, H, D) -> (B, N, H, D)."""
    k, v = kv.unbind(2)
    return _sdpa(q, k, v, dropout_p, softmax_scale, causal)


class Mlp(nn.Module):
    """timm.layers.Mlp as built by Mlp(dim, hidden, drop=p): fc1, GELU, dropout, fc2, dropout."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, norm_layer=None,
                 bias=True, drop=0.0, use_conv=False):
        super().__init__()
        if norm_layer is not None or use_conv or not isinstance(drop, (int, float)):
            raise NotImplementedError("vs_released's timm.layers.Mlp shim covers Mlp(in, hidden, drop=p) only")
        hidden_features, out_features = hidden_features or in_features, out_features or in_features
        self.fc1, self.act, self.drop1 = nn.Linear(in_features, hidden_features, bias=bias), act_layer(), nn.Dropout(drop)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden_features, out_features, bias=bias), nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=True) with its defaults (flatten, no norm,
    strict image size): (B, C, H, W) -> Conv2d(kernel = stride = patch) -> (B, H/p * W/p, D)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True,
                 output_fmt=None, bias=True, strict_img_size=True, dynamic_img_pad=False):
        super().__init__()
        if norm_layer is not None or not flatten or output_fmt is not None or dynamic_img_pad:
            raise NotImplementedError("vs_released's timm PatchEmbed shim covers PatchEmbed(img, patch, in, dim, bias)")
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # timm's to_2tuple
        self.img_size, self.patch_size = pair(img_size), pair(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten, self.strict_img_size, self.dynamic_img_pad = True, strict_img_size, False
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = nn.Identity()

    def forward(self, x):
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        x = self.proj(x)  # (B, D, H/p, W/p)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, N, D)


class _UnusedScheduler:
    def __init__(self, *a, **k):
        raise NotImplementedError("vs_released shims timm; CosineLRScheduler is not available (their VAE config "
                                  "uses multisteplr)")


def _installed(name: str) -> bool:
    """Whether the real package can be imported."""
    import importlib.util
    return importlib.util.find_spec(name) is not None


def install_shims(root: Path) -> list[str]:
    """Put the shims in sys.modules (see the module docstring); the names of those installed."""
    shims = {"flash_attn": _module("flash_attn", flash_attn_qkvpacked_func=flash_attn_qkvpacked_func,
                                   flash_attn_kvpacked_func=flash_attn_kvpacked_func)}
    if not _installed("timm"):
        layers, scheduler = _module("timm.layers", Mlp=Mlp), _module("timm.scheduler", CosineLRScheduler=_UnusedScheduler)
        vit = _module("timm.models.vision_transformer", Mlp=Mlp, PatchEmbed=PatchEmbed)
        models = _module("timm.models", vision_transformer=vit)
        shims.update({"timm": _module("timm", layers=layers, scheduler=scheduler, models=models), "timm.layers": layers,
                      "timm.scheduler": scheduler, "timm.models": models, "timm.models.vision_transformer": vit})
    if not _installed("omegaconf"):
        shims["omegaconf"] = _module("omegaconf", OmegaConf=types.SimpleNamespace(load=load_yaml))
    if not _installed("wandb"):
        shims["wandb"] = _module("wandb")
    trainer_pkg = _module("dynamic_city.trainer")
    trainer_pkg.__path__ = [str(root / "dynamic_city" / "trainer")]
    shims["dynamic_city.trainer"] = trainer_pkg
    sys.modules.update(shims)
    return sorted(shims)


@functools.cache
def _prepare_import(root: Path) -> list[str]:
    """PATH on sys.path and the shims installed, once per process; the names of the shims."""
    if "dynamic_city" in sys.modules and not str(getattr(sys.modules["dynamic_city"], "__file__", "")).startswith(str(root)):
        raise OcclabError(f"a module dynamic_city from {sys.modules['dynamic_city'].__file__} is already imported; "
                          f"run vs_released.py in a fresh process to import {root}")
    sys.path.insert(0, str(root))
    return install_shims(root)


@contextlib.contextmanager
def _importing(root: Path):
    """Imports of their modules: from PATH as working directory, no bytecode written there, clear errors."""
    _prepare_import(root)
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # nothing written under their checkout
    try:
        with contextlib.chdir(root), warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # lovasz.py: `classes is 'present'`
            yield
    except ImportError as e:
        raise OcclabError(f"--released {root}: importing the authors' modules failed ({e}); vs_released.py shims "
                          f"flash_attn, timm, omegaconf and wandb only; install what is missing or {FETCH}") from e
    finally:
        sys.dont_write_bytecode = dont_write


@functools.cache
def import_released(root: Path):
    """(DynamicCityAE, VAETrainer, build_losses, calculate_ce_weight, Attention, shims) imported from PATH, once."""
    with _importing(root):
        from dynamic_city.trainer.vae_trainer import VAETrainer
        from dynamic_city.utils.attention_utils import Attention
        from dynamic_city.utils.loss_utils import build_losses, calculate_ce_weight
        from dynamic_city.vae.vae import DynamicCityAE
    return DynamicCityAE, VAETrainer, build_losses, calculate_ce_weight, Attention, _prepare_import(root)


@functools.cache
def import_released_dit(root: Path):
    """(their dit_trainer module, hexplane_to_rollout) imported from PATH, once."""
    with _importing(root):
        from dynamic_city.trainer import dit_trainer
        from dynamic_city.utils.hexplane_utils import hexplane_to_rollout
    return dit_trainer, hexplane_to_rollout


# ---------------------------------------------------------------------------------------------------------
# The two steps
# ---------------------------------------------------------------------------------------------------------

OURS_COMPUTE: dict = {}  # how occlab's VAE side runs (BenchSpec checkpoint / frame_chunk): main sets it from the flags


def occlab_step(small: bool, threads: int, steps: int, kind: str = "vae"):
    """(model, step) of occlab's bench at this configuration (`kind` vae: the DynamicCity VAE; dit: DiT-DC/2)."""
    from occlab.bench import BenchSpec, step_fn

    if kind == "dit":
        spec = BenchSpec(model="dynamiccity-dit", task="train", batch=DIT_BATCH, threads=threads, steps=steps)
    else:
        spec = BenchSpec(model="dynamiccity-vae", task="train", small=small, threads=threads, steps=steps,
                         **OURS_COMPUTE)
    return step_fn(spec, CPU)


def released_model(root: Path, grid, frames: int, rates, num_classes: int | None = None):
    """Their DynamicCityAE at this configuration (seed 0), attention dropout 0, and its conf."""
    DynamicCityAE, _, _, _, Attention, _ = import_released(root)
    conf = released_conf(root, grid, frames, rates, num_classes)
    torch.manual_seed(0)
    model = DynamicCityAE(conf)
    for m in model.modules():
        if isinstance(m, Attention):
            m.attn_drop = 0.0  # attention dropout 0 (issue #10); their proj/MLP nn.Dropout(0.1) stay
    return model, conf


def released_step(root: Path, grid, frames: int, rates, labels: torch.Tensor):
    """(model, step) of their training step on `labels`; step() returns the loss."""
    _, VAETrainer, build_losses, calculate_ce_weight, _, _ = import_released(root)
    model, conf = released_model(root, grid, frames, rates)
    trainer = VAETrainer.__new__(VAETrainer)  # their __init__ opens the dataset and wandb: set what step reads
    trainer.conf, trainer.device, trainer.model = conf, CPU, model
    trainer.num_classes, trainer.sequence_length = conf.dataset.num_classes, conf.dataset.sequence_length
    trainer.amp, trainer.current_step = conf.trainer.amp, 0
    trainer.loss_names = list(conf.model.loss_weights.keys())
    trainer.loss_weights = dict(**conf.model.loss_weights)
    ce_weight = calculate_ce_weight(conf.dataset).float() if conf.model.ce_class_weight else None
    trainer.loss_functions = build_losses(conf.model, ce_weight=ce_weight)
    trainer.optimizer, trainer.scheduler = trainer.setup_optimizer()
    model.train()

    def step() -> float:
        loss = trainer.step(labels)["step_loss"]["loss"]
        trainer.backward_step(loss)
        trainer.current_step += 1
        return loss.item()
    return model, step


def released_dit_conf(root: Path, batch: int) -> Node:
    """Their conf/dit/carlasc.yaml composition (dataset, trainer, model) at this batch size."""
    conf = Node(name="vs_released_dit", vae_name="vs_released: conf/vae at this configuration",
                dataset=load_yaml(root / "conf/dit/dataset/carlasc.yaml"),
                trainer=load_yaml(root / "conf/dit/trainer/train.yaml"), model=load_yaml(root / "conf/dit/model/dit.yaml"))
    conf.dataset.batch_size = batch  # their patch mask is expanded to it
    return conf


def released_dit_trainer(root: Path, grid, frames: int, rates, batch: int = DIT_BATCH):
    """Their DiTTrainer built by its own __init__ (load_data=False, seed 0), its VAE conf ours at this configuration."""
    dit_trainer, _ = import_released_dit(root)
    vae_conf, conf = released_conf(root, grid, frames, rates), released_dit_conf(root, batch)
    load_conf = dit_trainer.load_conf
    dit_trainer.load_conf = lambda name: vae_conf  # theirs reads a trained VAE's saved config
    torch.manual_seed(0)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():  # their prints stay off --json
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")  # GradScaler('cuda') disables itself
            trainer = dit_trainer.DiTTrainer(conf, CPU, load_data=False)
    finally:
        dit_trainer.load_conf = load_conf
    # their unpatchify scatters into a .half() buffer (written for fp16 autocast): hand it fp16 tokens
    trainer.model.final_layer.register_forward_hook(lambda module, args, out: out.half())
    return trainer


def released_dit_step(root: Path, grid, frames: int, rates, batch: int = DIT_BATCH):
    """(model, step) of their DiT training step on a random latent rollout; step() returns the loss."""
    _, hexplane_to_rollout = import_released_dit(root)
    trainer = released_dit_trainer(root, grid, frames, rates, batch)
    (t, x, y, z), c = trainer.hex_txyz, trainer.model.in_channels
    g = torch.Generator().manual_seed(0)
    planes = [torch.randn(batch, c, a, b, generator=g) for a, b in ((x, y), (x, z), (y, z), (t, x), (t, y), (t, z))]
    latent = hexplane_to_rollout(planes)  # (B, C, X+T+Z, Y+Z+T), zeros in the padding
    data = {"hexplane": latent, "hex_cond": torch.zeros_like(latent),  # conditions: off in their dit.yaml, unused
            "layout_cond": torch.zeros(batch, frames, grid[0], grid[1]), "traj_cond": torch.zeros(batch, frames, 3),
            "cmd_cond": torch.zeros(batch, dtype=torch.long)}
    trainer.model.train()

    def step() -> float:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")  # their autocast('cuda')
            loss = trainer.forward_step(data)
            trainer.backward_step(loss)
        trainer.current_step += 1
        return loss.item()
    return trainer.model, step


def count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def summary(times: list[float]) -> dict:
    """Median, min, max and all step times."""
    return {"s_per_step": round(statistics.median(times), 3), "s_min": round(min(times), 3),
            "s_max": round(max(times), 3), "times": [round(t, 3) for t in times]}


def build_dit_sides(root: Path, threads: int, steps: int, sides=SIDES) -> tuple[dict, dict]:
    """{side: (model, step)} of the DiT and the configuration: the latent of our paper VAE config at CarlaSC."""
    from occlab.models.dit import dit_paper
    from occlab.models.dynamiccity import dynamiccity_paper

    vae, dit = dynamiccity_paper(), dit_paper()
    config = {"grid": list(vae.grid), "frames": vae.frames, "batch": DIT_BATCH, "rates": list(vae.rates),
              "latent_channels": vae.latent_channels, "latent_txyz": [vae.latent_sizes[a] for a in "txyz"],
              "patch_size": dit.patch_size, "depth": dit.depth, "width": dit.width, "heads": dit.heads,
              "conditioning": "none", "precision": "fp32", "threads": threads}
    built = {}
    if "occlab" in sides:
        built["occlab"] = occlab_step(False, threads, steps, kind="dit")
        config["map_occlab"] = list(built["occlab"][0].layout.map_shape)
    if "released" in sides:
        built["released"] = released_dit_step(root, vae.grid, vae.frames, vae.rates)
    return built, config


def build_sides(root: Path, small: bool, threads: int, steps: int, sides=SIDES, kind: str = "vae") -> tuple[dict, dict]:
    """{side: (model, step)} and the configuration, read from our model."""
    if kind == "dit":
        return build_dit_sides(root, threads, steps, sides)
    ours_model, ours_step = occlab_step(small, threads, steps)
    cfg = ours_model.config
    config = {"grid": list(cfg.grid), "frames": cfg.frames, "batch": 1, "rates": list(cfg.rates),
              "latent_channels": cfg.latent_channels, "precision": "fp32", "threads": threads,
              "attn_dropout": 0.0, "num_classes_occlab": cfg.num_classes, "occlab_compute": dict(OURS_COMPUTE)}
    built = {"occlab": (ours_model, ours_step)} if "occlab" in sides else {}
    del ours_model, ours_step  # a released-only process keeps none of ours (a few MB before its peak)
    if "released" in sides:
        labels = town_labels("carlasc", cfg.grid, cfg.frames, cfg.num_classes)  # what occlab's side gets
        built["released"] = released_step(root, cfg.grid, cfg.frames, cfg.rates, labels)
    return built, config


def same_configuration(ours_cfg, theirs_conf) -> list[str]:
    """Where their model's widths differ from ours (empty when the architectures are sized alike)."""
    m = theirs_conf.model
    pairs = [("latent_channels", m.latent_channels, ours_cfg.latent_channels),
             ("query_channels", m.query_channels, ours_cfg.query_channels),
             ("conv_hidden_low_res", m.conv_hidden_low_res, ours_cfg.conv_hidden_low_res),
             ("conv_hidden_high_res", m.conv_hidden_high_res, ours_cfg.conv_hidden_high_res),
             ("transformer_depth", m.transformer_depth, ours_cfg.transformer_depth),
             ("transformer_heads", m.transformer_heads, ours_cfg.transformer_heads),
             ("transformer_dim_mlp", m.transformer_dim_mlp, ours_cfg.transformer_mlp),
             ("dropout (MLP/projection)", m.dropout, ours_cfg.dropout), ("pe_freq", m.pe_freq, ours_cfg.pe_freqs)]
    return [f"{name}: released {a}, occlab {b}" for name, a, b in pairs if a != b]


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------

def run_side(root: Path, side: str, small: bool, threads: int, kind: str = "vae") -> dict:
    """One side alone in this (fresh) process: warm-up + one step; its peak RSS."""
    torch.set_num_threads(threads)
    built, _ = build_sides(root, small, threads, 1, sides=(side,), kind=kind)
    _, step = built[side]
    step()
    return {"side": side, "s_step": round(timed(step, CPU), 3), "peak_rss_gib": round(peak_rss_gib(), 3)}


def measure_memory(root: Path, small: bool, threads: int, kind: str = "vae") -> dict:
    """{side: peak RSS GiB} from one fresh subprocess per side, one after the other."""
    out = {}
    for side in SIDES:
        cmd = [sys.executable, __file__, "--released", str(root), "--threads", str(threads), "--side", side]
        cmd += ["--small"] if small else []
        cmd += ["--model", kind] if kind != "vae" else []
        cmd += ["--checkpoint"] if OURS_COMPUTE.get("checkpoint") else []
        cmd += ["--frame-chunk", str(OURS_COMPUTE["frame_chunk"])] if OURS_COMPUTE.get("frame_chunk") else []
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise OcclabError(f"the {side} memory subprocess failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_gib"]
    return out


def alternate(built: dict, steps: int) -> dict:
    """{side: step times}: one warm-up step each, then `steps` rounds, the order swapped every round."""
    times = {side: [] for side in SIDES}
    for side in SIDES:
        timed(built[side][1], CPU)  # warm-up
    for i in range(steps):
        for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
            times[side].append(timed(built[side][1], CPU))
    return times


def dit_notes(built: dict, config: dict, params: dict) -> list[str]:
    """Where the two DiT steps differ (shapes, parameters)."""
    theirs = built["released"][0]
    t, x, y, z = theirs.txyz
    config["latent_txyz_released"], config["map_released"] = [t, x, y, z], [x + t + z, y + z + t]
    config["tokens_released"] = int(theirs.patch_mask[0].sum())
    config["tokens_occlab"] = built["occlab"][0].layout.num_tokens
    notes = []
    if config["latent_txyz_released"] != config["latent_txyz"] or config["map_released"] != config["map_occlab"]:
        notes.append(f"latent shapes differ: released txyz {[t, x, y, z]} map {config['map_released']}, occlab txyz "
                     f"{config['latent_txyz']} map {config['map_occlab']}")
    if config["tokens_released"] != config["tokens_occlab"]:
        notes.append(f"tokens differ: released {config['tokens_released']}, occlab {config['tokens_occlab']}")
    pos = theirs.pos_embed.numel()
    variance = theirs.final_layer.linear.weight.shape[0] // 2 * (theirs.final_layer.linear.weight.shape[1] + 1)
    explained = params["released"] - pos - variance == params["occlab"]
    notes.append(f"parameters differ by {params['released'] - params['occlab']:+,}: their frozen positional embedding "
                 f"nn.Parameter ({pos:,}) and their learned-variance outputs (learn_sigma, {variance:,})"
                 + ("; the rest is the same count" if explained else "; the rest differs too: the architectures differ"))
    return notes


def compare(root: Path, small: bool = False, steps: int = 3, threads: int = 2, memory: bool = True,
            kind: str = "vae") -> dict:
    """Both steps alternately in this process (warm-up 1 each, `steps` rounds), then peak RSS per side."""
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    peaks = measure_memory(root, small, threads, kind) if memory else None  # first, while this process is small
    built, config = build_sides(root, small, threads, steps, kind=kind)
    if kind == "dit":
        params = {"released": count(built["released"][0]), "occlab": count(built["occlab"][0])}
        notes = dit_notes(built, config, params)
        times = alternate(built, steps)
        load_end = os.getloadavg()
        del built
        return _result(root, "dit", config, params, notes, steps, load_start, load_end, times, peaks)
    ours_cfg = built["occlab"][0].config
    theirs_model = built["released"][0]
    theirs_conf = released_conf(root, ours_cfg.grid, ours_cfg.frames, ours_cfg.rates)
    same_classes, _ = released_model(root, ours_cfg.grid, ours_cfg.frames, ours_cfg.rates, ours_cfg.num_classes)
    params = {"released": count(theirs_model), "occlab": count(built["occlab"][0]),
              "released_with_occlab_classes": count(same_classes)}
    del same_classes
    config["num_classes_released"] = theirs_conf.dataset.num_classes
    notes = same_configuration(ours_cfg, theirs_conf)
    if params["released"] != params["occlab"]:
        d = theirs_conf.dataset
        unmapped = [d.semantic_names.get(k, str(k)) for k in range(d.num_classes) if k not in d.semantic_map.values()]
        why = (f"their conf/vae/dataset/carlasc.yaml has {d.num_classes} classes (no CarlaSC label maps to "
               f"{', '.join(unmapped) or 'none'}), occlab {ours_cfg.num_classes}: embedding and output head")
        if params["released_with_occlab_classes"] == params["occlab"]:
            why += (f"; built with {ours_cfg.num_classes} classes theirs has {params['released_with_occlab_classes']:,}"
                    f" parameters, the same as ours")
        else:
            why += (f"; built with {ours_cfg.num_classes} classes theirs still has "
                    f"{params['released_with_occlab_classes']:,}: the architectures differ")
        notes.append(f"parameters differ by {params['released'] - params['occlab']:+,}: {why}")

    times = alternate(built, steps)
    load_end = os.getloadavg()
    del built, theirs_model
    return _result(root, "vae", config, params, notes, steps, load_start, load_end, times, peaks)


def _result(root: Path, kind: str, config, params, notes, steps, load_start, load_end, times, peaks) -> dict:
    """The result object of `compare` (the VAE's has no "model" key, as before --model existed)."""
    result = {"model": kind} if kind != "vae" else {}
    result.update({"config": config, "params": params, "torch": torch.__version__, "device": "cpu",
                   "released_commit": released_commit(root), "released_path": str(root),
                   "steps": steps, "warmup": 1, "load_average": [round(load_start[0], 2), round(load_end[0], 2)],
                   "released": summary(times["released"]), "occlab": summary(times["occlab"]), "notes": notes})
    result["ratio_time"] = round(result["occlab"]["s_per_step"] / result["released"]["s_per_step"], 3)
    if peaks:
        for side in SIDES:
            result[side]["peak_rss_gib"] = peaks[side]
        result["ratio_peak_rss"] = round(peaks["occlab"] / peaks["released"], 3)
    return result


def format_table(r: dict) -> str:
    """The human-readable report of `compare`."""
    c = r["config"]
    commit = r["released_commit"] or f"unknown (not a git checkout; the issue's figures are for {EXPECTED_COMMIT})"
    runs = (f"torch {r['torch']}, cpu; warm-up 1 each, then {r['steps']} alternating rounds; load average "
            f"{r['load_average'][0]} -> {r['load_average'][1]}")
    if r.get("model", "vae") == "dit":
        configuration = (f"configuration: DiT-DC/2 train (depth {c['depth']}, width {c['width']}, {c['heads']} heads, "
                         f"patch {c['patch_size']}), batch {c['batch']}, no conditioning, latent of "
                         f"{'x'.join(map(str, c['grid']))}, T={c['frames']}, rates {','.join(map(str, c['rates']))}: "
                         f"txyz {'x'.join(map(str, c['latent_txyz']))}, C={c['latent_channels']}, rollout map "
                         f"{'x'.join(map(str, c['map_occlab']))} (tokens: released {c['tokens_released']}, occlab "
                         f"{c['tokens_occlab']}), fp32, {c['threads']} threads; {runs}")
    else:
        configuration = (f"configuration: {'x'.join(map(str, c['grid']))}, T={c['frames']}, batch 1, rates "
                         f"{','.join(map(str, c['rates']))}, C={c['latent_channels']}, fp32, {c['threads']} threads, "
                         f"attention dropout 0; {runs}")
    lines = [f"released: {r['released_path']} at commit {commit}", configuration,
             f"{'':24}{'released':>14}{'occlab':>14}{'occlab/released':>18}",
             f"{'parameters':24}{r['params']['released']:>14,}{r['params']['occlab']:>14,}",
             (f"{'s/step (median)':24}{r['released']['s_per_step']:>14.3f}{r['occlab']['s_per_step']:>14.3f}"
              f"{r['ratio_time']:>18.3f}"),
             (f"{'s/step min-max':24}{r['released']['s_min']:>8.3f}-{r['released']['s_max']:<5.3f}"
              f"{r['occlab']['s_min']:>8.3f}-{r['occlab']['s_max']:<5.3f}")]
    if "ratio_peak_rss" in r:
        lines.append(f"{'peak RSS GiB (fresh)':24}{r['released']['peak_rss_gib']:>14.3f}{r['occlab']['peak_rss_gib']:>14.3f}"
                     f"{r['ratio_peak_rss']:>18.3f}")
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--released", required=True, metavar="PATH", help=f"checkout of 3DTopia/DynamicCity at {EXPECTED_COMMIT}")
    p.add_argument("--model", choices=MODELS, default="vae",
                   help="vae: the DynamicCity VAE step (default); dit: the DiT-DC/2 step at batch 2")
    p.add_argument("--small", action="store_true", help="VAE: 64x64x8, T = 8 instead of CarlaSC 128x128x8, T = 16")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (median), after one warm-up each")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-RSS runs")
    p.add_argument("--checkpoint", action="store_true",
                   help="VAE: occlab's side with activation checkpointing of its per-frame stages (as `occlab bench "
                        "step --checkpoint`); theirs has no such option")
    p.add_argument("--frame-chunk", type=int, default=0, help="VAE: occlab's frames per chunk (0: all, 4 with "
                                                               "--checkpoint)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side's peak RSS
    a = p.parse_args(argv)
    OURS_COMPUTE.clear()
    OURS_COMPUTE.update({k: v for k, v in (("checkpoint", a.checkpoint), ("frame_chunk", a.frame_chunk)) if v})
    try:
        root = check_released(a.released, a.model)
        if a.steps < 1:
            raise OcclabError(f"--steps must be at least 1, got {a.steps}")
        if a.model == "dit" and OURS_COMPUTE:
            raise OcclabError("--checkpoint and --frame-chunk are options of the VAE step (the DiT has neither)")
        if a.small and a.model == "dit":
            raise OcclabError("--small is a VAE size; the DiT runs on the latent of CarlaSC 128x128x8, T = 16 only")
        if a.side:
            print(json.dumps(run_side(root, a.side, a.small, a.threads, a.model)))
            return
        r = compare(root, small=a.small, steps=a.steps, threads=a.threads, memory=not a.no_memory, kind=a.model)
    except OcclabError as e:
        sys.exit(f"vs_released.py: {e}")
    print(json.dumps(r) if a.json else format_table(r))


if __name__ == "__main__":
    main()
