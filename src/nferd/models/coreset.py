"""Samplers that thin a memory of normal features to a bounded size (PatchCore, Roth et al., CVPR 2022).

A sampler is an object with ``select(features, count) -> indices``, passed to
:meth:`nferd.models.memory.MemoryBank.fill`; the bank does not know how its rows were chosen.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Sampler(Protocol):
    def select(self, features: Tensor, count: int) -> Tensor:
        """Indices (``count`` of them, or all rows when there are fewer) of the rows of ``features``
        (P x D) to keep."""
        ...


class GreedyCoreset:
    """PatchCore's approximate greedy coreset: start from a seeded row, then repeatedly add the rows
    farthest from every row chosen so far, so the kept rows cover the feature space (each normal
    feature has a kept neighbour close by) rather than its dense middle. Distances are measured
    after a seeded Gaussian projection to ``projection_dims`` dimensions (Johnson-Lindenstrauss),
    and each step adds the ``count / steps`` farthest rows at once, so the whole selection is at
    most ``steps`` passes over P x ``projection_dims`` numbers, not ``count`` passes."""

    def __init__(self, projection_dims: int = 32, steps: int = 1024, seed: int = 0) -> None:
        if projection_dims < 1 or steps < 1:
            raise ValueError(f"projection_dims and steps must be >= 1, got {projection_dims}, {steps}")
        self.projection_dims, self.steps, self.seed = projection_dims, steps, seed

    @torch.no_grad()
    def select(self, features: Tensor, count: int) -> Tensor:
        p, d = features.shape
        if count >= p:
            return torch.arange(p)
        g = torch.Generator().manual_seed(self.seed)
        x = features.float()
        if d > self.projection_dims:
            x = x @ (torch.randn(d, self.projection_dims, generator=g) / self.projection_dims ** 0.5)
        sq = (x * x).sum(1)
        xt = x.t().contiguous()  # D x P: the products with a few chosen rows stream it once, in long rows
        per_step = -(-count // self.steps)
        chosen = [torch.randint(p, (1,), generator=g)]
        nearest = torch.full((p,), float("inf"))
        done = 0
        while True:
            new = chosen[-1]
            done += len(new)
            # squared distance of every row to the newly chosen ones, through one matrix product
            dist = torch.addmm(sq[new][:, None], x[new], xt, alpha=-2).amin(0) + sq
            torch.minimum(nearest, dist, out=nearest)
            if done >= count:
                break
            chosen.append(nearest.topk(min(per_step, count - done)).indices)
        return torch.cat(chosen).sort().values


