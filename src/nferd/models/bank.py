"""Normal feature banks (NFB): N normal teacher maps of one stage, and how they are recalled.

The paper (section 3.2) stores the teacher maps of N normal training images per stage, takes the
cosine similarity of a query with every bank entry, keeps the K most similar, weights them
(softmax with a temperature) and sums them into one recalled map, which a fusion module mixes
into the student. Two recalls are implemented, each a class with the same interface:

* :class:`PatchBank` (``recall="patch"``, the default): every position of the input's own
  teacher map recalls its K nearest normal *positions* (any bank image, any place). The recalled
  map is a normal rendition of this image, aligned with it, also on objects that move or rotate.
* :class:`MapBank` (``recall="map"``, the paper's literal reading): whole bank maps, projected
  into the student's space, are ranked by their cosine with the student's own flattened map.
  Measured, it recalls nearly the same few maps for every input, i.e. a template.

Both project the recalled teacher features with a learnable 1x1 conv to the channels of the
student map they are fused with. During training an image's own bank entry is masked out, so
the student cannot learn to copy its target. A bank that is not fused (the default model, whose
bank only scores through :meth:`PatchBank.nearest_distance`) has no projection.

This module is the method. How a bank is searched quickly (in blocks, or through a projection
then an exact rerank) and how its searched rows are kept between calls live in
:mod:`nferd.models.search`, each fast search next to the plain one it equals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .choices import RECALLS
from .search import StampedCache, nearest_blocked, nearest_reranked, principal_directions, search_blocked


@dataclass
class Recall:
    """What one recall returned (kept for diagnostics).

    Map recall: ``similarity`` is B x N, ``indices`` and ``weights`` B x K. Patch recall: all
    three are B x HW x K (the kept similarities; ``indices`` name the bank IMAGE each recalled
    position came from).
    """

    value: Tensor        # B x C x H x W recalled map, in the fusion space
    similarity: Tensor   # B x N cosine similarities (masked entries are -inf), or B x HW x K
    indices: Tensor      # B x K bank indices, most similar first (or B x HW x K bank images)
    weights: Tensor      # B x K weights, summing to 1 (or B x HW x K)


class NormalFeatureBank(nn.Module):
    """Storage shared by both recalls: ``maps`` (N x C x H x W teacher maps on the fusion grid),
    their training-set ``ids`` and the 1x1 projection to the fusion channels (none when
    ``out_channels`` is None: a bank that is searched but not fused).

    The maps are buffers, so they are saved with the model and used at test time too.
    ``keyed_by_teacher`` says which map the model passes as the query: the input's teacher map
    of this stage (True) or the student's map entering the fused stage (False).
    """

    recall = ""
    keyed_by_teacher = True

    def __init__(self, n: int, channels: int, out_channels: int | None, out_size: tuple[int, int], top_k: int = 4,
                 temperature: float = 0.01) -> None:
        super().__init__()
        if not 1 <= top_k <= n:
            raise ValueError(f"top_k must be between 1 and the bank size {n}, got {top_k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.top_k, self.temperature = top_k, temperature
        self.out_size = tuple(out_size)
        self.register_buffer("maps", torch.zeros(n, channels, *self.out_size))
        self.register_buffer("ids", torch.full((n,), -1, dtype=torch.long))
        self.proj = nn.Conv2d(channels, out_channels, 1, bias=False) if out_channels is not None else None

    @property
    def size(self) -> int:
        return self.maps.shape[0]

    def check_loaded(self) -> None:
        """Refuse loaded index tensors that point outside what they index (a tampered file)."""
        if bool((self.ids < -1).any()):
            raise ValueError(f"bank ids hold {int(self.ids.min())}; an image id is -1 (empty) or more")

    @torch.no_grad()
    def fill(self, maps: Tensor, ids: Tensor) -> None:
        """Store N teacher maps (resized once to the fusion grid, as the paper says) and their ids."""
        if maps.shape[0] != self.size:
            raise ValueError(f"bank expects {self.size} maps, got {maps.shape[0]}")
        self.maps.copy_(self.on_grid(maps.float()))
        self.ids.copy_(ids)
        self.reset()

    def reset(self) -> None:
        """Forget whatever was derived from the stored maps (after a fill or an in-place edit)."""

    def on_grid(self, maps: Tensor) -> Tensor:
        """``maps`` bilinearly resized to the bank's grid (unchanged when they are already on it)."""
        if tuple(maps.shape[-2:]) == self.out_size:
            return maps
        return F.interpolate(maps, size=self.out_size, mode="bilinear", align_corners=False)

    def weigh(self, top: Tensor) -> Tensor:
        """Weights of the K kept similarities: softmax with temperature (paper, eq. 3)."""
        return torch.softmax(top / self.temperature, dim=-1)

    def forward(self, query: Tensor, exclude_ids: Tensor | None = None) -> Recall:
        raise NotImplementedError


