"""Tests for nferd.metrics: hand-worked cases, brute-force references and sklearn agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn import metrics as skm

from nferd.metrics import (
    aupro,
    auroc,
    average_precision,
    compute_metrics,
    f1_max,
    f1_max_threshold,
    miss_at_false_alarm,
    pixel_ap,
    pixel_auroc,
    pro_curve,
)

# --------------------------------------------------------------------------- fixtures


def blob_masks(num_images: int, size: int, seed: int) -> np.ndarray:
    """Random blob-shaped defects (thresholded smooth noise); the first image is defect-free."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((num_images, size, size)), sigma=(0, 2.5, 2.5))
    masks = (field > 1.5 * field.std()).astype(np.uint8)
    masks[0] = 0
    return masks


def noisy_maps(masks: np.ndarray, seed: int) -> np.ndarray:
    """Continuous scores, higher on defects but overlapping with normal pixels."""
    rng = np.random.default_rng(seed)
    return (rng.random(masks.shape) + 0.7 * masks).astype(np.float32)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Straightforward MVTec AD AUPRO: every distinct score is a threshold, explicit loops."""
    regions = []  # (image index, boolean region mask)
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask != 0, structure=np.ones((3, 3)))
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = masks == 0

    fprs, pros = [0.0], [0.0]
    for threshold in sorted(np.unique(maps), reverse=True):
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        pros.append(np.mean([predicted[i][region].sum() / region.sum() for i, region in regions]))
    fprs.append(1.0)
    pros.append(1.0)

    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the last segment at exactly fpr_limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.fixture
def small_chunks_and_sample(monkeypatch):
    """Force the streaming and sampling code paths on small inputs."""
    from nferd.metrics import histograms
    monkeypatch.setattr(histograms, "CHUNK_PIXELS", 500)
    monkeypatch.setattr(histograms, "SAMPLE_SIZE", 300)


# ------------------------------------------------------------------- image level


def test_image_metrics_hand_case():
    # The classic sklearn example. Pairs (anomalous, normal): 0.35 > 0.1, 0.35 < 0.4,
    # 0.8 > 0.1, 0.8 > 0.4 -> AUROC = 3/4.
    scores = [0.1, 0.4, 0.35, 0.8]
    labels = [0, 0, 1, 1]
    assert auroc(scores, labels) == pytest.approx(0.75)
    # Descending thresholds: 0.8 -> P=1, R=1/2; 0.4 -> P=1/2, R=1/2; 0.35 -> P=2/3, R=1.
    # AP = 1/2 * 1 + 0 * 1/2 + 1/2 * 2/3.
    assert average_precision(scores, labels) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # F1 at those thresholds: 2/3, 1/2, 2*(2/3)*1/(2/3+1) = 0.8, and at 0.1: 2*(1/2)/(3/2) = 2/3.
    f1, threshold = f1_max_threshold(scores, labels)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)
    assert f1_max(scores, labels) == pytest.approx(0.8)


def test_image_metrics_perfectly_separable():
    scores = np.array([0.2, 0.1, 0.3, 0.9, 0.7])
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc(scores, labels) == 1.0
    assert average_precision(scores, labels) == 1.0
    assert f1_max_threshold(scores, labels) == (1.0, 0.7)
    assert auroc(-scores, labels) == 0.0


def test_image_metrics_accept_torch_and_return_python_floats():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([False, False, True, True])
    for fn in (auroc, average_precision, f1_max):
        assert type(fn(scores, labels)) is float
    assert auroc(scores, labels) == pytest.approx(0.75)


def test_image_metrics_errors():
    with pytest.raises(ValueError, match="AUROC needs both normal and anomalous samples"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="AUROC needs both normal and anomalous samples"):
        auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="at least one anomalous"):
        average_precision([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="at least one anomalous"):
        f1_max([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="labels must be 0"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, float("nan")], [0, 1])


# ------------------------------------------------------------------- pixel AUROC / AP


def test_pixel_auroc_ap_match_sklearn_continuous():
    # 200k distinct values > 16384 thresholds: the binned path.
    rng = np.random.default_rng(1)
    masks = rng.random((8, 100, 250)) < 0.05
    maps = rng.standard_normal(masks.shape).astype(np.float32) + 1.5 * masks
    expected_auroc = skm.roc_auc_score(masks.ravel(), maps.ravel())
    expected_ap = skm.average_precision_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected_auroc, abs=1e-4)
    assert pixel_ap(maps, masks) == pytest.approx(expected_ap, abs=1e-4)


def test_pixel_auroc_ap_exact_with_ties(small_chunks_and_sample):
    # Few distinct values (heavy ties): exact, also when chunked and sampled.
    rng = np.random.default_rng(2)
    masks = rng.random((3, 40, 40)) < 0.2
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 1)
    assert pixel_auroc(maps, masks) == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert pixel_ap(maps, masks) == pytest.approx(skm.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_pixel_metrics_accept_any_layout_and_torch():
    rng = np.random.default_rng(3)
    masks = rng.random((2, 1, 16, 16)) < 0.3
    maps = rng.random((2, 1, 16, 16)).astype(np.float32) + masks
    expected = pixel_auroc(maps, masks)
    assert pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks)) == expected
    assert pixel_auroc(maps[:, 0], masks) == expected  # (N, H, W) maps vs (N, 1, H, W) masks
    assert pixel_auroc(maps.ravel(), masks.ravel().astype(np.uint8) * 255) == expected  # nonzero = defect


# ------------------------------------------------------------------- PRO / AUPRO


def test_perfect_and_inverted_maps():
    masks = blob_masks(4, 48, seed=0)
    rng = np.random.default_rng(0)
    # Perfect: every defect pixel scores above every normal pixel.
    perfect = np.where(masks > 0, 0.6 + 0.4 * rng.random(masks.shape), 0.5 * rng.random(masks.shape))
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert pixel_ap(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    inverted = 1.0 - perfect
    assert aupro(inverted, masks) == pytest.approx(0.0, abs=1e-12)
    assert pixel_auroc(inverted, masks) == pytest.approx(0.0, abs=1e-12)
    # The same with binary maps (two distinct values).
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(1.0 - masks.astype(np.float32), masks) == pytest.approx(0.0, abs=1e-12)


def two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """One 4 x 6 image: region A (2 x 2, top left), region B (2 pixels, bottom right), 18 normal pixels."""
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[0:2, 0:2] = 1  # A
    mask[3, 4:6] = 1  # B
    scores = np.full((4, 6), 0.1)  # 14 of the 18 normal pixels
    scores[0, 0:2] = 0.9  # half of A
    scores[1, 0:2] = 0.5  # other half of A
    scores[3, 4], scores[3, 5] = 0.7, 0.2  # B
    scores[0, 4] = 0.8  # normal pixels above the bulk
    scores[1, 3] = scores[2, 3] = 0.6
    scores[2, 0] = 0.5
    return scores[None], mask[None]


def test_two_region_pro_curve_by_hand():
    maps, masks = two_region_case()
    fpr, pro = pro_curve(maps, masks)
    # threshold: FP pixels / 18,  PRO = (overlap A / 4 + overlap B / 2) / 2
    #   0.9: 0 -> fpr 0,     PRO (2/4 + 0  ) / 2 = 1/4
    #   0.8: 1 -> fpr 1/18,  PRO 1/4
    #   0.7: 1 -> fpr 1/18,  PRO (2/4 + 1/2) / 2 = 1/2
    #   0.6: 3 -> fpr 3/18,  PRO 1/2
    #   0.5: 4 -> fpr 4/18,  PRO (4/4 + 1/2) / 2 = 3/4
    #   0.2: 4 -> fpr 4/18,  PRO (4/4 + 2/2) / 2 = 1
    #   0.1: 18 -> fpr 1,    PRO 1
    # plus the (0, 0) start and (1, 1) end.
    np.testing.assert_allclose(fpr, [0, 0, 1 / 18, 1 / 18, 3 / 18, 4 / 18, 4 / 18, 1, 1])
    np.testing.assert_allclose(pro, [0, 1 / 4, 1 / 4, 1 / 2, 1 / 2, 3 / 4, 1, 1, 1])


def test_two_region_aupro_by_hand():
    maps, masks = two_region_case()
    # Trapezoids of the curve above, up to fpr 0.3:
    #   [0, 1/18] at PRO 1/4, [1/18, 3/18] at 1/2, [3/18, 4/18] rising 1/2 -> 3/4, [4/18, 0.3] at 1.
    area = (1 / 18) * (1 / 4) + (2 / 18) * (1 / 2) + (1 / 18) * (1 / 2 + 3 / 4) / 2 + (0.3 - 4 / 18) * 1
    assert aupro(maps, masks) == pytest.approx(area / 0.3, abs=1e-12)
    # Up to fpr 0.2 the curve is cut inside the rising segment: PRO(0.2) by interpolation
    # = 1/2 + (3/4 - 1/2) * (0.2 - 3/18) / (1/18) = 1/2 + 1/4 * 0.6 = 0.65.
    area = (1 / 18) * (1 / 4) + (2 / 18) * (1 / 2) + (0.2 - 3 / 18) * (1 / 2 + 0.65) / 2
    assert aupro(maps, masks, fpr_limit=0.2) == pytest.approx(area / 0.2, abs=1e-12)
    # The whole curve: ... + [4/18, 1] at 1.
    area = (1 / 18) * (1 / 4) + (2 / 18) * (1 / 2) + (1 / 18) * (1 / 2 + 3 / 4) / 2 + (1 - 4 / 18) * 1
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(area, abs=1e-12)


def test_defect_free_images_add_normal_pixels_only():
    maps, masks = two_region_case()
    # A second, defect-free image whose 24 pixels all score 0: the normal pixels become
    # 18 + 24 = 42, regions and everything above 0.1 stay the same.
    maps2 = np.concatenate([maps, np.zeros_like(maps)])
    masks2 = np.concatenate([masks, np.zeros_like(masks)])
    fpr, pro = pro_curve(maps2, masks2)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 42, 1 / 42, 3 / 42, 4 / 42, 4 / 42, 18 / 42, 1, 1])
    np.testing.assert_allclose(pro, [0, 1 / 4, 1 / 4, 1 / 2, 1 / 2, 3 / 4, 1, 1, 1, 1])
    assert aupro(maps2, masks2) == pytest.approx(reference_aupro(maps2, masks2), abs=1e-12)


def test_regions_use_8_connectivity_within_images_only():
    mask = np.zeros((1, 5, 5), dtype=np.uint8)
    mask[0, 0, 0] = mask[0, 1, 1] = 1  # diagonal neighbours: one region of 2 pixels
    mask[0, 3, 3] = 1  # a separate 1-pixel region
    maps = np.full((1, 5, 5), 0.5)
    maps[0, 0, 0] = 1.0
    maps[0, 1, 1] = maps[0, 3, 3] = 0.2
    fpr, pro = pro_curve(maps, mask)
    # At threshold 1.0: (1/2 + 0) / 2 regions. With 4-connectivity it would be (1 + 0 + 0) / 3.
    assert fpr[1] == 0 and pro[1] == pytest.approx(1 / 4)

    # A region touching the bottom edge of image 0 and one touching the top edge of
    # image 1 are two regions, not one.
    masks = np.zeros((2, 3, 3), dtype=np.uint8)
    masks[0, 2, 1] = masks[1, 0, 1] = 1
    maps = np.zeros((2, 3, 3))
    maps[0, 2, 1] = 1.0
    fpr, pro = pro_curve(maps, masks)
    assert pro[1] == pytest.approx(1 / 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_exact_matches_brute_force(seed):
    masks = blob_masks(3, 32, seed=seed)
    maps = noisy_maps(masks, seed=seed)  # 3072 distinct values <= 16384 thresholds: exact
    for fpr_limit in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(
            reference_aupro(maps, masks, fpr_limit), abs=1e-9
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_binned_matches_brute_force(seed):
    masks = blob_masks(3, 32, seed=seed)
    maps = noisy_maps(masks, seed=seed)
    # 3072 distinct values on 512 thresholds: binned.
    assert aupro(maps, masks, num_thresholds=512) == pytest.approx(reference_aupro(maps, masks), abs=1e-3)


def test_aupro_sampled_thresholds_and_chunks(small_chunks_and_sample):
    masks = blob_masks(4, 32, seed=3)
    maps = noisy_maps(masks, seed=3)
    # Thresholds from a random sample, streamed in chunks of 500 pixels (images kept whole).
    assert aupro(maps, masks, num_thresholds=1024) == pytest.approx(reference_aupro(maps, masks), abs=1e-3)
    # Few distinct values: exact even though the sample may miss some of them.
    coarse = np.round(maps, 2)
    assert aupro(coarse, masks) == pytest.approx(reference_aupro(coarse, masks), abs=1e-12)


def test_pro_curve_is_monotone_from_origin_to_one():
    masks = blob_masks(3, 32, seed=4)
    fpr, pro = pro_curve(noisy_maps(masks, seed=4), masks, num_thresholds=100)
    assert fpr.shape == pro.shape and fpr.size <= 100 + 2
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_pixel_metric_errors():
    maps = np.random.default_rng(0).random((2, 8, 8))
    no_defect = np.zeros((2, 8, 8))
    with pytest.raises(ValueError, match="no defect pixel"):
        aupro(maps, no_defect)
    with pytest.raises(ValueError, match="no defect pixel"):
        pixel_auroc(maps, no_defect)
    with pytest.raises(ValueError, match="no normal pixel"):
        aupro(maps, np.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="do not match masks"):
        aupro(maps, np.ones((2, 8, 9)))
    with pytest.raises(ValueError, match=r"must have shape \(N, H, W\)"):
        aupro(maps.reshape(2, 2, 4, 8), np.ones((2, 2, 4, 8)))
    masks = np.zeros((2, 8, 8))
    masks[0, 2:4, 2:4] = 1
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN"):
        aupro(np.where(masks > 0, np.nan, maps), masks)
    with pytest.raises(ValueError, match="num_thresholds"):
        pixel_auroc(maps, masks, num_thresholds=1)


# ------------------------------------------------------------------- compute_metrics


def test_compute_metrics_matches_individual_metrics():
    masks = blob_masks(6, 32, seed=5)
    maps = noisy_maps(masks, seed=5)
    image_scores = torch.from_numpy(maps.reshape(6, -1).max(axis=1))
    image_labels = torch.from_numpy(masks.reshape(6, -1).any(axis=1))
    results = compute_metrics(image_scores, image_labels, torch.from_numpy(maps), torch.from_numpy(masks))
    assert results == {
        "image_auroc": auroc(image_scores, image_labels),
        "image_f1max": f1_max(image_scores, image_labels),
        "image_ap": average_precision(image_scores, image_labels),
        "miss_at_1pct_fa": miss_at_false_alarm(image_scores, image_labels),
        "pixel_auroc": pixel_auroc(maps, masks),
        "pixel_ap": pixel_ap(maps, masks),
        "aupro": aupro(maps, masks),
    }
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in results.values())

    assert set(compute_metrics(image_scores, image_labels)) == {"image_auroc", "image_f1max", "image_ap",
                                                                "miss_at_1pct_fa"}


def test_compute_metrics_without_defect_pixels_gives_nan():
    maps = np.random.default_rng(0).random((2, 8, 8))
    results = compute_metrics([0.1, 0.9], [0, 1], maps, np.zeros((2, 8, 8)))
    assert results["image_auroc"] == 1.0
    assert all(math.isnan(results[k]) for k in ("pixel_auroc", "pixel_ap", "aupro"))
    with pytest.raises(ValueError, match="given together"):
        compute_metrics([0.1, 0.9], [0, 1], maps, None)
