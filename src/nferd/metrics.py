"""Standard evaluation metrics for unsupervised anomaly detection.

Image level (one score per image):
    :func:`auroc`, :func:`average_precision`, :func:`f1_max`, :func:`f1_max_threshold`.

Pixel level (one anomaly map per image, ground-truth masks where nonzero = defect):
    :func:`pixel_auroc`, :func:`pixel_ap`, :func:`pro_curve`, :func:`aupro`.

:func:`compute_metrics` bundles the usual set reported on MVTec AD-style benchmarks.

Every function accepts numpy arrays, torch tensors or plain sequences, and returns plain
Python floats (or numpy arrays for curves).

Why the pixel metrics are not simply ``sklearn`` on the flattened maps: a test set of
100 images at 1024 x 1024 has 1e8 pixels, and sklearn sorts float64 copies of everything
(several GiB). Instead the scores are quantised onto a fixed set of global thresholds and
the metrics are computed from per-threshold histograms, streaming over the images in
chunks. The thresholds are:

* every distinct score value, when there are at most ``num_thresholds`` of them; the
  results are then *exact* (identical to sklearn / the MVTec AD evaluation code);
* otherwise points between quantiles of the normal-pixel scores and of the defect-pixel
  scores (estimated from a random sample), so that both the false-positive axis and the
  true-positive (or PRO) axis of the curves are finely resolved. The curves then consist
  of a subset of the exact curves' points. With the default 16384 thresholds the results
  typically differ from the exact values by < 1e-6 for pixel AUROC and AUPRO and by a
  few 1e-5 for pixel AP (AP's step-wise sum is the most sensitive to binning; its error
  shrinks as 1 / num_thresholds).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn import metrics as _skm

__all__ = [
    "DEFAULT_NUM_THRESHOLDS",
    "auroc",
    "average_precision",
    "aupro",
    "compute_metrics",
    "f1_max",
    "f1_max_threshold",
    "pixel_ap",
    "pixel_auroc",
    "pro_curve",
    "segmentation_f1",
    "validation_threshold",
]

#: Maximum number of global score thresholds used by the pixel-level metrics.
DEFAULT_NUM_THRESHOLDS = 16384

# Pixels processed per step: bounds the temporary memory of the pixel metrics (~100 MiB).
_CHUNK_PIXELS = 1 << 22
# Scores sampled (per class: normal / defect) to place the thresholds.
_SAMPLE_SIZE = 1 << 20
# scipy.ndimage.label structure for a stack of images: 8-connectivity inside each image
# (the 3x3 all-ones structure of the MVTec AD evaluation code), no links between images.
_IMAGE_STACK_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_IMAGE_STACK_8_CONNECTIVITY[1] = True


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    """Numpy view of an array, torch tensor (any device) or sequence, without copying if possible."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        tensor = x.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError:  # dtypes numpy lacks, e.g. bfloat16
            return tensor.float().numpy()
    return np.asarray(x)


def _image_level_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D float scores and boolean labels (True = anomalous)."""
    scores = _to_numpy(scores).astype(np.float64, copy=False).reshape(-1)
    labels = _to_numpy(labels).reshape(-1)
    if scores.size != labels.size:
        raise ValueError(f"got {scores.size} scores but {labels.size} labels")
    if scores.size == 0:
        raise ValueError("scores and labels are empty")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous); got values {np.unique(labels)[:10]}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return scores, labels.astype(bool)


def _squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def _pixel_inputs(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps and masks as C-contiguous numpy arrays of the same number of pixels."""
    maps, masks = _to_numpy(maps), _to_numpy(masks)
    if _squeezed_shape(maps.shape) != _squeezed_shape(masks.shape):
        raise ValueError(f"anomaly maps of shape {maps.shape} do not match masks of shape {masks.shape}")
    if maps.size == 0:
        raise ValueError("anomaly maps are empty")
    if maps.dtype.kind not in "fiub":
        raise ValueError(f"anomaly maps must be numeric, got dtype {maps.dtype}")
    return np.ascontiguousarray(maps), np.ascontiguousarray(masks)


def _image_stack(x: np.ndarray, name: str) -> np.ndarray:
    """View (H, W), (N, H, W) or (N, 1, H, W) input as an (N, H, W) stack of images."""
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), (N, 1, H, W) or (H, W); got {x.shape}")
    return x


