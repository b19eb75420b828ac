"""The memory of every training position (PatchCore's scorer), its coreset, the presets built on it,
students shared between presets, and cross-fitted calibration for small data sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nferd import ModelConfig, MVTecDataset, TrainConfig, evaluate, train
from nferd.engine.checkpoint import load_checkpoint
from nferd.engine.crossfit import FOLDS, fold_file, fold_indices
from nferd.metrics import miss_at_false_alarm
from nferd.models.coreset import GreedyCoreset
from nferd.models.memory import MemoryBank, locally_aware, memory_rows, nearest_euclidean


def test_locally_aware_features_average_each_neighbourhood_and_join_stages_on_the_finest_grid() -> None:
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 4, 8, 8, generator=g),
              torch.randn(2, 5, 4, 4, generator=g)]
    f = locally_aware(stages, (2, 3))
    assert f.shape == (2, 9, 8, 8)
    # an interior position of stage 2: the plain mean of its 3 x 3 neighbours
    assert torch.allclose(f[:, :4, 3, 4], stages[1][:, :, 2:5, 3:6].mean((2, 3)), atol=1e-6)
    # a corner averages only the neighbours that exist
    assert torch.allclose(f[:, :4, 0, 0], stages[1][:, :, :2, :2].mean((2, 3)), atol=1e-6)
    pooled3 = F.avg_pool2d(stages[2], 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(f[:, 4:], F.interpolate(pooled3, size=(8, 8), mode="bilinear", align_corners=False))


def test_blocked_nearest_search_equals_brute_force_and_skips_excluded_keys() -> None:
    g = torch.Generator().manual_seed(1)
    q, keys = torch.randn(2, 1100, 7, generator=g), torch.randn(9000, 7, generator=g)  # ragged blocks of both
    sq = (keys * keys).sum(1)
    got = nearest_euclidean(q, keys, sq)
    want = torch.cdist(q, keys[None].expand(2, -1, -1)).amin(2) ** 2
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    hidden = sq.clone()
    hidden[:8000] = float("inf")
    want_rest = torch.cdist(q, keys[None, 8000:].expand(2, -1, -1)).amin(2) ** 2
    assert torch.allclose(nearest_euclidean(q, keys, hidden), want_rest, rtol=1e-4, atol=1e-4)


def coverage(x: torch.Tensor, idx: torch.Tensor) -> float:
    """The largest distance from any row to its nearest kept row."""
    return float(torch.cdist(x, x[idx]).amin(1).max())


def test_greedy_coreset_covers_rare_rows_that_a_random_subset_misses() -> None:
    g = torch.Generator().manual_seed(2)
    common = torch.randn(3000, 16, generator=g) * 0.1
    rare = torch.randn(6, 16, generator=g) * 0.1 + 5 * torch.eye(16)[:6]  # six rare appearances, far away
    x = torch.cat([common, rare])
    greedy = GreedyCoreset(projection_dims=8, seed=0).select(x, 60)
    random = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:60]
    assert len(set(greedy.tolist())) == 60 and greedy.tolist() == sorted(greedy.tolist())
    assert set(range(3000, 3006)) <= set(greedy.tolist())  # every rare row kept
    assert coverage(x, greedy) < 0.5 * coverage(x, random)
    assert torch.equal(greedy, GreedyCoreset(projection_dims=8, seed=0).select(x, 60))  # seeded
    assert torch.equal(GreedyCoreset().select(x[:10], 60), torch.arange(10))  # fewer rows than asked: all


def test_memory_size_keeps_every_position_that_fits_the_budget() -> None:
    assert memory_rows(1000, 152, 8.0) == 1000
    assert memory_rows(200_000, 152, 8.0) == 8 * 2**20 // (4 * 152)
    assert memory_rows(200_000, 1536, 8.0) == 1365  # WRN50-2's stages 2 and 3: the search stays cheap


def test_leave_one_out_distance_ignores_the_images_own_rows() -> None:
    bank = MemoryBank(3, (1,))
    g = torch.Generator().manual_seed(3)
    maps = [torch.randn(4, 3, 4, 4, generator=g), torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 1, 1)]
    bank.fill([(maps, torch.arange(4))], 64, GreedyCoreset())
    own = bank.distance([m[:2] for m in maps])
    assert float(own.abs().max()) < 1e-3  # a stored image finds itself
    left_out = bank.distance([m[:2] for m in maps], exclude=torch.tensor([0, 1]))
    f = locally_aware([m[:2] for m in maps], (1,)).permute(0, 2, 3, 1).reshape(2, 16, 3)
    rows = locally_aware(maps, (1,)).permute(0, 2, 3, 1).reshape(4, 16, 3)
    for j in range(2):
        others = torch.cat([rows[i] for i in range(4) if i != j])
        want = torch.cdist(f[j], others).amin(1)
        assert torch.allclose(left_out[j].flatten(), want, atol=1e-4)


def test_miss_rate_at_one_percent_false_alarms_counts_defects_at_or_below_the_good_99th_percentile() -> None:
    good = np.arange(100, dtype=float)  # 99th percentile: 98.01
    bad = np.array([50.0, 98.0, 98.5, 200.0])
    scores, labels = np.concatenate([good, bad]), np.r_[np.zeros(100), np.ones(4)]
    assert miss_at_false_alarm(scores, labels) == pytest.approx(0.5)
    assert np.isnan(miss_at_false_alarm(good, np.zeros(100)))


@pytest.fixture(scope="module")
def small(synth_root):  # type: ignore[no-untyped-def]
    return (MVTecDataset(synth_root, "synthetic_tiles", "train", 64),
            MVTecDataset(synth_root, "synthetic_tiles", "test", 64))


def test_memory_preset_trains_no_student_detects_and_survives_a_checkpoint(small, tmp_path) -> None:
    train_set, test_set = small
    model, summary = train(train_set, ModelConfig.preset("patchcore", image_size=64),
                           TrainConfig(epochs=50, holdout=0.2), tmp_path / "pc", progress=False)
    assert model.ocbe is None and model.decoder is None and summary["epochs_run"] == 0
    assert 0 < model.memory.size and model.memory.source.max() < len(train_set)
    metrics, raw = evaluate(model, test_set, device="cpu")
    assert metrics["image_auroc"] >= 0.9 and metrics["pixel_auroc"] >= 0.85
    loaded, meta = load_checkpoint(tmp_path / "pc")
    assert torch.equal(loaded.memory.rows, model.memory.rows)
    again, raw2 = evaluate(loaded, test_set, device="cpu")
    np.testing.assert_allclose(raw2["maps"], raw["maps"], rtol=1e-5, atol=1e-5)
    assert "left out" in meta["calibration"]["source"]  # few held-out images: the training images count too
    assert meta["calibration"]["n_images"] == len(train_set)


def test_presets_with_one_student_recipe_train_the_same_student_and_share_it(small, tmp_path) -> None:
    train_set, _ = small
    tcfg = TrainConfig(epochs=2, holdout=0.2, batch_size=4)
    rd, rd_summary = train(train_set, ModelConfig.preset("rd4ad", image_size=64), tcfg, tmp_path / "rd", progress=False)
    nf, _ = train(train_set, ModelConfig.preset("nferd", image_size=64), tcfg, tmp_path / "nf", progress=False)
    shared, summary = train(train_set, ModelConfig.preset("nferd", image_size=64), tcfg, tmp_path / "shared",
                            progress=False, student_from=tmp_path / "rd")
    for name, value in rd.state_dict().items():
        if name.startswith(("ocbe.", "decoder.")):
            assert torch.equal(value, nf.state_dict()[name]), name
            assert torch.equal(value, shared.state_dict()[name]), name
    assert summary["student_from"] == str(tmp_path / "rd") and summary["epochs_run"] == 0
    assert torch.equal(nf.map_norm, shared.map_norm)
    assert nf.memory is not None and nf.config.student_recipe == rd.config.student_recipe
    # small data: five fold students cross-fitted, saved, and taken by the run that shares the student
    cal = rd_summary["calibration"]
    assert "cross-fitted" in cal["source"] and cal["n_images"] > rd_summary["n_calibration"]
    assert all(fold_file(tmp_path / "rd", k).is_file() for k in range(FOLDS))
    assert not (tmp_path / "shared" / "folds").exists()  # taken, not trained again
    with pytest.raises(ValueError, match="another design"):
        train(train_set, ModelConfig.preset("nferd_fusion", image_size=64, n_bank=4, top_k=2), tcfg,
              tmp_path / "fused", progress=False, student_from=tmp_path / "rd")


def test_folds_are_disjoint_and_cover_every_image() -> None:
    folds = fold_indices(23, 5, seed=4)
    assert sorted(i for f in folds for i in f) == list(range(23))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert folds == fold_indices(23, 5, seed=4) and folds != fold_indices(23, 5, seed=5)
