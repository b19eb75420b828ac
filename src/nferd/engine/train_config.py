"""Training options (RD4AD's recipe by default), the learning-rate schedule, the optimiser, and the
names of the files a run folder holds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..data.tiles import Tiling
from ..models.choices import LR_SCHEDULES
from ..models.nferd import config_from_dict
from .checkpoint import (
    WEIGHTS_NAME,
)

LAST = "last.safetensors"


LOG = "train_log.jsonl"


# files of a run folder that are written through a temporary file (``NAME.<random>.tmp``)
RUN_FILES = (LAST, WEIGHTS_NAME, "config.json", "train_summary.json", LOG)


CROSS_FIT_MAX_TRAIN = 100  # cross-fitting trains 5 more students: only where they are cheap


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping options (RD4AD's recipe by default)."""

    epochs: int = 200
    batch_size: int = 16
    lr: float = 0.005
    beta1: float = 0.5
    beta2: float = 0.999
    lr_schedule: str = "constant"  # 'constant' (RD4AD) or 'cosine' (lr to 0 over the epochs, per epoch)
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"
    checkpoint_every: int = 10
    holdout: float = 0.1  # fraction of train/good kept out for calibration (when no validation split)
    false_alarm_rate: float = 0.01
    threads: int | None = None
    feature_cache_dir: str | None = None
    compile: bool = False  # torch.compile the dense modules (see device.compile_dense)
    tile: int | None = None  # train on, and score, tiles of this size cut from full-resolution images
    tile_overlap: float = 0.25  # neighbouring tiles' overlap, a fraction of a tile
    cross_fit: bool = True  # few held-out images and a small training set: calibrate on cross-fitted scores too
    strict_images: bool = False  # an unreadable training image stops the run (default: skipped and listed)

    @property
    def tiling(self) -> Tiling | None:
        return Tiling(self.tile, self.tile_overlap) if self.tile else None

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule '{self.lr_schedule}'; choose one of: {', '.join(LR_SCHEDULES)}")
        checks = [("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                  ("lr", math.isfinite(self.lr) and self.lr > 0, "> 0"),
                  ("beta1", 0 <= self.beta1 < 1, ">= 0 and < 1"), ("beta2", 0 <= self.beta2 < 1, ">= 0 and < 1"),
                  ("seed", 0 <= self.seed < 2**32, "from 0 to 2**32 - 1"),
                  ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
                  ("holdout", 0 <= self.holdout < 1, ">= 0 and < 1"),
                  ("false_alarm_rate", 0 < self.false_alarm_rate < 1, "> 0 and < 1"),
                  ("threads", self.threads is None or self.threads >= 1, ">= 1 (or None)")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"training option {name} must be {allowed}, got {getattr(self, name)!r}")
        _ = self.tiling  # a bad tile size or overlap fails here

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, d, "training")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (0-based): a function of the epoch alone, so a
        resumed run follows the same schedule."""
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        return self.lr


def make_adam(params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam through torch's fused kernel where it has one for these parameters (CUDA; CPU since
    torch 2.4): the same update in one pass over the weights instead of about ten."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
        return torch.optim.Adam(params, lr=lr, betas=betas)
