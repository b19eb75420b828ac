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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .choices import RECALLS


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
        # The searched rows and their unit keys, stamped with the maps' storage and version
        # counter: a refill or an in-place edit of ``maps`` is seen, nothing is gathered twice.
        self._rows: tuple[tuple, tuple[Tensor, Tensor, Tensor]] | None = None
        self._projected: tuple[tuple, Tensor] | None = None  # the keys on the coarse search's directions

    def check_loaded(self) -> None:
        super().check_loaded()
        total = self.maps.shape[0] * self.maps.shape[2] * self.maps.shape[3]
        if self.patch_index.numel() and not (0 <= int(self.patch_index.min()) and int(self.patch_index.max()) < total):
            raise ValueError(f"patch_index holds {int(self.patch_index.max())} (or {int(self.patch_index.min())}), "
                             f"outside the bank's {total} positions")

    def reset(self) -> None:
        self._memo = None
        self._rows = None
        self._projected = None

    @torch.no_grad()
    def fill(self, maps: Tensor, ids: Tensor) -> None:
        super().fill(maps, ids)
        self.fit_search()

    @torch.no_grad()
    def fit_search(self) -> None:
        """Fit the coarse search's projection to the stored bank: the top principal directions
        (uncentred, so the keys' common direction is kept) of the searched unit keys."""
        if self.search_proj is None:
            return
        keys = self.searched()[2].double()
        _, vectors = torch.linalg.eigh(keys.t() @ keys)  # ascending eigenvalues
        self.search_proj.copy_(vectors[:, -self.search_proj.shape[1]:].flip(1).float())

    def searched(self) -> tuple[Tensor, Tensor, Tensor]:
        """The searched bank rows (P x C), the bank slot (image) of each row, and unit fp32 keys."""
        stamp = (self.maps.data_ptr(), self.maps._version, self.maps.device)
        cacheable = not torch.jit.is_tracing()
        if cacheable and self._rows is not None and self._rows[0] == stamp:
            return self._rows[1]
        n, c, h, w = self.maps.shape
        rows = self.maps.permute(0, 2, 3, 1).reshape(n * h * w, c)[self.patch_index]
        with torch.autocast(self.maps.device.type, enabled=False):
            found = (rows, self.patch_index // (h * w), F.normalize(rows.float(), dim=1))
        if cacheable:
            self._rows = (stamp, found)
        return found

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
        """The searched unit keys on the coarse search's directions (P x D), computed once per
        fill (like :meth:`searched`) and whenever the projection changes."""
        stamp = (self.search_proj.data_ptr(), self.search_proj._version, self.maps.data_ptr(), self.maps._version)
        if not torch.jit.is_tracing() and self._projected is not None and self._projected[0] == stamp:
            return self._projected[1]
        keys = self.searched()[2] @ self.search_proj
        if not torch.jit.is_tracing():
            self._projected = (stamp, keys)
        return keys

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


SEARCH_BLOCK_BYTES = 8 << 20


QUERY_BLOCK, KEY_BLOCK = 64, 4096  # a block of the nearest search: 1 MiB of similarities per image


def nearest_blocked(q: Tensor, keys: Tensor) -> Tensor:
    """Best cosine of every unit query row (B x Q x C) against the unit ``keys`` (P x C), in fixed
    blocks of queries and keys: a batch never materialises B x Q x P similarities (1 GiB for 16
    images at WRN50's layer1), the block stays in cache between the product and the maximum, and
    the same blocks trace into an exported graph with a free batch axis."""
    rows = []
    for a in range(0, q.shape[1], QUERY_BLOCK):
        qa, best = q[:, a:a + QUERY_BLOCK], None
        for b in range(0, keys.shape[0], KEY_BLOCK):
            part = (qa @ keys[b:b + KEY_BLOCK].t()).amax(dim=2)
            best = part if best is None else torch.maximum(best, part)
        rows.append(best)
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


CANDIDATE_GROUPS = 4  # coarse candidates per key block: the best of each of 4 interleaved column groups


def nearest_reranked(q: Tensor, keys: Tensor, proj: Tensor, projected_keys: Tensor) -> Tensor:
    """Nearly :func:`nearest_blocked` at a fraction of its products: a coarse search on the D
    principal directions (``proj``: C x D, ``projected_keys``: P x D) picks, in every block of
    ``KEY_BLOCK`` keys, the best candidate of each of ``CANDIDATE_GROUPS`` groups of columns
    (plain maxima, no sort; a ragged last block adds a group), and the exact cosines of those
    candidates decide. The result is a true cosine of a searched key, never above the exact
    search's."""
    rows = []
    for a in range(0, q.shape[1], QUERY_BLOCK):
        qa = q[:, a:a + QUERY_BLOCK]
        pa, cands = qa @ proj, []
        for b in range(0, keys.shape[0], KEY_BLOCK):
            part = pa @ projected_keys[b:b + KEY_BLOCK].t()  # B x Qa x Kb
            n = part.shape[2]
            g = CANDIDATE_GROUPS if n >= CANDIDATE_GROUPS else 1
            width = n // g  # g contiguous groups, and the ragged rest of a last block as one more
            offsets = b + width * torch.arange(g, device=q.device)
            cands.append(part[..., :g * width].unflatten(2, (g, width)).max(dim=3).indices + offsets)
            if n % g:
                cands.append(part[..., g * width:].max(dim=2, keepdim=True).indices + b + g * width)
        idx = torch.cat(cands, dim=2)  # B x Qa x candidates
        found = F.embedding(idx, keys)  # B x Qa x candidates x C: one Gather, no batch size traced into a shape
        exact = (found * qa.unsqueeze(2)).sum(3)  # B x Qa x candidates: their true cosines
        rows.append(exact.amax(dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


def search_blocked(q: Tensor, keys: Tensor, k: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` cosines (values, indices) of each unit row of ``q`` (Q x C) against the unit
    ``keys`` (P x C), ``mask`` (1 x P, True = excluded) taken out, a block of query rows at a time.

    Each block's similarities (at most ``SEARCH_BLOCK_BYTES``) stay in the core's cache between the
    matrix product and the top-K, and reuse the heap, where the whole Q x P matrix (64 MiB for
    WRN50's layer1) would go to DRAM and come back as fresh pages every call.
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
    top-c over all P columns, several times cheaper for a large bank and a small K."""
    rows, p = sim.shape
    if p % group or p // group <= c:
        return sim.topk(c, dim=1).indices
    width = p // group  # group j: columns j, j + width, j + 2 width, ... (a vectorised max over rows of width)
    groups = sim.view(rows, group, width).amax(1).topk(c, dim=1).indices  # rows x c
    members = (groups.unsqueeze(2) + width * torch.arange(group, device=sim.device)).view(rows, c * group)
    return members.gather(1, sim.gather(1, members).topk(c, dim=1).indices)
