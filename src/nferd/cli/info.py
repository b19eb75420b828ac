"""Model size and cost: parameter counts per part and forward GFLOPs (torch.utils.flop_counter)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.nferd import NFERD, ModelConfig


def forward_gflops(model: NFERD, image_size: int) -> float:
    """GFLOPs (2 x multiply-adds) of one image through teacher, student, banks, fusion and map."""
    model.eval()
    x = torch.rand(1, 3, image_size, image_size)
    with torch.no_grad():
        model.anomaly_maps(*model(x))  # fills eval-mode caches (projected banks and keys), as in deployment
        with FlopCounterMode(display=False) as fc:
            t, s = model(x)
            model.anomaly_maps(t, s)
    return fc.get_total_flops() / 1e9


def model_info(config: ModelConfig, teacher_weights: str | None = "random") -> dict[str, Any]:
    model = NFERD(config, teacher_weights=teacher_weights)
    return {"teacher": config.teacher, "image_size": config.image_size, "config": config.to_dict(),
            "params": model.param_counts(), "gflops": forward_gflops(model, config.image_size),
            "stage_channels": list(model.teacher.stage_channels)}
