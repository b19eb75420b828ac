"""Normal feature banks: whole-map and per-position top-K cosine recall, weights, self-exclusion,
projection, the cache of the searched rows, and the fast searches of ``nferd.models.search``
checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nferd.models.bank import MapBank, NormalFeatureBank, PatchBank
from nferd.models.search import (
    KEY_BLOCK,
    QUERY_BLOCK,
    StampedCache,
    nearest_blocked,
    nearest_reranked,
    principal_directions,
    search_blocked,
    top_columns,
    topk_rows,
)


def identity(bank: NormalFeatureBank) -> NormalFeatureBank:
    """The bank with its 1x1 projection set to the identity, so recalled values are bank features."""
    with torch.no_grad():
        bank.proj.weight.copy_(torch.eye(bank.proj.weight.shape[0]).view_as(bank.proj.weight))
    return bank


def hand_bank(**kw) -> MapBank:
    """4 bank maps of shape 2 x 1 x 2 (flattened: 4-vectors) whose cosines to a query we know."""
    bank = identity(MapBank(4, 2, 2, (1, 2), **kw))
    maps = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],   # cos with q = 1/sqrt(2) ~ .707
        [1.0, 1.0, 0.0, 0.0],   # cos = 1.0 (same direction as q)
        [0.0, 0.0, 1.0, 0.0],   # cos = 0
        [-1.0, -1.0, 0.0, 0.0],  # cos = -1
    ]).view(4, 2, 1, 2)
    bank.fill(maps, torch.tensor([10, 11, 12, 13]))
    return bank


def test_topk_picks_the_most_similar_maps_and_weighs_them() -> None:
    bank = hand_bank(top_k=2, temperature=0.5)
    q = torch.tensor([2.0, 2.0, 0.0, 0.0]).view(1, 2, 1, 2)  # scale must not matter for cosine
    r = bank(q)
    assert r.indices.tolist() == [[1, 0]]
    s = torch.tensor([1.0, 2 ** -0.5])
    w = torch.softmax(s / 0.5, 0)
    assert torch.allclose(r.weights[0], w, atol=1e-6)
    expected = w[0] * bank.maps[1] + w[1] * bank.maps[0]
    assert torch.allclose(r.value[0], expected, atol=1e-6)
    assert torch.allclose(r.similarity[0], torch.tensor([2 ** -0.5, 1.0, 0.0, -1.0]), atol=1e-6)


def test_batch_is_recalled_per_sample() -> None:
    bank = hand_bank(top_k=1, temperature=0.1)
    q = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0], [-1.0, -2.0, 0.0, 0.0]]).view(3, 2, 1, 2)
    r = bank(q)
    assert r.indices[:, 0].tolist() == [1, 2, 3]
    assert torch.allclose(r.value, bank.maps[[1, 2, 3]])


def test_own_image_is_excluded_during_training() -> None:
    bank = hand_bank(top_k=1)
    q = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 2, 1, 2)
    r = bank(q, exclude_ids=torch.tensor([11]))  # bank map 1 is this very image
    assert r.indices.tolist() == [[0]]
    assert r.similarity[0, 1] == float("-inf")


def test_patch_bank_compares_raw_maps_and_projects_the_recall() -> None:
    torch.manual_seed(0)
    bank = PatchBank(5, 3, 6, (4, 4), top_k=2)
    maps = torch.randn(5, 3, 8, 8)
    bank.fill(maps, torch.arange(5))
    assert bank.maps.shape == (5, 3, 4, 4)  # resized once, as the paper says
    r = bank(maps[3:4] * 3.0)  # the teacher map of bank image 3 itself, at full size
    assert (r.indices[0, :, 0] == 3).all()  # every position finds itself
    assert r.value.shape == (1, 6, 4, 4)
    rows = bank.maps.permute(0, 2, 3, 1).reshape(80, 3)
    unit = torch.nn.functional.normalize
    query = unit(bank.on_grid(maps[3:4])[0].reshape(3, 16).t(), dim=1)
    top, idx = (query @ unit(rows, dim=1).t()).topk(2, dim=1)
    recalled = (torch.softmax(top / bank.temperature, 1).unsqueeze(-1) * rows[idx]).sum(1)  # 16 x 3
    projected = recalled @ bank.proj.weight[:, :, 0, 0].t()  # the 1x1 projection, by hand
    assert torch.allclose(r.value[0].reshape(6, 16).t(), projected, atol=1e-5)
    r.value.sum().backward()
    assert bank.proj.weight.grad is not None and bank.proj.weight.grad.abs().sum() > 0


def test_projection_is_cached_in_eval_mode_only() -> None:
    bank = MapBank(3, 2, 4, (2, 2), top_k=1)
    bank.fill(torch.randn(3, 2, 2, 2), torch.arange(3))
    bank.eval()
    a = bank.projected()
    assert bank.projected() is a
    bank.train()
    assert bank.projected() is not a and bank.projected().requires_grad


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="top_k"):
        MapBank(4, 2, 2, (1, 2), top_k=5)
    with pytest.raises(ValueError, match="temperature"):
        PatchBank(4, 2, 2, (1, 2), temperature=0)
    with pytest.raises(ValueError, match="patch_limit"):
        PatchBank(4, 2, 2, (1, 2), patch_limit=0)


def patch_bank(**kw) -> PatchBank:
    """Patch recall over 3 random 8-channel 4 x 4 maps (all 48 positions searched)."""
    torch.manual_seed(0)
    bank = identity(PatchBank(3, 8, 8, (4, 4), **kw))
    bank.fill(torch.randn(3, 8, 4, 4), torch.tensor([20, 21, 22]))
    return bank


def test_patch_recall_returns_each_positions_nearest_bank_position() -> None:
    bank = patch_bank(top_k=1)
    # a query made of bank positions from different images, in a new arrangement
    rows = bank.maps.permute(0, 2, 3, 1).reshape(-1, 8)
    pick = torch.randperm(48, generator=torch.Generator().manual_seed(1))[:16]
    q = (3.0 * rows[pick]).t().reshape(1, 8, 4, 4)  # scaled: cosine ignores scale
    r = bank(q)
    assert torch.allclose(r.value, rows[pick].t().reshape(1, 8, 4, 4), atol=1e-6)
    assert r.indices[0, :, 0].tolist() == (pick // 16).tolist()  # the bank image of each recalled position
    assert torch.allclose(r.similarity[0, :, 0], torch.ones(16), atol=1e-5)


def test_patch_recall_excludes_own_image_and_weighs_per_position() -> None:
    bank = patch_bank(top_k=3, temperature=0.1)
    q = bank.maps[1:2].clone()
    r = bank(q, exclude_ids=torch.tensor([21]))
    assert r.indices.shape == (1, 16, 3)
    assert not (r.indices == 1).any()  # never its own image
    assert torch.allclose(r.weights.sum(-1), torch.ones(1, 16), atol=1e-6)
    rows = bank.maps.permute(0, 2, 3, 1).reshape(-1, 8)
    keys = torch.nn.functional.normalize(rows, dim=1)
    sims = torch.nn.functional.normalize(q[0].reshape(8, 16).t(), dim=1) @ keys.t()
    sims[:, 16:32] = float("-inf")
    top, idx = sims.topk(3, dim=1)
    assert torch.allclose(r.similarity[0], top, atol=1e-6)
    expected = (torch.softmax(top / 0.1, 1).unsqueeze(-1) * rows[idx]).sum(1)
    assert torch.allclose(r.value[0], expected.t().reshape(8, 4, 4), atol=1e-5)
    again = bank(q, exclude_ids=torch.tensor([21]))  # second epoch: reused recall, same result
    assert torch.equal(again.value, r.value)
    # the store is keyed by image id (the query of an id never changes in training) and grows for new ids
    q2 = bank.maps[2:3].clone()
    both = bank(torch.cat([q2, torch.randn_like(q)]), exclude_ids=torch.tensor([40, 21]))
    assert torch.equal(both.value[1], r.value[0])  # id 21 came from the store, not from the random query
    fresh = patch_bank(top_k=3, temperature=0.1)(q2, exclude_ids=torch.tensor([40]))
    assert torch.allclose(both.value[0], fresh.value[0], atol=1e-6)
    bank.fill(torch.randn(3, 8, 4, 4), torch.tensor([20, 21, 22]))  # new bank: recall recomputed
    assert not torch.allclose(bank(q, exclude_ids=torch.tensor([21])).value, r.value)


def test_patch_limit_searches_a_seeded_subset() -> None:
    a = PatchBank(3, 8, 8, (4, 4), top_k=1, patch_limit=10)
    b = PatchBank(3, 8, 8, (4, 4), top_k=1, patch_limit=10)
    assert a.patch_index.shape == (10,) and torch.equal(a.patch_index, b.patch_index)
    assert a.patch_index.unique().numel() == 10 and int(a.patch_index.max()) < 48
    a.fill(torch.randn(3, 8, 4, 4), torch.tensor([0, 1, 2]))
    rows, slot, keys = a.searched()
    assert rows.shape == (10, 8) and torch.equal(slot, a.patch_index // 16)
    assert torch.equal(rows, a.maps.permute(0, 2, 3, 1).reshape(48, 8)[a.patch_index])
    identity(a)
    r = a(a.maps[:1])  # every recalled position is one of the 10 searched rows
    recalled = r.value[0].reshape(8, 16).t()
    assert all(torch.isclose(recalled[j], rows).all(1).any() for j in range(16))


def near_tie_bank() -> tuple[PatchBank, torch.Tensor]:
    """A uniform-looking bank: every position is one base vector plus small noise, so cosines sit
    near 0.99 with gaps below bf16's rounding step there (as on a bottle), and a query like it."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 1, 1, generator=g)
    bank = PatchBank(16, 64, 64, (8, 8), top_k=4, temperature=0.01, patch_limit=512)
    bank.fill(base + 0.15 * torch.randn(16, 64, 8, 8, generator=g), torch.arange(16))
    return bank.eval(), base + 0.15 * torch.randn(2, 64, 8, 8, generator=g)


