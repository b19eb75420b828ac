"""A memory of every normal training position: PatchCore's scorer (Roth et al., CVPR 2022) on
the teacher's features.

Each position is described by its *locally aware* feature: the teacher maps of the chosen stages,
each averaged over its 3 x 3 neighbourhood, the coarser ones upsampled to the finest chosen grid,
concatenated. The memory holds these features for every position of every training image, thinned
by a sampler (:mod:`nferd.models.coreset`) to a bounded number of rows; a position of a new image
scores its Euclidean distance to the nearest row. No training and no defect is needed, and with few
good images this is often the stronger evidence (the student has little to learn from).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NferdError
from .coreset import Sampler

QUERY_BLOCK, KEY_BLOCK = 512, 2048  # one block of the search: 4 MiB of products per image, few enough calls


def locally_aware(stages: list[Tensor], which: tuple[int, ...], pool: int = 3, grid: int | None = None) -> Tensor:
    """B x D x H x W features of the ``which`` teacher stages (1 = finest): each stage map averaged
    over ``pool`` x ``pool`` neighbours (stride 1, same size), brought to the grid of stage ``grid``
    (default: the finest chosen one; coarser maps upsampled bilinearly, finer ones averaged over
    the cells) and concatenated over channels (D = their channels summed)."""
    maps = [stages[i - 1].float() for i in which]
    size = stages[(grid or which[0]) - 1].shape[-2:]
    out = []
    for m in maps:
        if pool > 1:
            m = F.avg_pool2d(m, pool, stride=1, padding=pool // 2, count_include_pad=False)
        if m.shape[-2] > size[0]:
            m = F.avg_pool2d(m, int(m.shape[-2]) // int(size[0]))  # a fixed kernel: exports as a constant
        elif m.shape[-2:] != size:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        out.append(m)
    return torch.cat(out, dim=1)


def nearest_euclidean(q: Tensor, keys: Tensor, key_sq: Tensor) -> Tensor:
    """Squared Euclidean distance of every query row (B x Q x D) to its nearest key (P x D, squared
    norms ``key_sq``: P), in fixed blocks of queries and keys: B x Q x P distances are never held at
    once, and the same blocks trace into an exported graph with a free batch axis. A key whose
    squared norm is +inf is never the nearest (how an image's own rows are left out)."""
    rows = []
    for a in range(0, q.shape[1], QUERY_BLOCK):
        qa, best = q[:, a:a + QUERY_BLOCK], None
        for b in range(0, keys.shape[0], KEY_BLOCK):
            # |q - k|^2 = |q|^2 - 2 q.k + |k|^2; the |q|^2 term is the same for every key
            part = (key_sq[b:b + KEY_BLOCK] - 2 * (qa @ keys[b:b + KEY_BLOCK].t())).amin(dim=2)
            best = part if best is None else torch.minimum(best, part)
        rows.append(best + (qa * qa).sum(2))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)).clamp_min(0)