class MapBank(NormalFeatureBank):
    """The paper's literal recall: the student's flattened map against every projected bank map
    (B x N cosines), the top-K weighted and summed into one recalled map."""

    recall = "map"
    keyed_by_teacher = False

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._cached_proj: Tensor | None = None

    def reset(self) -> None:
        self._cached_proj = None

    def train(self, mode: bool = True) -> MapBank:
        self._cached_proj = None  # projection weights may change while training
        return super().train(mode)

    def projected(self) -> Tensor:
        """Bank maps in the fusion space; constant in eval mode, so computed once there."""
        if self.training:
            return self.proj(self.maps)
        if self._cached_proj is None or self._cached_proj.device != self.maps.device:
            with torch.no_grad():
                self._cached_proj = self.proj(self.maps)
        return self._cached_proj

    def forward(self, query: Tensor, exclude_ids: Tensor | None = None) -> Recall:
        """``query``: the student's map that the recall is fused with (B x C' x H x W)."""
        bank = self.projected()
        query = self.on_grid(query)
        with torch.autocast(query.device.type, enabled=False):  # bf16 would blur close similarities
            q = F.normalize(query.flatten(1).float(), dim=1)
            k = F.normalize(bank.flatten(1).float(), dim=1)
            sim = q @ k.t()
        if exclude_ids is not None:
            sim = sim.masked_fill(exclude_ids.view(-1, 1) == self.ids.view(1, -1), float("-inf"))
        top, idx = sim.topk(min(self.top_k, self.size - (1 if exclude_ids is not None else 0)), dim=1)
        w = self.weigh(top)
        dense = torch.zeros_like(sim).scatter(1, idx, w)
        value = (dense.to(bank.dtype) @ bank.flatten(1)).view(query.shape[0], *bank.shape[1:])
        return Recall(value, sim, idx, w)