def test_the_search_stays_fp32_under_autocast() -> None:
    bank, q = near_tie_bank()
    exact = bank(q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = bank(q)
    assert torch.equal(fast.indices, exact.indices) and torch.equal(fast.similarity, exact.similarity)
    assert torch.allclose(fast.value.float(), exact.value, rtol=2e-2, atol=2e-2)  # only the projection is bf16
    # what a bf16 search would do on such a bank: pick other positions among the near-ties
    keys = bank.searched()[2]
    qn = torch.nn.functional.normalize(q.permute(0, 2, 3, 1).reshape(2, 64, 64), dim=2)
    assert not torch.equal((qn.bfloat16() @ keys.bfloat16().t()).topk(4, dim=2).indices,
                           (qn @ keys.t()).topk(4, dim=2).indices)


def test_searched_rows_follow_a_refill_and_an_in_place_edit() -> None:
    bank, q = near_tie_bank()
    first = bank(q).value
    assert torch.equal(bank(q).value, first)  # cached rows: the same answer
    bank.maps.mul_(-1.0)  # in place: the version counter moves, the cache is rebuilt
    flipped = bank(q)
    assert torch.allclose(flipped.value, copy_of(bank)(q).value, atol=1e-6)
    assert not torch.allclose(flipped.value, first)
    bank.fill(torch.randn(16, 64, 8, 8), torch.arange(16))
    assert not torch.allclose(bank(q).value, flipped.value)


def copy_of(bank: PatchBank) -> PatchBank:
    fresh = PatchBank(16, 64, 64, (8, 8), top_k=4, temperature=0.01, patch_limit=512)
    fresh.load_state_dict(bank.state_dict())
    return fresh.eval()


@pytest.mark.parametrize("p", [4096, 1000, 64])
def test_top_columns_finds_the_same_entries_as_a_plain_top_k(p: int) -> None:
    g = torch.Generator().manual_seed(p)
    sim = torch.randn(50, p, generator=g)
    sim[:10] = sim[:10].round(decimals=1)  # ties
    got = top_columns(sim, 32)
    want = sim.topk(32, dim=1).values
    assert torch.equal(sim.gather(1, got).sort(1, descending=True).values, want)  # the same 32 values per row
    assert all(len(set(r.tolist())) == 32 for r in got)  # 32 distinct columns

    values, idx = topk_rows(sim, 5)
    plain = sim.topk(5, dim=1)
    assert torch.equal(values, plain.values) and torch.equal(sim.gather(1, idx), plain.values)


@pytest.mark.parametrize("block_bytes", [4 * 100 * 7, 4 * 100 * 64, 1 << 30])  # blocks of 7 rows, 64 rows, one block
def test_blocked_search_is_the_whole_search(block_bytes: int, monkeypatch) -> None:
    import nferd.models.search as search_module
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(100, 8, generator=g), dim=1)
    mask = torch.zeros(1, 100, dtype=torch.bool)
    mask[0, 10:30] = True  # one bank image's rows excluded, as for a training image's own
    sim = (q @ keys.t()).masked_fill(mask, float("-inf"))
    want = sim.topk(4, dim=1)
    monkeypatch.setattr(search_module, "SEARCH_BLOCK_BYTES", block_bytes)
    top, idx = search_blocked(q, keys, 4, mask)
    assert top.shape == idx.shape == (50, 4)
    assert torch.allclose(top, want.values, atol=1e-6) and torch.allclose(sim.gather(1, idx), top, atol=1e-6)
    assert not ((idx >= 10) & (idx < 30)).any()