class MemoryBank(nn.Module):
    """Locally aware normal features of every training position (``rows``, P x D), the training
    image each came from (``source``) and where in it (``position``: the flat index on the memory's
    grid), searched for the nearest row of each query position.

    The row count is known only once the bank is filled: :meth:`resize` makes room before a load.
    """

    def __init__(self, channels: int, stages: tuple[int, ...], grid: int | None = None) -> None:
        super().__init__()
        self.stages, self.grid = tuple(stages), grid
        self.register_buffer("rows", torch.zeros(0, channels))
        self.register_buffer("source", torch.zeros(0, dtype=torch.long))
        self.register_buffer("position", torch.zeros(0, dtype=torch.long))
        self.register_buffer("row_sq", torch.zeros(0))

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    def features(self, teacher_maps: list[Tensor]) -> Tensor:
        return locally_aware(teacher_maps, self.stages, grid=self.grid)

    @torch.no_grad()
    def fill(self, batches: Iterable[tuple[list[Tensor], Tensor]], count: int, sampler: Sampler) -> None:
        """Keep ``count`` rows (chosen by ``sampler``) of the locally aware features of every position
        of the images in ``batches`` (each: the three teacher maps of some images and their ids)."""
        feats, ids, where = [], [], []
        for maps, image_ids in batches:
            f = self.features(maps)
            b, d, h, w = f.shape
            feats.append(f.permute(0, 2, 3, 1).reshape(b * h * w, d))
            ids.append(image_ids.view(-1, 1).expand(b, h * w).reshape(-1))
            where.append(torch.arange(h * w, device=f.device).repeat(b))
        allf, allid = torch.cat(feats), torch.cat(ids)
        keep = sampler.select(allf, count)
        self.rows = allf[keep].contiguous()
        self.source = allid[keep].to(torch.long)
        self.position = torch.cat(where)[keep].to(torch.long)
        self.row_sq = (self.rows * self.rows).sum(1)

    def distance(self, teacher_maps: list[Tensor], exclude: Tensor | None = None) -> Tensor:
        """Euclidean distance of each position to its nearest memory row: B x 1 x H x W (fp32) on
        the finest chosen stage's grid. ``exclude`` (B image ids): each image's own rows left out,
        so a training image is scored as an unseen one would be (leave-one-out)."""
        if self.size == 0:  # scoring against nothing would pass every part: refuse
            raise NferdError("the memory of normal features is empty: fill it (train the model) before scoring")
        f = self.features(teacher_maps)
        b, d, h, w = f.shape
        with torch.autocast(f.device.type, enabled=False):
            q = f.permute(0, 2, 3, 1).reshape(b, h * w, d)
            if exclude is None:
                sq = nearest_euclidean(q, self.rows, self.row_sq)
            else:
                sq = torch.cat([nearest_euclidean(q[j:j + 1], self.rows,
                                                  self.row_sq.masked_fill(self.source == exclude[j], math.inf))
                                for j in range(b)])
        return sq.sqrt().view(b, 1, h, w)

    @torch.no_grad()
    def nearest_row(self, feature: Tensor) -> tuple[int, float]:
        """The memory row nearest to one position's locally aware ``feature`` (D, from
        :meth:`features`) and its Euclidean distance: what the map's distance there was measured to."""
        f = feature.float()
        d = self.row_sq - 2 * (self.rows @ f) + (f * f).sum()
        row = int(d.argmin())
        return row, float(d[row].clamp_min(0).sqrt())

    def check_loaded(self) -> None:
        """Refuse a loaded memory whose parts disagree (a tampered file): image ids below 0, or row
        norms that are not the rows' (the search trusts them: a wrong one would hide a defect)."""
        if self.source.numel() and int(self.source.min()) < 0:
            raise ValueError(f"memory.source holds {int(self.source.min())}; training image ids are 0 or more")
        if self.position.shape != self.source.shape or (self.position.numel() and int(self.position.min()) < -1):
            raise ValueError("memory.position does not give a place on the grid (or -1, unknown) for every row")
        if not torch.allclose(self.row_sq, (self.rows * self.rows).sum(1), rtol=1e-4, atol=1e-4):
            raise ValueError("memory.row_sq is not the squared norm of memory.rows")

    def resize(self, rows: int) -> None:
        """Make room for ``rows`` rows (before loading a saved memory into an empty one)."""
        dev = self.rows.device
        self.rows = torch.zeros(rows, self.rows.shape[1], device=dev)
        self.source = torch.zeros(rows, dtype=torch.long, device=dev)
        self.position = torch.zeros(rows, dtype=torch.long, device=dev)
        self.row_sq = torch.zeros(rows, device=dev)


def memory_rows(positions: int, channels: int, mib: float) -> int:
    """Rows a memory keeps: every position while they fit in ``mib`` MiB of fp32 features, else as
    many as fit (so the search costs at most ``mib`` MiB / 2 multiply-adds per query position)."""
    return max(1, min(positions, int(mib * 2**20) // (4 * channels)))
