"""Run configuration: small dataclasses for the data and the optimisation, saved beside every run."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Which windows a run trains and validates on."""

    dataset: str = "synthetic_town"
    data_root: str | None = None
    geometry: str = "carlasc"  # the synthetic town's geometry (readers know their own)
    frames: int = 16
    crop: tuple[int, int, int] | None = None  # a smaller (X, Y, Z) grid
    crop_mode: str = "center"  # "center" on the ego, or "spread" over the grid (see WindowDataset)
    train_sequences: int = 64  # synthetic town only: scenes of the train split
    val_sequences: int = 8
    stride: int = 1
    skip: int = 1

    def source_options(self, split: str) -> dict:
        """Keyword options for occlab.data.make_dataset."""
        opts: dict = {"frames": self.frames, "stride": self.stride, "skip": self.skip, "crop": self.crop,
                      "crop_mode": self.crop_mode}
        if self.dataset == "synthetic_town":
            n = self.train_sequences if split == "train" else self.val_sequences
            opts.update(geometry=self.geometry, num_sequences=n, seq_len=(self.frames - 1) * self.skip + 1)
        return opts


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and checkpoint cadence of a run."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)  # MultiStepLR at these fractions of the steps
    gamma: float = 0.7  # released DynamicCity: epochs 50..90 of 100, decay 0.7
    precision: str = "fp32"  # fp32 | bf16 | fp16 (with a grad scaler)
    ce_weight: float = 1.0
    lovasz_weight: float = 1.0
    kl_weight: float = 0.005  # DynamicCity paper (released code: 0.0015)
    class_weighted: bool = True
    grad_clip: float = 0.0
    val_every: int = 0  # 0: validate at the end only
    ckpt_every: int = 100
    val_batches: int | None = None  # validate on the first N windows (None: all)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # CPU threads (None: torch's default)
    num_workers: int = 0


def to_dict(cfg) -> dict:
    """A JSON-able dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a config dataclass from `to_dict` output (lists back to tuples, unknown keys rejected)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    out = {}
    for key, value in data.items():
        if isinstance(value, list) and "tuple" in str(hints[key]):
            value = tuple(value)
        out[key] = value
    return cls(**out)


__all__ = ["DataConfig", "TrainConfig", "field", "from_dict", "to_dict"]
