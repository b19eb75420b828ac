"""Distillation loss: how far each student stage is from the teacher stage it rebuilds.

``flat`` (default, RD4AD's code): per stage, 1 - cosine between the WHOLE flattened maps of
teacher and student, one value per sample, averaged over the batch, summed over stages.
``pixel`` (the paper's formula): per stage, the mean over locations of 1 - cosine over channels.
Both in fp32: cosine of near-parallel bf16 vectors loses the small differences that matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import FlatCosine, flat_pair

LOSSES = ("flat", "pixel")


def distillation_loss(teacher: list[Tensor], student: list[Tensor], kind: str = "flat") -> Tensor:
    if kind not in LOSSES:
        raise ValueError(f"unknown loss '{kind}'; choose one of: {', '.join(LOSSES)}")
    total = teacher[0].new_zeros((), dtype=torch.float32)
    for t, s in zip(teacher, student):
        if kind == "flat":
            cos = FlatCosine.apply(*flat_pair(t.detach(), s))
        else:
            cos = F.cosine_similarity(t.float(), s.float(), dim=1)
        total = total + (1 - cos).mean()
    return total
