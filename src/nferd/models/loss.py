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

LOSSES = ("flat", "pixel")


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _flat_pair(t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Both maps as B x (C*H*W) rows in ONE element order, the order of their memory where it can
    be: the whole-map cosine does not care about the order, and ``flatten(1)`` of a channels-last
    map is a transposing copy (for WRN50's layer1 batch, 64 MiB each way)."""
    if _channels_last(t):
        s = s.contiguous(memory_format=torch.channels_last)
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1), s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)
    return t.reshape(t.shape[0], -1), s.contiguous().reshape(s.shape[0], -1)


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """Dot products of matching rows, one BLAS dot each: vecdot, bmm and einsum make product copies
    or run slow batched kernels (several times slower on large rows),
    and fp32 ``vector_norm`` sums naively (relative error 2.5e-5 on such rows, against 3e-7),
    which the cosine gradient's cancellation near cos = 1 would amplify."""
    return torch.stack([torch.dot(x, y) for x, y in zip(a, b)])


class FlatCosine(torch.autograd.Function):
    """Row-wise cosine of teacher ``t`` (constant) and student ``s``, in fp32 whatever their dtype,
    with the closed-form gradient ``(t / (|s| |t|) - cos s / |s|^2)``: three reductions forward and
    one fused pass backward, where ``F.cosine_similarity`` normalises copies of both maps and keeps
    them for autograd (several times slower on WRN50's three stages, forward and backward)."""

    @staticmethod
    def forward(ctx, t: Tensor, s: Tensor) -> Tensor:  # type: ignore[override]
        t32, s32 = t.float(), s.float()
        dot, ss, tt = _row_dots(s32, t32), _row_dots(s32, s32), _row_dots(t32, t32)
        den = (ss * tt).sqrt().clamp_min(1e-8)  # F.cosine_similarity's eps
        cos = dot / den
        ctx.save_for_backward(t32, s32, cos, den, ss)
        ctx.student_dtype = s.dtype
        return cos

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        t32, s32, cos, den, ss = ctx.saved_tensors
        along_t = (grad / den).unsqueeze(1)
        along_s = (-grad * cos / ss.clamp_min(1e-16)).unsqueeze(1)
        return None, torch.addcmul(t32 * along_t, s32, along_s).to(ctx.student_dtype)


def distillation_loss(teacher: list[Tensor], student: list[Tensor], kind: str = "flat") -> Tensor:
    if kind not in LOSSES:
        raise ValueError(f"unknown loss '{kind}'; choose one of: {', '.join(LOSSES)}")
    total = teacher[0].new_zeros((), dtype=torch.float32)
    for t, s in zip(teacher, student):
        if kind == "flat":
            cos = FlatCosine.apply(*_flat_pair(t.detach(), s))
        else:
            cos = F.cosine_similarity(t.float(), s.float(), dim=1)
        total = total + (1 - cos).mean()
    return total
