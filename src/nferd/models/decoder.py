"""The reverse student: a decoder that mirrors the teacher, from the embedding back to stride 4.

Each stage opens with a block whose 3x3 conv and shortcut are 2x2 stride-2 transposed
convolutions (RD4AD's ``de_resnet``). A stage's output must be able to take the values the
teacher's does: ResNet stages end in a ReLU, EfficientNet-Lite stages are linear, so the last
block of each stage ends in a ReLU only for non-negative teachers.
"""

from __future__ import annotations

from torch import Tensor, nn

from .kernels import Deconv2x2
from .resnet import conv1x1, conv3x3


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
