"""Models: one file per method (DESIGN §7). They import nothing from occlab.data, occlab.train or occlab.report."""
from __future__ import annotations

from occlab.models.dynamiccity import (PRESETS as DYNAMICCITY_PRESETS, DynamicCity, DynamicCityConfig,
                                       dynamiccity_paper, dynamiccity_small, dynamiccity_tiny)
from occlab.models.dynamiccity import model_info as dynamiccity_info

__all__ = ["DYNAMICCITY_PRESETS", "MODELS", "DynamicCity", "DynamicCityConfig", "dynamiccity_info", "dynamiccity_paper",
           "dynamiccity_small", "dynamiccity_tiny"]

# name -> (config class, model class): what the trainer and the run cache can build from a JSON config
MODELS = {"dynamiccity": (DynamicCityConfig, DynamicCity)}
