"""The reverse student: a decoder that mirrors the teacher, from the embedding back to stride 4.

Each stage opens with a block whose 3x3 conv and shortcut are 2x2 stride-2 transposed
convolutions (RD4AD's ``de_resnet``). A stage's output must be able to take the values the
teacher's does: ResNet stages end in a ReLU, EfficientNet-Lite stages are linear, so the last
block of each stage ends in a ReLU only for non-negative teachers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .resnet import conv1x1, conv3x3


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


def deconv2x2(in_planes: int, out_planes: int) -> Deconv2x2:
    return Deconv2x2(in_planes, out_planes)


class DeBasicBlock(nn.Module):
    """Basic block; with stride 2 its first conv upsamples (transposed 2x2)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module | None = None,
                 base_width: int = 64, final_relu: bool = True) -> None:
        super().__init__()
        self.conv1 = deconv2x2(inplanes, planes) if stride == 2 else conv3x3(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.upsample = upsample
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + identity
        return self.relu(out) if self.final_relu else out


class DeBottleneck(nn.Module):
    """Bottleneck; with stride 2 its middle conv upsamples (transposed 2x2)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module | None = None,
                 base_width: int = 64, final_relu: bool = True) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = deconv2x2(width, width) if stride == 2 else conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + identity
        return self.relu(out) if self.final_relu else out


def make_up_layer(block: type[DeBasicBlock] | type[DeBottleneck], inplanes: int, out_channels: int,
                  blocks: int, base_width: int, final_relu: bool) -> nn.Sequential:
    """One decoder stage: doubles the resolution and ends with ``out_channels`` channels."""
    planes = out_channels // block.expansion
    upsample = nn.Sequential(deconv2x2(inplanes, out_channels), nn.BatchNorm2d(out_channels))
    layers = [block(inplanes, planes, 2, upsample, base_width)]
    layers += [block(out_channels, planes, base_width=base_width) for _ in range(1, blocks)]
    layers[-1].final_relu = final_relu
    return nn.Sequential(*layers)


class ReverseDecoder(nn.Module):
    """Three up-stages rebuilding teacher stages 3, 2, 1 (in that order) from the embedding."""

    def __init__(self, in_channels: int, stage_channels: tuple[int, int, int],
                 block: type[DeBasicBlock] | type[DeBottleneck], layers: tuple[int, int, int],
                 base_width: int = 64, final_relu: bool = True) -> None:
        super().__init__()
        c1, c2, c3 = stage_channels
        self.layer1 = make_up_layer(block, in_channels, c3, layers[0], base_width, final_relu)
        self.layer2 = make_up_layer(block, c3, c2, layers[1], base_width, final_relu)
        self.layer3 = make_up_layer(block, c2, c1, layers[2], base_width, final_relu)

    @property
    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Plain RD decoding; returns maps in teacher order (stage 1, 2, 3)."""
        a = self.layer1(x)
        b = self.layer2(a)
        c = self.layer3(b)
        return [c, b, a]