def _work_dtype(maps: np.ndarray) -> type[np.floating]:
    """float64 maps keep their precision; everything else is compared in float32."""
    return np.float64 if maps.dtype == np.float64 else np.float32


def _chunks(maps: np.ndarray, masks: np.ndarray, whole_images: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (float scores, boolean defect mask) in pieces of about ``_CHUNK_PIXELS`` pixels.

    With ``whole_images`` the inputs are (N, H, W) stacks and pieces are groups of whole
    images (needed for connected components); otherwise they are flat slices.
    """
    dtype = _work_dtype(maps)
    if whole_images:
        step = max(1, _CHUNK_PIXELS // (maps.shape[1] * maps.shape[2]))
        pieces = ((maps[i : i + step], masks[i : i + step]) for i in range(0, maps.shape[0], step))
    else:
        flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
        pieces = (
            (flat_maps[i : i + _CHUNK_PIXELS], flat_masks[i : i + _CHUNK_PIXELS])
            for i in range(0, flat_maps.size, _CHUNK_PIXELS)
        )
    for scores, mask in pieces:
        yield scores.astype(dtype, copy=False), mask != 0


# ------------------------------------------------------------------ global thresholds


def _sorted_quantiles(values: np.ndarray, count: int) -> np.ndarray:
    """``count`` evenly spaced order statistics of ``values`` (actual values, no interpolation)."""
    if values.size == 0:
        return values
    values = np.sort(values)
    return values[np.linspace(0, values.size - 1, min(count, values.size)).round().astype(np.intp)]


def _choose_thresholds(maps: np.ndarray, masks: np.ndarray, num_defect: int, num_thresholds: int) -> np.ndarray:
    """Ascending global thresholds: all distinct scores if few enough, else between class-wise quantiles."""
    rng = np.random.default_rng(0)  # deterministic: the same inputs always give the same metrics
    class_sizes = (maps.size - num_defect, num_defect)  # normal, defect

    # Stratified random sample of the scores of each class (everything when the class is small).
    samples: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for scores, defect in _chunks(maps, masks, whole_images=False):
        for cls, members in enumerate((~defect, defect)):
            positions = np.flatnonzero(members)
            if class_sizes[cls] > _SAMPLE_SIZE:
                num_picks = rng.binomial(positions.size, _SAMPLE_SIZE / class_sizes[cls])
                positions = positions[rng.integers(0, positions.size, num_picks)]
            samples[cls].append(scores[positions])
    normal_sample, defect_sample = (np.concatenate(s) for s in samples)

    distinct = np.unique(np.concatenate((normal_sample, defect_sample)))
    if distinct.size <= num_thresholds:
        if max(class_sizes) <= _SAMPLE_SIZE:  # the "sample" is every pixel
            return distinct
        distinct = _complete_distinct_values(maps, masks, distinct, num_thresholds)
        if distinct is not None:
            return distinct

    half = num_thresholds // 2
    values = np.union1d(_sorted_quantiles(normal_sample, half), _sorted_quantiles(defect_sample, num_thresholds - half))
    # Thresholds halfway between the sampled values rather than at them: a threshold equal
    # to a pixel's score would make that pixel the lowest of its bin, which biases the
    # chords of the curves (e.g. defect pixels always counted last -> AUPRO too high).
    return np.unique((values[:-1] + values[1:]) / 2)


def _complete_distinct_values(
    maps: np.ndarray, masks: np.ndarray, candidates: np.ndarray, limit: int
) -> np.ndarray | None:
    """All distinct scores (the sample may have missed rare ones), or None if more than ``limit``."""
    for scores, _ in _chunks(maps, masks, whole_images=False):
        nearest = candidates[np.minimum(np.searchsorted(candidates, scores), candidates.size - 1)]
        missing = scores[nearest != scores]
        if missing.size:
            candidates = np.union1d(candidates, missing)
            if candidates.size > limit:
                return None
    return candidates


# ------------------------------------------------------------------ pixel histograms


@dataclass
class _PixelHistograms:
    """Per-bin statistics of all pixels for ascending thresholds ``t[0] < ... < t[T-1]``.

    Bin ``b`` (0..T) holds the scores in ``[t[b-1], t[b])``; a pixel is predicted anomalous
    at threshold ``t[k]`` (score >= t[k]) exactly when its bin is > k.
    """

    thresholds: np.ndarray
    normal: np.ndarray  # (T+1,) count of normal pixels per bin
    defect: np.ndarray  # (T+1,) count of defect pixels per bin
    region_overlap: np.ndarray | None  # (T+1,) sum over defect pixels of 1 / size of their region
    num_regions: int = 0


def _pixel_histograms(
    maps: np.ndarray, masks: np.ndarray, num_thresholds: int, with_regions: bool
) -> _PixelHistograms:
    """One streaming pass over all pixels; ``with_regions`` needs (N, H, W) stacks."""
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    num_defect = int(np.count_nonzero(masks))
    if num_defect == 0:
        raise ValueError("masks contain no defect pixel: pixel-level metrics need at least one anomalous pixel")
    if num_defect == masks.size:
        raise ValueError("masks contain no normal pixel: pixel-level metrics need at least one normal pixel")
    thresholds = _choose_thresholds(maps, masks, num_defect, num_thresholds)
    num_bins = thresholds.size + 1
    total = np.zeros(num_bins, dtype=np.int64)
    defect_hist = np.zeros(num_bins, dtype=np.int64)
    overlap = np.zeros(num_bins, dtype=np.float64) if with_regions else None
    num_regions = 0
    for scores, defect in _chunks(maps, masks, whole_images=with_regions):
        if not np.isfinite(scores).all():
            raise ValueError("anomaly maps contain NaN or infinite values")
        bins = np.searchsorted(thresholds, scores.reshape(-1), side="right")
        total += np.bincount(bins, minlength=num_bins)
        defect_pixels = np.flatnonzero(defect)
        defect_bins = bins[defect_pixels]
        defect_hist += np.bincount(defect_bins, minlength=num_bins)
        if with_regions:
            # PRO at a threshold = mean over regions of (region pixels above it) / (region size)
            #                    = (1 / #regions) * sum over defect pixels above it of 1 / (its region size).
            labels, n = ndimage.label(defect, structure=_IMAGE_STACK_8_CONNECTIVITY)
            region_of_pixel = labels.reshape(-1)[defect_pixels]
            region_size = np.bincount(region_of_pixel, minlength=n + 1)
            weight = 1.0 / region_size[region_of_pixel]
            overlap += np.bincount(defect_bins, weights=weight, minlength=num_bins)
            num_regions += n
    return _PixelHistograms(thresholds, total - defect_hist, defect_hist, overlap, num_regions)


def _at_descending_thresholds(hist: np.ndarray) -> np.ndarray:
    """For thresholds from highest to lowest: total of the bins predicted anomalous (score >= threshold)."""
    return np.cumsum(hist[::-1], dtype=np.float64)[:-1]


def _auroc_from_histograms(h: _PixelHistograms) -> float:
    tpr = _at_descending_thresholds(h.defect) / h.defect.sum()
    fpr = _at_descending_thresholds(h.normal) / h.normal.sum()
    return float(np.trapezoid(np.r_[0.0, tpr, 1.0], np.r_[0.0, fpr, 1.0]))


def _ap_from_histograms(h: _PixelHistograms) -> float:
    # Same definition as sklearn: AP = sum_k (R_k - R_{k-1}) * P_k over descending thresholds.
    # The final point (threshold below every score) completes recall to 1 when the lowest
    # threshold is above some scores; otherwise it adds nothing.
    tp = np.r_[_at_descending_thresholds(h.defect), h.defect.sum()]
    fp = np.r_[_at_descending_thresholds(h.normal), h.normal.sum()]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / h.defect.sum()
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _pro_curve_from_histograms(h: _PixelHistograms) -> tuple[np.ndarray, np.ndarray]:
    assert h.region_overlap is not None
    fpr = _at_descending_thresholds(h.normal) / h.normal.sum()
    pro = _at_descending_thresholds(h.region_overlap) / h.num_regions
    # As in the MVTec AD code: guard against rounding above 1 and pin the curve to (0,0)..(1,1).
    np.clip(pro, None, 1.0, out=pro)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) on [0, x_max] for non-decreasing x from 0 to 1.

    The curve is cut at exactly ``x_max`` by linear interpolation, as in the MVTec AD
    evaluation code, so that the result does not depend on where the thresholds fall.
    """
    end = int(np.searchsorted(x, x_max, side="right"))  # x[:end] <= x_max, and x[0] = 0
    area = float(np.trapezoid(y[:end], x[:end]))
    if x[end - 1] < x_max:  # then end < len(x) because x[-1] = 1 >= x_max
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += float(0.5 * (y0 + y_cut) * (x_max - x0))
    return area


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _aupro_from_histograms(h: _PixelHistograms, fpr_limit: float) -> float:
    fpr, pro = _pro_curve_from_histograms(h)
    return float(_area_up_to(fpr, pro, fpr_limit) / fpr_limit)


# ------------------------------------------------------------------- MVTec AD 2


def validation_threshold(validation_maps: Any, k: float = 3.0) -> float:
    """MVTec AD 2's segmentation threshold: the mean plus ``k`` (3) standard deviations of the
    per-pixel anomaly values of good validation images (never of test images)."""
    values = _to_numpy(validation_maps).astype(np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("validation maps must be non-empty and finite")
    return float(values.mean() + k * values.std())


def segmentation_f1(maps: Any, masks: Any, threshold: float) -> float:
    """F1 of the maps binarised at ``threshold`` (map > threshold is anomalous) against the masks,
    over all pixels of all images pooled (MVTec AD 2's SegF1). 0 when nothing is predicted or
    nothing is anomalous (F1 is then undefined; a score must not reward predicting nothing)."""
    m, g = _pixel_inputs(maps, masks)
    pred, gt = m > threshold, g > 0
    tp = int(np.count_nonzero(pred & gt))
    fp, fn = int(np.count_nonzero(pred & ~gt)), int(np.count_nonzero(~pred & gt))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


# ------------------------------------------------------------------- image level API


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve: the probability that an anomalous sample outscores a normal one.

    Threshold-free, so it is the headline detection metric. ``labels``: 1 = anomalous.
    """
    scores, labels = _image_level_inputs(scores, labels)
    if labels.all() or not labels.any():
        raise ValueError(
            "AUROC needs both normal and anomalous samples, but all labels are "
            f"{int(labels[0])} ({labels.size} samples)"
        )
    return float(_skm.roc_auc_score(labels, scores))


def average_precision(scores: Any, labels: Any) -> float:
    """Area under the precision-recall curve (sklearn's step-wise definition).

    Unlike AUROC it is sensitive to how rare anomalies are, i.e. to false alarms. ``labels``: 1 = anomalous.
    """
    scores, labels = _image_level_inputs(scores, labels)
    if not labels.any():
        raise ValueError("average precision needs at least one anomalous sample (label 1)")
    return float(_skm.average_precision_score(labels, scores))


def f1_max_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 score over all decision thresholds, and the threshold achieving it.

    Predicting "anomalous" for ``score >= threshold`` gives that F1; it measures the best
    operating point a deployed system could reach. ``labels``: 1 = anomalous.
    """
    scores, labels = _image_level_inputs(scores, labels)
    if not labels.any():
        raise ValueError("F1 needs at least one anomalous sample (label 1)")
    precision, recall, thresholds = _skm.precision_recall_curve(labels, scores)
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def f1_max(scores: Any, labels: Any) -> float:
    """Best F1 score over all decision thresholds (see :func:`f1_max_threshold`)."""
    return f1_max_threshold(scores, labels)[0]


# ------------------------------------------------------------------- pixel level API


def pixel_auroc(maps: Any, masks: Any, num_thresholds: int = DEFAULT_NUM_THRESHOLDS) -> float:
    """ROC AUC over all pixels of all images pooled together (anomaly localisation quality).

    ``masks``: nonzero = defect. Exact when the maps hold at most ``num_thresholds``
    distinct values, otherwise computed on that many global thresholds (see module docs).
    Dominated by the many easy normal pixels, hence usually close to 1; see :func:`aupro`.
    """
    maps, masks = _pixel_inputs(maps, masks)
    return _auroc_from_histograms(_pixel_histograms(maps, masks, num_thresholds, with_regions=False))


def pixel_ap(maps: Any, masks: Any, num_thresholds: int = DEFAULT_NUM_THRESHOLDS) -> float:
    """Average precision over all pixels pooled together; penalises false-positive pixels.

    ``masks``: nonzero = defect. Same thresholding as :func:`pixel_auroc`.
    """
    maps, masks = _pixel_inputs(maps, masks)
    return _ap_from_histograms(_pixel_histograms(maps, masks, num_thresholds, with_regions=False))


def pro_curve(
    anomaly_maps: Any, masks: Any, num_thresholds: int = DEFAULT_NUM_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-Region Overlap curve of the MVTec AD paper: (fpr, pro), sorted by increasing fpr.

    For each global threshold, ``pro`` is the mean over all connected defect regions of all
    images (8-connectivity) of the fraction of the region predicted anomalous, and ``fpr``
    the fraction of all normal pixels predicted anomalous. Averaging over regions, rather
    than pixels, keeps small defects as important as large ones. The curve starts at (0, 0)
    and ends at (1, 1).

    ``anomaly_maps``: (N, H, W) (or (N, 1, H, W) / (H, W)); ``masks``: same shape, nonzero = defect.
    """
    maps, masks = _pixel_inputs(anomaly_maps, masks)
    maps, masks = _image_stack(maps, "anomaly_maps"), _image_stack(masks, "masks")
    return _pro_curve_from_histograms(_pixel_histograms(maps, masks, num_thresholds, with_regions=True))


def aupro(
    anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3, num_thresholds: int = DEFAULT_NUM_THRESHOLDS
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD evaluation protocol).

    The trapezoidal area from fpr 0 to exactly ``fpr_limit`` (interpolating the curve
    there), divided by ``fpr_limit`` so that a perfect map scores 1. The limit (0.3 by
    convention) ignores operating points with unusably many false positives.
    Exact when the maps hold at most ``num_thresholds`` distinct values.
    """
    _check_fpr_limit(fpr_limit)
    maps, masks = _pixel_inputs(anomaly_maps, masks)
    maps, masks = _image_stack(maps, "anomaly_maps"), _image_stack(masks, "masks")
    return _aupro_from_histograms(_pixel_histograms(maps, masks, num_thresholds, with_regions=True), fpr_limit)


def miss_at_false_alarm(scores: Any, labels: Any, false_alarm_rate: float = 0.01) -> float:
    """The line's figure: the fraction of defective images scored at or below the (1 -
    ``false_alarm_rate``) quantile of the good images' scores, i.e. the parts a threshold that
    flags ``false_alarm_rate`` of the good parts would pass. NaN without both classes."""
    s, y = _image_level_inputs(scores, labels)
    good, bad = s[~y], s[y]
    if good.size == 0 or bad.size == 0:
        return float("nan")
    return float(np.mean(bad <= np.quantile(good, 1 - false_alarm_rate)))


def compute_metrics(
    image_scores: Any,
    image_labels: Any,
    anomaly_maps: Any | None = None,
    masks: Any | None = None,
    *,
    fpr_limit: float = 0.3,
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
) -> dict[str, float]:
    """The usual benchmark report: image AUROC, AP and F1-max, the miss rate at a 1 % false-alarm
    rate on the good test images, plus pixel AUROC, pixel AP and AUPRO.

    Pixel metrics are included when both ``anomaly_maps`` and ``masks`` are given; they are
    computed from a single pass over the pixels. If the masks contain no defect (or no
    normal) pixel the pixel metrics are undefined and reported as NaN.
    """
    if (anomaly_maps is None) != (masks is None):
        raise ValueError("anomaly_maps and masks must be given together")
    results = {
        "image_auroc": auroc(image_scores, image_labels),
        "image_f1max": f1_max(image_scores, image_labels),
        "image_ap": average_precision(image_scores, image_labels),
        "miss_at_1pct_fa": miss_at_false_alarm(image_scores, image_labels, 0.01),
    }
    if anomaly_maps is None:
        return results
    _check_fpr_limit(fpr_limit)

    maps, gt = _pixel_inputs(anomaly_maps, masks)
    maps, gt = _image_stack(maps, "anomaly_maps"), _image_stack(gt, "masks")
    num_defect = int(np.count_nonzero(gt))
    if num_defect == 0 or num_defect == gt.size:
        results.update(pixel_auroc=float("nan"), pixel_ap=float("nan"), aupro=float("nan"))
        return results
    hist = _pixel_histograms(maps, gt, num_thresholds, with_regions=True)
    results.update(
        pixel_auroc=_auroc_from_histograms(hist),
        pixel_ap=_ap_from_histograms(hist),
        aupro=_aupro_from_histograms(hist, fpr_limit),
    )
    return results
