"""torch-fidelity feature extractors over occlab's own checkpointed networks (f2d, f3d): one class factory."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from occlab.errors import OcclabError


def checkpoint_extractor(name: str, load: Callable[[str], nn.Module],
                         outputs: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]) -> type:
    """A FeatureExtractorBase subclass providing "features" (FID/KID/PRC) and "logits" (IS) of a checkpoint."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class CheckpointFeatures(FeatureExtractorBase):
        """torch-fidelity extractor over an occlab network checkpoint (feature_extractor_weights_path)."""

        def __init__(self, extractor_name: str, features_list: list[str], feature_extractor_weights_path=None,
                     **kwargs):
            super().__init__(extractor_name, features_list)
            if feature_extractor_weights_path is None:
                raise OcclabError(f"the {name} extractor needs its checkpoint (feature_extractor_weights_path)")
            self.net = load(feature_extractor_weights_path)
            self.requires_grad_(False)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "logits" if metric == "isc" else "features"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            """The requested outputs, in the order of the features list."""
            out = outputs(self.net, x)
            return tuple(out[k].float() for k in self.features_list)

    CheckpointFeatures.__name__ = CheckpointFeatures.__qualname__ = f"{name.replace('occlab-', '').upper()}Features"
    return CheckpointFeatures
