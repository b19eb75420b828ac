"""Nearest-row searches over a bank's rows: blocked to bound memory, and reranked through a
low-dimensional projection; each equals the brute-force search it replaces. And the cache that
keeps what is derived from a bank's tensors until they change.

A bank search is a cosine of unit query rows with unit keys followed by a maximum or a top-K. The
plain form builds the whole similarity matrix; the forms here give the same answer with less
memory or fewer products, and ``tests/test_bank.py`` compares each with its plain twin:

- :func:`nearest_blocked`: ``(q @ keys.t()).amax(-1)`` in fixed blocks of queries and keys.
- :func:`nearest_reranked`: the same maximum, from the exact cosines of a few candidates picked on
  the keys' :func:`principal_directions`; equal wherever the candidates hold the nearest row.
- :func:`search_blocked`: ``(q @ keys.t()).masked_fill(mask, -inf).topk(k)`` a block of rows at a
  time, through :func:`topk_rows` and :func:`top_columns` (plain twin: ``sim.topk(k, dim=1)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

SEARCH_BLOCK_BYTES = 8 << 20

QUERY_BLOCK, KEY_BLOCK = 64, 4096  # a block of the nearest search: 1 MiB of similarities per image

CANDIDATE_GROUPS = 4  # coarse candidates per key block: the best of each of 4 interleaved column groups

T = TypeVar("T")


class StampedCache(Generic[T]):
    """One value derived from some tensors, kept while they hold the same storage, version counter
    (moved by every in-place change) and device: a refill or an edit of the tensors is seen, and
    nothing is derived twice from the same content. Nothing is kept while tracing, so an exported
    graph computes the value from its inputs instead of holding a constant."""

    def __init__(self) -> None:
        self._stamp: tuple | None = None
        self._value: T | None = None

    def get(self, compute: Callable[[], T], *tensors: Tensor) -> T:
        """The kept value if ``tensors`` are unchanged since it was computed, else ``compute()``."""
        if torch.jit.is_tracing():
            return compute()
        stamp = tuple((t.data_ptr(), t._version, t.device) for t in tensors)
        if self._stamp != stamp:
            self._value, self._stamp = compute(), stamp
        return self._value  # type: ignore[return-value]

    def clear(self) -> None:
        self._stamp = self._value = None


def principal_directions(keys: Tensor, dims: int) -> Tensor:
    """The ``dims`` top principal directions (C x dims, largest first) of the rows of ``keys``,
    uncentred so that the keys' common direction is kept: the coarse search's projection."""
    keys = keys.double()
    _, vectors = torch.linalg.eigh(keys.t() @ keys)  # ascending eigenvalues
    return vectors[:, -dims:].flip(1).float()


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
