"""Models: one file per method (DESIGN §7). They import nothing from occlab.data, occlab.train or occlab.report."""
from __future__ import annotations

from typing import Callable, NamedTuple

from occlab.models import dynamiccity, occsora, sep4d, xscene
from occlab.models.dynamiccity import (PRESETS as DYNAMICCITY_PRESETS, DynamicCity, DynamicCityConfig,
                                       dynamiccity_paper, dynamiccity_small, dynamiccity_tiny)
from occlab.models.dynamiccity import model_info as dynamiccity_info
from occlab.models.occsora import OccSora, OccSoraConfig
from occlab.models.sep4d import Sep4D, Sep4DConfig
from occlab.models.xscene import XSceneVAE, XSceneVAEConfig


class Registered(NamedTuple):
    """What the trainer, the run cache and `occlab model info` need of a model."""

    config: type  # a dataclass, rebuilt from JSON by occlab.train.config.from_dict
    model: type  # model(config) -> nn.Module
    presets: dict[str, Callable]  # paper | small | tiny -> factory(grid, frames, **overrides) -> config
    info: Callable  # config -> {parameters, shapes, compression_ratio, ...}


# The occupancy VAEs of the shared trainer: labels (B, T, X, Y, Z) -> {"logits", "mu"/"logvar" or "vq_loss", ...}
# (X-Scene's triplane VAE is static: it encodes each frame alone and, in training, scores its own query points)
MODELS = {
    "dynamiccity": Registered(DynamicCityConfig, DynamicCity, dynamiccity.PRESETS, dynamiccity.model_info),
    "sep4d": Registered(Sep4DConfig, Sep4D, sep4d.PRESETS, sep4d.model_info),
    "occsora": Registered(OccSoraConfig, OccSora, occsora.PRESETS, occsora.model_info),
    "xscene": Registered(XSceneVAEConfig, XSceneVAE, xscene.PRESETS, xscene.model_info),
}

__all__ = ["DYNAMICCITY_PRESETS", "MODELS", "DynamicCity", "DynamicCityConfig", "OccSora", "OccSoraConfig",
           "Registered", "Sep4D", "Sep4DConfig", "XSceneVAE", "XSceneVAEConfig", "dynamiccity_info",
           "dynamiccity_paper", "dynamiccity_small", "dynamiccity_tiny"]
