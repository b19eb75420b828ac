"""Anomaly map: per-stage 1 - cosine(teacher, student), upsampled, combined, blurred.

The Gaussian blur (sigma 4, kernel 2*int(4*sigma+0.5)+1 = 33, as SciPy's gaussian_filter with
its default truncate=4) is a fixed separable convolution on the model's device, so the whole
map is part of the graph: batched, exportable to ONNX, no NumPy round trip. Borders are
reflected like ``torch``'s 'reflect' padding (SciPy calls that mode 'mirror').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COMBINES = ("sum", "prod")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of N x 1 x H x W maps; sigma <= 0 disables it."""

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma
        k = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", k, persistent=False)
        self.radius = (k.numel() - 1) // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.sigma <= 0:
            return x
        r, k = self.radius, self.kernel.to(x.dtype)
        mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
        x = F.pad(x, (r, r, 0, 0), mode=mode)
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = F.pad(x, (0, 0, r, r), mode=mode)
        return F.conv2d(x, k.view(1, 1, -1, 1))


def stage_distance(t: Tensor, s: Tensor) -> Tensor:
    """Per-location 1 - cosine over channels: N x 1 x h x w, computed in fp32."""
    return (1 - F.cosine_similarity(t.float(), s.float(), dim=1)).unsqueeze(1)


def combine_stages(distances: list[Tensor], size: tuple[int, int], combine: str = "sum") -> Tensor:
    """Per-stage N x 1 x h x w distance maps upsampled bilinearly to ``size`` and summed (or
    multiplied): the unblurred anomaly map, also for stage maps an analysis has rescaled."""
    if combine not in COMBINES:
        raise ValueError(f"unknown map combine '{combine}'; choose one of: {', '.join(COMBINES)}")
    out = None
    for d in distances:
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=True)
        out = d if out is None else (out + d if combine == "sum" else out * d)
    return out


def anomaly_map(teacher: list[Tensor], student: list[Tensor], size: tuple[int, int],
                combine: str = "sum") -> Tensor:
    """Unblurred map at ``size``: stage distances upsampled bilinearly, summed (or multiplied)."""
    return combine_stages([stage_distance(t, s) for t, s in zip(teacher, student)], size, combine)


def image_score(maps: Tensor) -> Tensor:
    """Image anomaly score: the maximum of the blurred map."""
    return maps.flatten(1).amax(dim=1)


