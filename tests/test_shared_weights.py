"""Real third-party weights that exist only on the developers' machines (skipped elsewhere)."""

from __future__ import annotations

import torch

from nferd.models.teacher import build_teacher

from .conftest import shared_path


def test_resnet152_file_loads_strictly_and_gives_finite_features() -> None:
    path = shared_path("weights", "resnet152_imagenet_to_layer3.safetensors")
    t = build_teacher("resnet152", path)
    feats = t(torch.rand(1, 3, 256, 256))
    assert [f.shape[1] for f in feats] == [256, 512, 1024]
    assert all(torch.isfinite(f).all() for f in feats)
    assert all((f >= 0).all() for f in feats)  # ResNet stage outputs end in a ReLU
