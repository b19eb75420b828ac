"""Hybrid attention fusion module (HAFM) and the fusion variants it is compared with.

HAFM (section 3.3): the student map ``s`` and the recalled normal map ``v`` are combined
(concat -> 1x1 conv back to C), then channel attention and spatial attention are applied to
that combined map IN PARALLEL (CBAM applies them one after the other) and the two attended
maps are summed. The result refines ``s`` as a residual scaled by a learnable factor that
starts at 0, so the fusion starts as the plain student and cannot swamp it (a prototype's
unbounded residual grew to 2-3x the student map).

Variants for ablations: ``cbam`` (serial), ``add`` (s + v), ``concat`` (1x1 conv of [s, v]),
``none`` (s unchanged: with no bank this is exactly RD4AD).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .choices import FUSIONS


class ChannelAttention(nn.Module):
    """Per-channel weights from avg- and max-pooled descriptors through a shared MLP."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """Per-location weights from the channel mean and channel max through a 7x7 conv."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(desc))


class _Combine(nn.Module):
    """concat(s, v) -> 1x1 conv -> BN: one map of C channels holding both sources."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, s: Tensor, v: Tensor) -> Tensor:
        return self.bn(self.conv(torch.cat([s, v], dim=1)))


class HAFM(nn.Module):
    """Parallel channel + spatial attention over the combined map, added to ``s`` as a bounded residual."""

    def __init__(self, channels: int, reduction: int = 16, serial: bool = False) -> None:
        super().__init__()
        self.combine = _Combine(channels)
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention()
        self.serial = serial
        self.scale = nn.Parameter(torch.zeros(1))

    def attend(self, z: Tensor) -> Tensor:
        if self.serial:  # CBAM: spatial attention sees the channel-attended map
            z = z * self.channel(z)
            return z * self.spatial(z)
        return z * self.channel(z) + z * self.spatial(z)

    def forward(self, s: Tensor, v: Tensor) -> Tensor:
        return s + self.scale * self.attend(self.combine(s, v))


class AddFusion(nn.Module):
    """Plain addition: the paper's 'direct addition' baseline."""

    def forward(self, s: Tensor, v: Tensor) -> Tensor:
        return s + v


class ConcatFusion(nn.Module):
    """Channel concatenation followed by a 1x1 conv back to C channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, 1, bias=False)

    def forward(self, s: Tensor, v: Tensor) -> Tensor:
        return self.conv(torch.cat([s, v], dim=1))


class NoFusion(nn.Module):
    """Ignore the recalled map (RD4AD when there is no bank)."""

    def forward(self, s: Tensor, v: Tensor | None = None) -> Tensor:
        return s


def make_fusion(kind: str, channels: int, reduction: int = 16) -> nn.Module:
    if kind == "hafm":
        return HAFM(channels, reduction)
    if kind == "cbam":
        return HAFM(channels, reduction, serial=True)
    if kind == "add":
        return AddFusion()
    if kind == "concat":
        return ConcatFusion(channels)
    if kind == "none":
        return NoFusion()
    raise ValueError(f"unknown fusion '{kind}'; choose one of: {', '.join(FUSIONS)}")
