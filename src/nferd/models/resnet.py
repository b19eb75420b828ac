"""ResNet and Wide ResNet encoders with torchvision's state-dict key names.

torchvision itself is not a dependency (its wheels are tied to one torch build), so the
architecture is written here, plainly, with the same module names: a torchvision
checkpoint loads with ``strict=True``. Only the stem and layer1..layer3 are built, because
reverse distillation never needs layer4 (the one-class embedding replaces it), which saves
about a fifth of the teacher's FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .kernels import StridedPointwise


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    if stride == 1:
        return nn.Conv2d(in_planes, out_planes, 1, bias=False)
    return StridedPointwise(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projected) shortcut: ResNet-18/34."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, base_width: int = 64) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision's v1.5), 1x1 expand: ResNet-50 and wider."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@dataclass(frozen=True)
class ResNetSpec:
    """What distinguishes one member of the family: block type, depth per stage, width."""

    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int, int]
    width_per_group: int = 64


RESNET_SPECS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": ResNetSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": ResNetSpec(Bottleneck, (3, 4, 23, 3)),
    "resnet152": ResNetSpec(Bottleneck, (3, 8, 36, 3)),
    "wide_resnet50_2": ResNetSpec(Bottleneck, (3, 4, 6, 3), 128),
    "wide_resnet101_2": ResNetSpec(Bottleneck, (3, 4, 23, 3), 128),
}


def make_layer(block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int,
               blocks: int, stride: int = 1, base_width: int = 64) -> nn.Sequential:
    """One ResNet stage; the first block changes resolution and channels."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample, base_width)]
    layers += [block(planes * block.expansion, planes, base_width=base_width) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNetEncoder(nn.Module):
    """Stem + layer1..layer3 of a torchvision ResNet; returns the three stage maps.

    Strides 4, 8 and 16; channels ``stage_channels`` (256/512/1024 for ResNet-50 and up).
    """

    def __init__(self, spec: ResNetSpec) -> None:
        super().__init__()
        block, w = spec.block, spec.width_per_group
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_layer(block, 64, 64, spec.layers[0], 1, w)
        self.layer2 = make_layer(block, 64 * block.expansion, 128, spec.layers[1], 2, w)
        self.layer3 = make_layer(block, 128 * block.expansion, 256, spec.layers[2], 2, w)
        self.stage_channels = (64 * block.expansion, 128 * block.expansion, 256 * block.expansion)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


def strip_unused_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop layer4 and the classifier from a full torchvision checkpoint (we never build them)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(("layer4.", "fc."))}