def test_defect_matched_share_counts_defect_positions_as_close_as_normal_ones() -> None:
    from nferd.cli.diagnose import defect_matched_share
    rng = np.random.default_rng(0)
    normal_rows = rng.uniform(0.90, 1.0, size=(4, 100))  # 4 normal images' top-1 cosines
    defect_rows = np.concatenate([np.full((2, 50), 0.99), np.full((2, 50), 0.5)], axis=1)  # half close, half far
    top1 = np.concatenate([normal_rows, defect_rows])
    in_defect = np.zeros_like(top1, dtype=bool)
    in_defect[4:] = True
    normal = np.array([True] * 4 + [False] * 2)
    assert defect_matched_share(top1, in_defect, normal) == pytest.approx(0.5)
    assert np.isnan(defect_matched_share(top1, np.zeros_like(in_defect), normal))


def test_the_search_blocks_give_the_best_cosine_of_all_keys() -> None:
    """Several query and key blocks (and ragged last ones) give what one full product gives."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 2 * QUERY_BLOCK + 7, 16, generator=g), dim=2)
    keys = F.normalize(torch.randn(2 * KEY_BLOCK + 11, 16, generator=g), dim=1)
    keys[-1] = q[1, -1]  # the best match of one query sits in the ragged last key block
    got = nearest_blocked(q, keys)
    assert got.shape == (3, q.shape[1])
    assert torch.allclose(got, (q @ keys.t()).amax(dim=2), atol=1e-6)
    assert got[1, -1] == pytest.approx(1.0, abs=1e-6)


def keys_in_a_subspace(n: int, channels: int = 16, dims: int = 4) -> torch.Tensor:
    """``n`` unit keys that span only ``dims`` of their ``channels``: a projection on their principal
    directions keeps every cosine with them, so the coarse search ranks them as the exact one."""
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(channels, dims, generator=g)).Q
    return F.normalize(torch.randn(n, dims, generator=g) @ basis.t(), dim=1)


def test_the_fitted_projection_spans_the_keys() -> None:
    keys = keys_in_a_subspace(500)
    proj = principal_directions(keys, 4)
    assert proj.shape == (16, 4)
    assert torch.allclose(proj.t() @ proj, torch.eye(4), atol=1e-5)  # orthonormal directions
    assert torch.allclose(keys @ proj @ proj.t(), keys, atol=1e-5)  # nothing of the keys lost


def test_the_rerank_finds_the_nearest_row_when_its_candidates_hold_it() -> None:
    """Keys in a 4-dimensional subspace, several query and key blocks, a ragged last block (11 keys:
    four groups of 2 and a rest of 3) holding one query's own key: the exact cosines of the coarse
    candidates give brute force's best cosine, that is its nearest row's."""
    g = torch.Generator().manual_seed(3)
    keys = keys_in_a_subspace(2 * KEY_BLOCK + 11)
    q = F.normalize(torch.randn(2, QUERY_BLOCK + 5, 16, generator=g), dim=2)
    q[1, -1] = keys[-1]
    proj = principal_directions(keys, 4)
    got = nearest_reranked(q, keys, proj, keys @ proj)
    sim = q @ keys.t()
    nearest = sim.argmax(dim=2)  # brute force's row
    assert got.shape == (2, QUERY_BLOCK + 5)
    assert torch.allclose(got, sim.gather(2, nearest.unsqueeze(2)).squeeze(2), atol=1e-5)
    assert got[1, -1] == pytest.approx(1.0, abs=1e-5)


def test_the_rerank_is_a_true_cosine_never_above_the_nearest_rows() -> None:
    """Keys spread over all 16 channels, 4 directions: the coarse search may miss the nearest row,
    but what it returns is the cosine of a searched key."""
    g = torch.Generator().manual_seed(4)
    keys = F.normalize(torch.randn(KEY_BLOCK + 3, 16, generator=g), dim=1)
    q = F.normalize(torch.randn(1, 40, 16, generator=g), dim=2)
    proj = principal_directions(keys, 4)
    got = nearest_reranked(q, keys, proj, keys @ proj)
    sim = q[0] @ keys.t()
    assert bool((got[0] <= sim.amax(1) + 1e-6).all())
    assert all(torch.isclose(sim[j], got[0, j], atol=1e-6).any() for j in range(40))


def test_the_blocked_search_never_returns_an_excluded_row() -> None:
    """Queries that are excluded keys themselves: unmasked, each would find its own key (cosine 1);
    masked, the search returns brute force's best of the other rows."""
    g = torch.Generator().manual_seed(5)
    keys = F.normalize(torch.randn(200, 8, generator=g), dim=1)
    mask = torch.zeros(1, 200, dtype=torch.bool)
    mask[0, 40:80] = True
    q = keys[40:80].clone()
    top, idx = search_blocked(q, keys, 3, mask)
    want = (q @ keys.t()).masked_fill(mask, float("-inf")).topk(3, dim=1)
    assert torch.equal(idx, want.indices) and torch.allclose(top, want.values, atol=1e-6)
    assert bool((top < 1 - 1e-3).all())
    assert bool((search_blocked(q, keys, 1)[1][:, 0] == torch.arange(40, 80)).all())  # unmasked: itself


