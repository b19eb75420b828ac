"""Normal feature bank (NFB): N normal teacher maps of one stage, recalled per image by top-K cosine.

The paper (section 3.2) fixes the recall: flatten the query map and every bank map, take the
cosine similarity set S, keep the K most similar, weight them and sum them into one recalled
map. It leaves open which map is the query and where the recall is fused; ``key`` and
``placement`` name the readings compared in DESIGN-NOTES.md:

* ``key="student"``: the query is the student's own map (the paper's wording);
  ``key="teacher"``: the query is the input's teacher map of the bank's stage, the same space
  as the stored maps, so the cosine measures image similarity from the start of training.
* ``projection``: bank maps are bilinearly resized and sent through a learnable 1x1 conv to
  the student map they are fused with (readings A and C); without it the bank lives in the
  teacher space of its stage and is fused with the student's output for that stage (B).

All of it is batched: one normalised matmul gives S for the whole batch, and the weighted sum
is a second matmul with a sparse (top-K) weight matrix. During training a sample's own image
is masked out of the bank, so the student cannot learn to copy its target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Recall:
    """What one retrieval returned (kept for diagnostics)."""

    value: Tensor        # B x C x H x W recalled map
    similarity: Tensor   # B x N cosine similarities (masked entries are -inf)
    indices: Tensor      # B x K bank indices, most similar first
    weights: Tensor      # B x K weights, summing to 1


class NormalFeatureBank(nn.Module):
    """One bank: ``maps`` (N x C x H x W teacher maps) and their training-set ``ids``.

    The maps are buffers, so they are saved with the model and used at test time too.
    """

    def __init__(self, n: int, channels: int, size: tuple[int, int], out_channels: int | None = None,
                 out_size: tuple[int, int] | None = None, top_k: int = 4, temperature: float = 0.1,
                 weighting: str = "softmax", raw_keys: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= n:
            raise ValueError(f"top_k must be between 1 and the bank size {n}, got {top_k}")
        if weighting not in ("softmax", "linear"):
            raise ValueError(f"weighting must be 'softmax' or 'linear', got '{weighting}'")
        self.top_k, self.temperature, self.weighting = top_k, temperature, weighting
        self.raw_keys = raw_keys  # key="teacher": compare with the stored teacher maps, not their projection
        self.out_size = tuple(out_size or size)
        self.register_buffer("maps", torch.zeros(n, channels, *self.out_size))
        self.register_buffer("ids", torch.full((n,), -1, dtype=torch.long))
        self.proj = None
        if out_channels is not None:  # readings A and C: learnable 1x1 channel match
            self.proj = nn.Conv2d(channels, out_channels, 1, bias=False)
        self._cached_proj: Tensor | None = None

    @property
    def size(self) -> int:
        return self.maps.shape[0]

    @torch.no_grad()
    def fill(self, maps: Tensor, ids: Tensor) -> None:
        """Store teacher maps (resized once to the fusion size, as the paper says)."""
        if maps.shape[0] != self.size:
            raise ValueError(f"bank expects {self.size} maps, got {maps.shape[0]}")
        if tuple(maps.shape[-2:]) != self.out_size:
            maps = F.interpolate(maps.float(), size=self.out_size, mode="bilinear", align_corners=False)
        self.maps.copy_(maps)
        self.ids.copy_(ids)
        self._cached_proj = None

    def train(self, mode: bool = True) -> "NormalFeatureBank":
        self._cached_proj = None  # projection weights may change while training
        return super().train(mode)

    def projected(self) -> Tensor:
        """Bank maps in the fusion space; constant in eval mode, so computed once there."""
        if self.proj is None:
            return self.maps
        if self.training:
            return self.proj(self.maps)
        if self._cached_proj is None or self._cached_proj.device != self.maps.device:
            with torch.no_grad():
                self._cached_proj = self.proj(self.maps)
        return self._cached_proj

    def similarity(self, query: Tensor, keys: Tensor, exclude_ids: Tensor | None = None) -> Tensor:
        """Cosine similarity of each flattened query with each flattened bank map: B x N."""
        with torch.autocast(query.device.type, enabled=False):  # bf16 would blur close similarities
            q = F.normalize(query.flatten(1).float(), dim=1)
            k = F.normalize(keys.flatten(1).float(), dim=1)
            sim = q @ k.t()
        if exclude_ids is not None:
            sim = sim.masked_fill(exclude_ids.view(-1, 1) == self.ids.view(1, -1), float("-inf"))
        return sim

    def weigh(self, top: Tensor) -> Tensor:
        """Weights of the K kept similarities (softmax with temperature, or plain normalisation)."""
        if self.weighting == "softmax":
            return torch.softmax(top / self.temperature, dim=1)
        pos = top.clamp_min(0) + 1e-6
        return pos / pos.sum(dim=1, keepdim=True)

    def forward(self, query: Tensor, exclude_ids: Tensor | None = None) -> Recall:
        """Recall for each sample the weighted sum of its K most similar bank maps.

        ``query`` must live in the space of the compared maps: the student map (same shape as the
        fusion target) for ``key="student"``, or the input's teacher map of this stage for
        ``key="teacher"`` (compared with the raw stored maps).
        """
        # Keys in teacher space need no projection, and the 1x1 projection is linear, so it is
        # applied once to the weighted sum instead of to all N bank maps (same result, N/B x cheaper).
        project_after = self.raw_keys and self.proj is not None
        bank = self.maps if self.raw_keys else self.projected()
        if query.shape[-2:] != bank.shape[-2:]:
            query = F.interpolate(query, size=bank.shape[-2:], mode="bilinear", align_corners=False)
        sim = self.similarity(query, bank, exclude_ids)
        k = min(self.top_k, self.size - (1 if exclude_ids is not None else 0))
        top, idx = sim.topk(k, dim=1)
        w = self.weigh(top)
        dense = torch.zeros_like(sim).scatter(1, idx, w)
        value = (dense.to(bank.dtype) @ bank.flatten(1)).view(query.shape[0], *bank.shape[1:])
        if project_after:
            value = self.proj(value)
        return Recall(value, sim, idx, w)
