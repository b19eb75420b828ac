"""Model size and cost: parameter counts per part and forward GFLOPs (torch.utils.flop_counter).

A memory is counted full, as a training set of 200 images (MVTec AD's typical size) leaves it."""

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


def full_memory(model: NFERD, images: int = 200) -> None:
    """Fill an empty memory with the rows a training set of ``images`` images would leave in it
    (random values: the cost of the search depends on the row count alone)."""
    if model.memory is None:
        return
    from ..models.memory import memory_rows
    s = model.config.image_size // (4 * 2 ** (model.config.memory_grid_stage - 1))
    rows = memory_rows(images * s * s, model.memory.rows.shape[1], model.config.memory_mib)
    model.memory.resize(rows)
    model.memory.rows.normal_()
    model.memory.row_sq.copy_((model.memory.rows ** 2).sum(1))


def model_info(config: ModelConfig, teacher_weights: str | None = "random") -> dict[str, Any]:
    model = NFERD(config, teacher_weights=teacher_weights)
    full_memory(model)
    return {"teacher": config.teacher, "image_size": config.image_size, "config": config.to_dict(),
            "params": model.param_counts(), "gflops": forward_gflops(model, config.image_size),
            "stage_channels": list(model.teacher.stage_channels)}