def test_a_stamped_cache_follows_in_place_changes_and_new_storage_and_keeps_nothing_while_tracing(
        monkeypatch) -> None:
    cache: StampedCache[torch.Tensor] = StampedCache()
    t = torch.ones(3)
    calls = []

    def double() -> torch.Tensor:
        calls.append(1)
        return t * 2

    first = cache.get(double, t)
    assert cache.get(double, t) is first and len(calls) == 1
    t.add_(1)  # in place: the version counter moves
    assert torch.equal(cache.get(double, t), torch.full((3,), 4.0)) and len(calls) == 2
    t = t.clone()  # the same values in a new storage
    cache.get(double, t)
    assert len(calls) == 3
    kept = cache.get(double, t)
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)  # as during an export
    assert cache.get(double, t) is not kept and len(calls) == 4  # computed into the graph, not read
    t.add_(1)
    cache.get(double, t)
    monkeypatch.undo()
    assert cache.get(double, t) is not kept and len(calls) == 6  # nor kept: computed again after


def test_the_projected_keys_follow_an_in_place_edit_of_the_maps_and_of_the_projection() -> None:
    torch.manual_seed(0)
    bank = PatchBank(4, 16, None, (4, 4), top_k=1, search_dims=4).eval()
    bank.fill(torch.randn(4, 16, 4, 4), torch.arange(4))
    q = torch.randn(2, 16, 4, 4)
    keys = bank.projected_keys()
    assert bank.projected_keys() is keys
    assert torch.equal(keys, bank.searched()[2] @ bank.search_proj)
    before = bank.nearest_distance(q)
    bank.maps.mul_(-1.0)  # in place: new rows are searched, and projected again
    assert torch.equal(bank.projected_keys(), bank.searched()[2] @ bank.search_proj)
    assert torch.allclose(bank.projected_keys(), -keys)
    flipped = bank.nearest_distance(q)
    fresh = PatchBank(4, 16, None, (4, 4), top_k=1, search_dims=4).eval()
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(flipped, fresh.nearest_distance(q)) and not torch.allclose(flipped, before)
    bank.search_proj.mul_(-1.0)  # the projection edited in place
    assert torch.allclose(bank.projected_keys(), keys)