class PatchBank(NormalFeatureBank):
    """Per-position recall keyed by the input's teacher map: each query position gets the
    softmax-weighted sum of its K most similar bank positions (cosine, in fp32).

    ``patch_limit`` bounds the searched N*H*W bank positions to a seeded random subset (lower is
    cheaper). ``search_dims`` (fewer than the channels) makes :meth:`nearest_distance` a two-stage
    search: a coarse one on the keys' top principal directions, fitted on the bank when it is
    filled, then the exact cosine of a few candidates (:func:`nearest_reranked`). A training image's
    recall depends only on its cached teacher map and the bank, so
    it is computed once per image and kept; the projection, being linear, is applied once to the
    weighted sum instead of to every bank row.
    """

    recall = "patch"
    keyed_by_teacher = True

    def __init__(self, n: int, channels: int, out_channels: int | None, out_size: tuple[int, int], top_k: int = 4,
                 temperature: float = 0.01, patch_limit: int = 16384, search_dims: int | None = None) -> None:
        super().__init__(n, channels, out_channels, out_size, top_k, temperature)
        if patch_limit < 1:
            raise ValueError(f"patch_limit must be >= 1, got {patch_limit}")
        if search_dims is not None and not 1 <= search_dims < channels:
            raise ValueError(f"search_dims must be between 1 and {channels - 1} (the channels), got {search_dims}")
        # C x D projection of the coarse search (top principal directions of the searched keys), or none.
        self.register_buffer("search_proj", torch.zeros(channels, search_dims) if search_dims else None)
        total = n * self.out_size[0] * self.out_size[1]
        keep = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:patch_limit]
        self.register_buffer("patch_index", keep.sort().values)
        # Training recalls by image id, in two tensors (thousands of small long-lived tensors
        # fragment the C heap): top (ids x HW x K), idx, done (ids).
        self._memo: tuple[Tensor, Tensor, Tensor] | None = None
        self._rows: StampedCache[tuple[Tensor, Tensor, Tensor]] = StampedCache()  # gathered once per bank content
        self._projected: StampedCache[Tensor] = StampedCache()  # projected once per bank and projection

    def check_loaded(self) -> None:
        super().check_loaded()
        total = self.maps.shape[0] * self.maps.shape[2] * self.maps.shape[3]
        if self.patch_index.numel() and not (0 <= int(self.patch_index.min()) and int(self.patch_index.max()) < total):
            raise ValueError(f"patch_index holds {int(self.patch_index.max())} (or {int(self.patch_index.min())}), "
                             f"outside the bank's {total} positions")

    def reset(self) -> None:
        self._memo = None
        self._rows.clear()
        self._projected.clear()

    @torch.no_grad()
    def fill(self, maps: Tensor, ids: Tensor) -> None:
        super().fill(maps, ids)
        self.fit_search()

    @torch.no_grad()
    def fit_search(self) -> None:
        """Fit the coarse search's projection to the stored bank: the top principal directions of
        the searched unit keys."""
        if self.search_proj is not None:
            self.search_proj.copy_(principal_directions(self.searched()[2], self.search_proj.shape[1]))

    def searched(self) -> tuple[Tensor, Tensor, Tensor]:
        """The searched bank rows (P x C), the bank slot (image) of each row, and unit fp32 keys;
        gathered again only when ``maps`` change (a refill or an in-place edit)."""
        return self._rows.get(self._gather, self.maps)

    def _gather(self) -> tuple[Tensor, Tensor, Tensor]:
        n, c, h, w = self.maps.shape
        rows = self.maps.permute(0, 2, 3, 1).reshape(n * h * w, c)[self.patch_index]
        with torch.autocast(self.maps.device.type, enabled=False):
            return rows, self.patch_index // (h * w), F.normalize(rows.float(), dim=1)

    def forward(self, query: Tensor, exclude_ids: Tensor | None = None) -> Recall:
        """``query``: the input's teacher map of this bank's stage (B x C x H x W).

        The search is fp32 under autocast too: bf16 rounds a cosine near 0.99 to steps of 0.004,
        coarser than the gaps between the nearest normal positions of a uniform object.
        """
        query = self.on_grid(query)
        b, c, h, w = query.shape
        rows, slot, keys = self.searched()
        with torch.autocast(query.device.type, enabled=False):
            q = F.normalize(query.float().permute(0, 2, 3, 1).reshape(b, h * w, c), dim=2)
            k = min(self.top_k, keys.shape[0])
            if torch.jit.is_tracing() and exclude_ids is None:
                # export: one batched search (B x HW x P), so the traced graph keeps a free batch axis
                top, idx = (q @ keys.t()).topk(k, dim=2)
            else:
                top, idx = self._search_per_sample(q, keys, k, slot, exclude_ids)
        wts = self.weigh(top)
        value = (wts.unsqueeze(-1).to(rows.dtype) * rows[idx]).sum(2)  # B x HW x C
        value = value.transpose(1, 2).reshape(b, rows.shape[1], h, w)
        return Recall(self.proj(value), top, slot[idx], wts)

    def nearest_distance(self, query: Tensor) -> Tensor:
        """1 - the cosine of each query position with its nearest searched bank position
        (B x 1 x H x W on the bank's grid, fp32): how far the input is from every normal
        feature the bank holds, PatchCore's evidence, without the student."""
        query = self.on_grid(query)
        b, c, h, w = query.shape
        keys = self.searched()[2]
        with torch.autocast(query.device.type, enabled=False):
            q = F.normalize(query.float().permute(0, 2, 3, 1).reshape(b, h * w, c), dim=2)
            # batched products: also keep a free batch axis in an export
            if self.search_proj is None:
                top = nearest_blocked(q, keys)
            else:
                top = nearest_reranked(q, keys, self.search_proj, self.projected_keys())
        return (1 - top).view(b, 1, h, w)

    def projected_keys(self) -> Tensor:
        """The searched unit keys on the coarse search's directions (P x D), computed again only
        when the maps or the projection change."""
        return self._projected.get(lambda: self.searched()[2] @ self.search_proj, self.search_proj, self.maps)

    def _search_per_sample(self, q: Tensor, keys: Tensor, k: int, slot: Tensor,
                           exclude_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """Top-K bank rows per query position, one sample at a time (memory HW x P, not B x HW x P);
        in training, each image's own bank rows are masked out and its result is memoised."""
        memo = self._memo_for(exclude_ids, q.shape[1], k) if exclude_ids is not None else None
        slot_ids = self.ids[slot] if exclude_ids is not None else None  # the image id of each bank row
        tops, idxs = [], []
        for j in range(q.shape[0]):
            key = int(exclude_ids[j]) if memo is not None else -1
            if memo is not None and bool(memo[2][key]):
                top, idx = memo[0][key], memo[1][key]
            else:
                mask = (slot_ids == exclude_ids[j]).view(1, -1) if slot_ids is not None else None
                top, idx = search_blocked(q[j], keys, k, mask)
                if memo is not None:
                    memo[0][key], memo[1][key], memo[2][key] = top, idx, True
            tops.append(top)
            idxs.append(idx)
        return torch.stack(tops), torch.stack(idxs)  # B x HW x K

    def _memo_for(self, ids: Tensor, hw: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The training-recall store, grown (by doubling) to hold image ids up to ``ids.max()``."""
        need = int(ids.max()) + 1
        memo = self._memo
        if memo is None or memo[0].shape[1:] != (hw, k) or memo[0].shape[0] < need:
            same = memo is not None and memo[0].shape[1:] == (hw, k)
            cap = max(need, 2 * memo[0].shape[0]) if same else need
            dev = self.maps.device
            grown = (torch.zeros(cap, hw, k, device=dev), torch.zeros(cap, hw, k, dtype=torch.long, device=dev),
                     torch.zeros(cap, dtype=torch.bool, device=dev))
            if same:
                for new, old in zip(grown, memo):
                    new[:old.shape[0]] = old
            self._memo = memo = grown
        return memo


BANKS: dict[str, type[NormalFeatureBank]] = {"patch": PatchBank, "map": MapBank}
assert tuple(BANKS) == RECALLS
