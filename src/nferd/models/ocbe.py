"""One-class bottleneck embedding (OCBE): fuse the teacher's three stages into one compact code.

As in RD4AD's code: stage 1 goes through two strided 3x3 convs, stage 2 through one, so both
reach stage 3's size and channels; the three are concatenated and a fresh ResNet layer
(first block stride 2) squeezes them into the embedding the student decodes. RD4AD's unused
``conv4``/``bn4`` are left out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .resnet import BasicBlock, Bottleneck, conv3x3, make_layer


class OCBE(nn.Module):
    """Multi-scale fusion + one-class embedding; ``out_channels`` feeds the student."""

    def __init__(self, stage_channels: tuple[int, int, int], block: type[BasicBlock] | type[Bottleneck],
                 embed_planes: int, blocks: int = 3, base_width: int = 64) -> None:
        super().__init__()
        c1, c2, c3 = stage_channels
        self.conv1 = conv3x3(c1, c2, 2)
        self.bn1 = nn.BatchNorm2d(c2)
        self.conv2 = conv3x3(c2, c3, 2)
        self.bn2 = nn.BatchNorm2d(c3)
        self.conv3 = conv3x3(c2, c3, 2)
        self.bn3 = nn.BatchNorm2d(c3)
        self.relu = nn.ReLU(inplace=True)
        self.bn_layer = make_layer(block, 3 * c3, embed_planes, blocks, stride=2, base_width=base_width)
        self.out_channels = embed_planes * block.expansion

    def forward(self, feats: list[Tensor]) -> Tensor:
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(feats[0]))))))
        l2 = self.relu(self.bn3(self.conv3(feats[1])))
        # feats[2] in the dtype of the others: under autocast the cat is bf16 (the convolutions after it
        # cast to bf16 anyway: same numbers), not an fp32 copy of all 3 x c3 channels and its gradient
        return self.bn_layer(torch.cat([l1, l2, feats[2].to(l1.dtype)], 1))
