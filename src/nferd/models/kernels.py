"""Speed kernels of the network: each computes exactly what a plain PyTorch operation does, in a
form the CPU runs faster, and keeps that operation's parameters and state-dict keys.
``tests/test_model.py`` and ``tests/test_fast_paths.py`` compare each with its plain twin.

- :class:`FlatCosine`: the whole-map cosine of the distillation loss with its closed-form
  gradient (plain twin: ``F.cosine_similarity`` of the flattened maps).
- :class:`StridedPointwise`: a strided 1x1 convolution as subsampling then a 1x1 convolution
  (plain twin: ``nn.Conv2d(kernel_size=1, stride=s)``).
- :class:`Deconv2x2`: a 2x2 stride-2 transposed convolution as one matrix product and a pixel
  shuffle (plain twin: ``nn.ConvTranspose2d(kernel_size=2, stride=2)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def channels_last_layout(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def flat_pair(t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Both maps as B x (C*H*W) rows in ONE element order, the order of their memory where it can
    be: the whole-map cosine does not care about the order, and ``flatten(1)`` of a channels-last
    map is a transposing copy (for WRN50's layer1 batch, 64 MiB each way)."""
    if channels_last_layout(t):
        s = s.contiguous(memory_format=torch.channels_last)
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1), s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)
    return t.reshape(t.shape[0], -1), s.contiguous().reshape(s.shape[0], -1)


def row_dots(a: Tensor, b: Tensor) -> Tensor:
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
        dot, ss, tt = row_dots(s32, t32), row_dots(s32, s32), row_dots(t32, t32)
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


class StridedPointwise(nn.Conv2d):
    """A strided 1x1 convolution run as "take every stride-th pixel, then a 1x1 convolution":
    the same arithmetic, but its backward is a plain matrix product, where oneDNN's strided
    backward is slow (the OCBE's 3072 -> 2048 shortcut of the WRN50 student, say). Same parameters
    and state-dict keys as ``nn.Conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        sy, sx = self.stride
        return F.conv2d(x[:, :, ::sy, ::sx], self.weight, self.bias)


class Deconv2x2(nn.ConvTranspose2d):
    """A 2x2 stride-2 transposed convolution run as one matrix product and a pixel shuffle.

    With kernel = stride every output pixel gets exactly one input pixel's contribution, so the
    transposed convolution is ``x (NHW x Cin) @ w (Cin x 4 Cout)`` laid out into the 2x2 blocks:
    the same sums, but oneDNN's transposed-convolution kernels ran them at a third to a half of
    the matmul's speed (about half the time of the WRN50 decoder's 2048 -> 1024 upsample, forward
    and backward). Same parameters and keys as ``nn.ConvTranspose2d``;
    channels_last input only (what nferd runs), NCHW input takes torch's kernel and keeps its layout.
    """

    def __init__(self, in_planes: int, out_planes: int, bias: bool = False) -> None:
        super().__init__(in_planes, out_planes, kernel_size=2, stride=2, bias=bias)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is not None or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x, output_size)  # NCHW input: a copy would eat the gain; keep its layout
        n, c, h, w = x.shape
        cout = self.out_channels
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view for channels_last input
        cols = self.weight.permute(0, 2, 3, 1).reshape(c, 4 * cout)  # columns ordered (di, dj, out)
        y = rows @ cols
        if self.bias is not None:
            y = y + self.bias.repeat(4)
        y = y.view(n, h, w, 2, 2, cout).permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, cout)
        return y.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory
