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

* ``granularity="patch"``: instead of whole maps, every position of the query recalls the K
  most similar bank *positions* (feature vectors of any bank image, any place), so the recalled
  map is a normal rendition of this image, aligned with it. Whole-map recall can only return
  other images, never aligned with the query on objects that move or rotate (tire); patch recall
  returns, at a defect, the closest normal texture, which is what the student should rebuild.
  ``patch_limit`` bounds the searched N*H*W bank positions; ``patch_sampling`` picks which:
  ``"random"`` (default) a seeded random subset; ``"coreset"`` a greedy k-centre coreset of the
  filled bank (PatchCore's subsampling), so rare normal patterns survive the cut.
* ``key_channels`` (patch banks): the bank positions are searched by ANOTHER map of the same
  bank images, the next coarser teacher stage (resized to the bank's grid), while the recalled
  value is still this stage's feature. Reading G queries it with the student's own
  reconstruction of that coarser stage: the student, which never saw a defect, says what
  should be at a position, and the bank returns the fine normal features that go with it.

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
    """What one retrieval returned (kept for diagnostics).

    Image granularity: ``similarity`` is B x N, ``indices`` and ``weights`` B x K. Patch
    granularity: all three are B x HW x K (the kept similarities; ``indices`` name the bank
    IMAGE each recalled position came from).
    """

    value: Tensor        # B x C x H x W recalled map
    similarity: Tensor   # B x N cosine similarities (masked entries are -inf), or B x HW x K
    indices: Tensor      # B x K bank indices, most similar first (or B x HW x K bank images)
    weights: Tensor      # B x K weights, summing to 1 (or B x HW x K)


class NormalFeatureBank(nn.Module):
    """One bank: ``maps`` (N x C x H x W teacher maps) and their training-set ``ids``.

    The maps are buffers, so they are saved with the model and used at test time too.
    """

    def __init__(self, n: int, channels: int, size: tuple[int, int], out_channels: int | None = None,
                 out_size: tuple[int, int] | None = None, top_k: int = 4, temperature: float = 0.1,
                 weighting: str = "softmax", raw_keys: bool = False, granularity: str = "image",
                 patch_limit: int = 16384, patch_sampling: str = "random",
                 key_channels: int | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= n:
            raise ValueError(f"top_k must be between 1 and the bank size {n}, got {top_k}")
        if weighting not in ("softmax", "linear"):
            raise ValueError(f"weighting must be 'softmax' or 'linear', got '{weighting}'")
        if granularity not in ("image", "patch"):
            raise ValueError(f"granularity must be 'image' or 'patch', got '{granularity}'")
        if patch_sampling not in ("random", "coreset"):
            raise ValueError(f"patch_sampling must be 'random' or 'coreset', got '{patch_sampling}'")
        if key_channels is not None and granularity != "patch":
            raise ValueError("separate search keys (key_channels) need a patch bank")
        self.top_k, self.temperature, self.weighting = top_k, temperature, weighting
        self.patch_sampling = patch_sampling
        self.granularity = granularity
        self.raw_keys = raw_keys  # key="teacher": compare with the stored teacher maps, not their projection
        self.out_size = tuple(out_size or size)
        self.register_buffer("maps", torch.zeros(n, channels, *self.out_size))
        self.register_buffer("ids", torch.full((n,), -1, dtype=torch.long))
        if granularity == "patch":  # which of the N*H*W bank positions are searched
            total = n * self.out_size[0] * self.out_size[1]
            keep = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:patch_limit]
            self.register_buffer("patch_index", keep.sort().values)  # a coreset replaces it in fill()
            if key_channels is not None:  # the search key of each searched position (fill() sets it)
                self.register_buffer("search_keys", torch.zeros(keep.numel(), key_channels))
        self.proj = None
        if out_channels is not None:  # readings A and C: learnable 1x1 channel match
            self.proj = nn.Conv2d(channels, out_channels, 1, bias=False)
        self._cached_proj: Tensor | None = None
        # Teacher-keyed patch recall of a training image depends only on its (cached, never
        # augmented) teacher map and the bank, so it is computed once per image, not per epoch,
        # and kept in two tensors indexed by image id (with separate keys, whose student query
        # changes every step, they hold each image's shortlist instead): thousands of small
        # long-lived tensors fragment the C heap (measured: 12.8 GiB peak RSS for one WRN50 epoch
        # on 400 images).
        self._memo: tuple[Tensor, Tensor, Tensor] | None = None  # top (ids x HW x K), idx, done (ids)
        # The searched rows of the raw bank and their unit keys, stamped with the maps' storage and
        # version counter: a refill or an in-place edit of ``maps`` is seen, nothing is gathered twice.
        self._rows: tuple[tuple, tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def size(self) -> int:
        return self.maps.shape[0]

    @property
    def separate_keys(self) -> bool:
        return hasattr(self, "search_keys")

    @torch.no_grad()
    def fill(self, maps: Tensor, ids: Tensor, key_maps: Tensor | None = None) -> None:
        """Store teacher maps (resized once to the fusion size, as the paper says); ``key_maps``:
        the same images' maps that the positions are searched by, for a bank with separate keys."""
        if maps.shape[0] != self.size:
            raise ValueError(f"bank expects {self.size} maps, got {maps.shape[0]}")
        if self.separate_keys != (key_maps is not None):
            raise ValueError("pass key_maps exactly when the bank was built with key_channels")
        self.maps.copy_(self._on_grid(maps.float()))
        self.ids.copy_(ids)
        search = self.maps
        if key_maps is not None:
            if key_maps.shape[0] != self.size:
                raise ValueError(f"bank expects {self.size} key maps, got {key_maps.shape[0]}")
            search = self._on_grid(key_maps.float())
        rows = search.permute(0, 2, 3, 1).reshape(-1, search.shape[1])  # one row per bank position
        if self.granularity == "patch" and self.patch_sampling == "coreset":
            # cover the bank in the search's own metric (cosine): greedy k-centre on unit rows
            self.patch_index.copy_(greedy_coreset(F.normalize(rows, dim=1), self.patch_index.numel()))
        if key_maps is not None:
            self.search_keys.copy_(rows[self.patch_index])
        self._cached_proj = None
        self._memo = None
        self._rows = None

    def _on_grid(self, maps: Tensor) -> Tensor:
        """``maps`` bilinearly resized to the bank's grid (unchanged when they are already on it)."""
        if tuple(maps.shape[-2:]) == self.out_size:
            return maps
        return F.interpolate(maps, size=self.out_size, mode="bilinear", align_corners=False)

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
            return torch.softmax(top / self.temperature, dim=-1)
        pos = top.clamp_min(0) + 1e-6
        return pos / pos.sum(dim=-1, keepdim=True)

    def patches(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        """The searched bank positions as rows (P x C) and the bank slot (image) of each row."""
        n, c, h, w = maps.shape
        rows = maps.permute(0, 2, 3, 1).reshape(n * h * w, c)[self.patch_index]
        return rows, self.patch_index // (h * w)

    def searched(self, bank: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The searched bank rows (P x C), their bank slots and unit fp32 keys. Kept while the raw
        teacher-space bank is unchanged (teacher-keyed readings): for a WRN50 layer1 bank the
        gather and normalisation copy 64 MiB every forward otherwise."""
        cacheable = bank is self.maps and not torch.jit.is_tracing()
        stamp = (self.maps.data_ptr(), self.maps._version, self.maps.device)
        if self.separate_keys:
            stamp += (self.search_keys.data_ptr(), self.search_keys._version)
        if cacheable and self._rows is not None and self._rows[0] == stamp:
            return self._rows[1]
        rows, slot = self.patches(bank)
        with torch.autocast(bank.device.type, enabled=False):
            found = (rows, slot, F.normalize((self.search_keys if self.separate_keys else rows).float(), dim=1))
        if cacheable:
            self._rows = (stamp, found)
        return found

    def recall_patches(self, query: Tensor, bank: Tensor, exclude_ids: Tensor | None,
                       shortlist_query: Tensor | None = None) -> Recall:
        """Per position of each query map, the weighted K most similar bank positions.

        ``shortlist_query`` (training, separate keys): a map in the keys' space that is fixed per
        training image (its teacher map); its ``SHORTLIST`` best bank rows are found once per image
        and the changing query only reranks them, which spares a full search every step.

        The search is fp32 under autocast too: bf16 rounds a cosine near 0.99 to steps of 0.004,
        coarser than the gaps between the nearest normal positions of a uniform object (bottle:
        0.003), and a bf16 search with an fp32 rerank of its 32-128 best still recalled other
        positions at 20 % of bottle's query positions (measured in session 6).
        """
        b, c, h, w = query.shape
        rows, slot, keys = self.searched(bank)
        with torch.autocast(query.device.type, enabled=False):
            def unit_rows(m: Tensor) -> Tensor:  # B x C x H x W -> B x HW x C, unit length
                return F.normalize(m.float().permute(0, 2, 3, 1).reshape(b, h * w, c), dim=2)
            q = unit_rows(query)
            short = unit_rows(shortlist_query) if shortlist_query is not None else None
            k = min(self.top_k, keys.shape[0])
            slot_ids = self.ids[slot] if exclude_ids is not None else None  # the image id of each bank row
            if torch.jit.is_tracing() and exclude_ids is None:
                # export: one batched search (B x HW x P), so the traced graph keeps a free batch axis
                top, idx = (q @ keys.t()).topk(k, dim=2)
            else:
                top, idx = self._search_per_sample(q, keys, k, slot_ids, exclude_ids, short)
        wts = self.weigh(top)
        value = (wts.unsqueeze(-1).to(rows.dtype) * rows[idx]).sum(2)  # B x HW x C
        value = value.transpose(1, 2).reshape(b, rows.shape[1], h, w)
        return Recall(value, top, slot[idx], wts)

    def _search_per_sample(self, q: Tensor, keys: Tensor, k: int, slot_ids: Tensor | None,
                           exclude_ids: Tensor | None, short: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Top-K bank rows per query position, one sample at a time (memory HW x P, not B x HW x P).

        A fixed training query (teacher keys) is searched once per image and memoised; with a
        shortlist query, that query's best rows are memoised instead and ``q`` reranks them."""
        fixed = short if short is not None else (q if self.raw_keys and not self.separate_keys else None)
        n = min(SHORTLIST, keys.shape[0]) if short is not None else k
        memo = self._memo_for(exclude_ids, q.shape[1], n) if fixed is not None and exclude_ids is not None else None
        tops, idxs = [], []
        for j in range(q.shape[0]):
            key = int(exclude_ids[j]) if memo is not None else -1
            if memo is not None and bool(memo[2][key]):
                top, idx = memo[0][key], memo[1][key]
            else:
                mask = (slot_ids == exclude_ids[j]).view(1, -1) if slot_ids is not None else None
                top, idx = search_blocked(q[j] if fixed is None else fixed[j], keys, n, mask)
                if memo is not None:
                    memo[0][key], memo[1][key], memo[2][key] = top, idx, True
            if short is not None:  # rerank the shortlist by the live query
                sim = (keys[idx] * q[j].unsqueeze(1)).sum(-1)  # HW x SHORTLIST
                sim.masked_fill_(top.isneginf(), float("-inf"))  # masked rows, listed only in a tiny bank
                top, pick = sim.topk(k, dim=1)
                idx = idx.gather(1, pick)
            tops.append(top)
            idxs.append(idx)
        return torch.stack(tops), torch.stack(idxs)  # B x HW x K

    def _memo_for(self, ids: Tensor, hw: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The training-recall store, grown (by doubling) to hold image ids up to ``ids.max()``."""
        need = int(ids.max()) + 1
        memo = self._memo
        if memo is None or memo[0].shape[1:] != (hw, k) or memo[0].shape[0] < need:
            cap = max(need, 2 * memo[0].shape[0]) if memo is not None and memo[0].shape[1:] == (hw, k) else need
            dev = self.maps.device
            grown = (torch.zeros(cap, hw, k, device=dev), torch.zeros(cap, hw, k, dtype=torch.long, device=dev),
                     torch.zeros(cap, dtype=torch.bool, device=dev))
            if memo is not None and memo[0].shape[1:] == (hw, k):
                for new, old in zip(grown, memo):
                    new[:old.shape[0]] = old
            self._memo = memo = grown
        return memo

    def forward(self, query: Tensor, exclude_ids: Tensor | None = None,
                shortlist_query: Tensor | None = None) -> Recall:
        """Recall for each sample the weighted sum of its K most similar bank maps.

        ``query`` must live in the space of the compared maps: the student map (same shape as the
        fusion target) for ``key="student"``, or the input's teacher map of this stage for
        ``key="teacher"`` (compared with the raw stored maps); with separate keys, a map in the
        keys' space (reading G: the student's reconstruction of the next coarser stage).
        """
        # Keys in teacher space need no projection, and the 1x1 projection is linear, so it is
        # applied once to the weighted sum instead of to all N bank maps (same result, N/B x cheaper).
        project_after = self.raw_keys and self.proj is not None
        bank = self.maps if self.raw_keys else self.projected()
        query = self._on_grid(query)  # the bank (projected or not) lies on the grid out_size
        if shortlist_query is not None:
            shortlist_query = self._on_grid(shortlist_query)
        if self.granularity == "patch":
            recall = self.recall_patches(query, bank, exclude_ids, shortlist_query)
            if project_after:
                recall.value = self.proj(recall.value)
            return recall
        sim = self.similarity(query, bank, exclude_ids)
        k = min(self.top_k, self.size - (1 if exclude_ids is not None else 0))
        top, idx = sim.topk(k, dim=1)
        w = self.weigh(top)
        dense = torch.zeros_like(sim).scatter(1, idx, w)
        value = (dense.to(bank.dtype) @ bank.flatten(1)).view(query.shape[0], *bank.shape[1:])
        if project_after:
            value = self.proj(value)
        return Recall(value, sim, idx, w)


SEARCH_BLOCK_BYTES = 8 << 20
SHORTLIST = 64  # training rerank pool of a separately keyed bank (16 x the default K)


def search_blocked(q: Tensor, keys: Tensor, k: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` cosines (values, indices) of each unit row of ``q`` (Q x C) against the unit
    ``keys`` (P x C), ``mask`` (1 x P, True = excluded) taken out, a block of query rows at a time.

    Each block's similarities (at most ``SEARCH_BLOCK_BYTES``) stay in the core's cache between the
    matrix product and the top-K, and reuse the heap, where the whole Q x P matrix (64 MiB for
    WRN50's layer1) went to DRAM and came as fresh pages every call: 101 -> 64-70 ms for the
    1024 x 16384 layer1 search on the 2-core CPU, with the same values and indices.
    """
    rows = max(1, SEARCH_BLOCK_BYTES // (4 * keys.shape[0]))
    tops, idxs = [], []
    for start in range(0, q.shape[0], rows):
        sim = q[start:start + rows] @ keys.t()
        if mask is not None:
            sim.masked_fill_(mask, float("-inf"))
        top, idx = topk_rows(sim, k)
        tops.append(top)
        idxs.append(idx)
    return (tops[0], idxs[0]) if len(tops) == 1 else (torch.cat(tops), torch.cat(idxs))


def topk_rows(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``sim.topk(k, dim=1)`` (values, indices; largest first), through :func:`top_columns`."""
    cols = top_columns(sim, k)
    top, order = sim.gather(1, cols).sort(dim=1, descending=True)
    return top, cols.gather(1, order)


def top_columns(sim: Tensor, c: int, group: int = 16) -> Tensor:
    """Column indices of the ``c`` largest entries of each row of ``sim`` (any order), found
    through groups of ``group`` columns: the rows' c best entries lie in groups whose maximum is
    at least the c-th best, and there are at most c such groups, so the c groups with the largest
    maxima hold them all. One pass for the maxima and a top-c over P / group columns replace a
    top-c over all P columns: for WRN50's layer1 bank (1024 x 16384, K 4) 6 ms instead of 26 ms
    on the 2-core CPU."""
    rows, p = sim.shape
    if p % group or p // group <= c:
        return sim.topk(c, dim=1).indices
    width = p // group  # group j: columns j, j + width, j + 2 width, ... (a vectorised max over rows of width)
    groups = sim.view(rows, group, width).amax(1).topk(c, dim=1).indices  # rows x c
    members = (groups.unsqueeze(2) + width * torch.arange(group, device=sim.device)).view(rows, c * group)
    return members.gather(1, sim.gather(1, members).topk(c, dim=1).indices)


@torch.no_grad()
def greedy_coreset(rows: Tensor, m: int, dim: int = 128, seed: int = 0) -> Tensor:
    """Indices (sorted) of ``m`` rows chosen by greedy k-centre: each pick is the row farthest from
    those already picked, so every row ends up close to one kept row (PatchCore, Roth et al. 2022).

    Rows wider than ``dim`` are first sent through a seeded Gaussian projection to ``dim``
    (Johnson-Lindenstrauss: distances kept up to a small factor), as PatchCore does for speed.
    """
    n = rows.shape[0]
    if m >= n:
        return torch.arange(n, device=rows.device)
    g = torch.Generator().manual_seed(seed)
    x = rows.float()
    if x.shape[1] > dim:
        x = x @ (torch.randn(x.shape[1], dim, generator=g) / dim ** 0.5).to(x.device)
    sq = (x * x).sum(1)
    picked = torch.empty(m, dtype=torch.long, device=x.device)
    picked[0] = int(torch.randint(n, (1,), generator=g))
    nearest = (sq + sq[picked[0]] - 2 * (x @ x[picked[0]])).clamp_min_(0)
    for j in range(1, m):
        far = nearest.argmax()
        picked[j] = far
        torch.minimum(nearest, (sq + sq[far] - 2 * (x @ x[far])).clamp_min_(0), out=nearest)
    return picked.sort().values
