"""Standard evaluation metrics for unsupervised anomaly detection.

Image level (one score per image):
    :func:`auroc`, :func:`average_precision`, :func:`f1_max`, :func:`f1_max_threshold`.

Pixel level (one anomaly map per image, ground-truth masks where nonzero = defect):
    :func:`pixel_auroc`, :func:`pixel_ap`, :func:`pro_curve`, :func:`aupro`.

:func:`compute_metrics` bundles the usual set reported on MVTec AD-style benchmarks.

Every function accepts numpy arrays, torch tensors or plain sequences, and returns plain
Python floats (or numpy arrays for curves).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as _skm

from .histograms import (
    DEFAULT_NUM_THRESHOLDS,
    ap_from_histograms,
    aupro_from_histograms,
    auroc_from_histograms,
    check_fpr_limit,
    pixel_histograms,
    pro_curve_from_histograms,
)
from .inputs import image_level_inputs, image_stack, pixel_inputs, to_numpy

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


def validation_threshold(validation_maps: Any, k: float = 3.0) -> float:
    """MVTec AD 2's segmentation threshold: the mean plus ``k`` (3) standard deviations of the
    per-pixel anomaly values of good validation images (never of test images)."""
    values = to_numpy(validation_maps).astype(np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("validation maps must be non-empty and finite")
    return float(values.mean() + k * values.std())


def segmentation_f1(maps: Any, masks: Any, threshold: float) -> float:
    """F1 of the maps binarised at ``threshold`` (map > threshold is anomalous) against the masks,
    over all pixels of all images pooled (MVTec AD 2's SegF1). 0 when nothing is predicted or
    nothing is anomalous (F1 is then undefined; a score must not reward predicting nothing)."""
    m, g = pixel_inputs(maps, masks)
    pred, gt = m > threshold, g > 0
    tp = int(np.count_nonzero(pred & gt))
    fp, fn = int(np.count_nonzero(pred & ~gt)), int(np.count_nonzero(~pred & gt))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve: the probability that an anomalous sample outscores a normal one.

    Threshold-free, so it is the headline detection metric. ``labels``: 1 = anomalous.
    """
    scores, labels = image_level_inputs(scores, labels)
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
    scores, labels = image_level_inputs(scores, labels)
    if not labels.any():
        raise ValueError("average precision needs at least one anomalous sample (label 1)")
    return float(_skm.average_precision_score(labels, scores))


def f1_max_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 score over all decision thresholds, and the threshold achieving it.

    Predicting "anomalous" for ``score >= threshold`` gives that F1; it measures the best
    operating point a deployed system could reach. ``labels``: 1 = anomalous.
    """
    scores, labels = image_level_inputs(scores, labels)
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


def pixel_auroc(maps: Any, masks: Any, num_thresholds: int = DEFAULT_NUM_THRESHOLDS) -> float:
    """ROC AUC over all pixels of all images pooled together (anomaly localisation quality).

    ``masks``: nonzero = defect. Exact when the maps hold at most ``num_thresholds``
    distinct values, otherwise computed on that many global thresholds (see module docs).
    Dominated by the many easy normal pixels, hence usually close to 1; see :func:`aupro`.
    """
    maps, masks = pixel_inputs(maps, masks)
    return auroc_from_histograms(pixel_histograms(maps, masks, num_thresholds, with_regions=False))


def pixel_ap(maps: Any, masks: Any, num_thresholds: int = DEFAULT_NUM_THRESHOLDS) -> float:
    """Average precision over all pixels pooled together; penalises false-positive pixels.

    ``masks``: nonzero = defect. Same thresholding as :func:`pixel_auroc`.
    """
    maps, masks = pixel_inputs(maps, masks)
    return ap_from_histograms(pixel_histograms(maps, masks, num_thresholds, with_regions=False))


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
    maps, masks = pixel_inputs(anomaly_maps, masks)
    maps, masks = image_stack(maps, "anomaly_maps"), image_stack(masks, "masks")
    return pro_curve_from_histograms(pixel_histograms(maps, masks, num_thresholds, with_regions=True))


def aupro(
    anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3, num_thresholds: int = DEFAULT_NUM_THRESHOLDS
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD evaluation protocol).

    The trapezoidal area from fpr 0 to exactly ``fpr_limit`` (interpolating the curve
    there), divided by ``fpr_limit`` so that a perfect map scores 1. The limit (0.3 by
    convention) ignores operating points with unusably many false positives.
    Exact when the maps hold at most ``num_thresholds`` distinct values.
    """
    check_fpr_limit(fpr_limit)
    maps, masks = pixel_inputs(anomaly_maps, masks)
    maps, masks = image_stack(maps, "anomaly_maps"), image_stack(masks, "masks")
    return aupro_from_histograms(pixel_histograms(maps, masks, num_thresholds, with_regions=True), fpr_limit)


def miss_at_false_alarm(scores: Any, labels: Any, false_alarm_rate: float = 0.01) -> float:
    """The line's figure: the fraction of defective images scored at or below the (1 -
    ``false_alarm_rate``) quantile of the good images' scores, i.e. the parts a threshold that
    flags ``false_alarm_rate`` of the good parts would pass. NaN without both classes."""
    s, y = image_level_inputs(scores, labels)
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
    check_fpr_limit(fpr_limit)

    maps, gt = pixel_inputs(anomaly_maps, masks)
    maps, gt = image_stack(maps, "anomaly_maps"), image_stack(gt, "masks")
    num_defect = int(np.count_nonzero(gt))
    if num_defect == 0 or num_defect == gt.size:
        results.update(pixel_auroc=float("nan"), pixel_ap=float("nan"), aupro=float("nan"))
        return results
    hist = pixel_histograms(maps, gt, num_thresholds, with_regions=True)
    results.update(
        pixel_auroc=auroc_from_histograms(hist),
        pixel_ap=ap_from_histograms(hist),
        aupro=aupro_from_histograms(hist, fpr_limit),
    )
    return results
