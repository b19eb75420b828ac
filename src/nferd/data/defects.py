"""Synthetic defects pasted into good images, to compare scoring designs without real defects.

Two kinds, after CutPaste (Li et al., CVPR 2021) and DRAEM (Zavrtanik et al., ICCV 2021):

* **cut-paste**: a rectangle cut from another good image (2-10 % of the area, any aspect from 1:3
  to 3:1), its colours jittered, pasted at a random place;
* **blend**: a smooth random blob (low-frequency noise, thresholded, as DRAEM's Perlin masks) where
  the image is blended with a shuffled, flipped copy of another good image.

Both come with their masks. They are not the product's real defects; they only rank designs that
differ in how they weigh evidence, which a user can run on their own good images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def blob_mask(size: int, g: torch.Generator, coverage: tuple[float, float] = (0.01, 0.08)) -> Tensor:
    """A 1 x S x S mask of one or a few smooth blobs covering roughly ``coverage`` of the image."""
    cells = int(torch.randint(3, 9, (1,), generator=g))
    noise = torch.rand(1, 1, cells, cells, generator=g)
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0]
    share = float(torch.empty(1).uniform_(*coverage, generator=g))
    cut = torch.quantile(field.flatten(), 1 - share)
    return (field > cut).float()


def cut_paste(image: Tensor, source: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``image`` (3 x S x S in [0, 1]) with a jittered rectangle of ``source`` pasted in, and its mask."""
    s = image.shape[-1]
    area = float(torch.empty(1).uniform_(0.02, 0.10, generator=g)) * s * s
    aspect = float(torch.empty(1).uniform_(-1.1, 1.1, generator=g).exp())
    h = max(2, min(s - 1, int(round((area * aspect) ** 0.5))))
    w = max(2, min(s - 1, int(round((area / aspect) ** 0.5))))
    y0, x0 = int(torch.randint(0, s - h + 1, (1,), generator=g)), int(torch.randint(0, s - w + 1, (1,), generator=g))
    y1, x1 = int(torch.randint(0, s - h + 1, (1,), generator=g)), int(torch.randint(0, s - w + 1, (1,), generator=g))
    patch = source[:, y0:y0 + h, x0:x0 + w]
    gain = torch.empty(3, 1, 1).uniform_(0.7, 1.3, generator=g)
    shift = torch.empty(3, 1, 1).uniform_(-0.1, 0.1, generator=g)
    out = image.clone()
    out[:, y1:y1 + h, x1:x1 + w] = (patch * gain + shift).clamp(0, 1)
    mask = torch.zeros(1, s, s)
    mask[:, y1:y1 + h, x1:x1 + w] = 1
    return out, mask


def blend(image: Tensor, source: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``image`` blended, inside a smooth blob, with a shuffled, flipped copy of ``source``."""
    s = image.shape[-1]
    mask = blob_mask(s, g)
    k = 4
    tiles = source.unfold(1, s // k, s // k).unfold(2, s // k, s // k)  # 3 x k x k x s/k x s/k
    order = torch.randperm(k * k, generator=g)
    tiles = tiles.reshape(3, k * k, s // k, s // k)[:, order].reshape(3, k, k, s // k, s // k)
    texture = tiles.permute(0, 1, 3, 2, 4).reshape(3, s, s).flip(-1)
    beta = float(torch.empty(1).uniform_(0.0, 0.6, generator=g))  # how much of the good image shows through
    out = image * (1 - mask) + mask * (beta * image + (1 - beta) * texture)
    return out.clamp(0, 1), mask


KINDS = {"cut_paste": cut_paste, "blend": blend}


def synthetic_defects(images: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """One synthetic defect per good image (N x 3 x S x S), the kinds alternating, each from another
    image of the set: the defective images and their masks (N x 1 x S x S)."""
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    if n < 2:
        raise ValueError("synthetic defects need at least 2 good images (each takes its patch from another)")
    outs, masks = [], []
    for i in range(n):
        j = (i + 1 + int(torch.randint(0, n - 1, (1,), generator=g))) % n  # any other image
        make = cut_paste if i % 2 == 0 else blend
        out, mask = make(images[i], images[j], g)
        outs.append(out)
        masks.append(mask)
    return torch.stack(outs), torch.stack(masks)
