"""Decision thresholds fitted on held-out NORMAL images, never on the test split.

Image threshold: the (1 - target false-alarm rate) quantile of held-out normal image scores.
Pixel threshold: the (1 - pixel false-positive rate) quantile of their map values, so the
binary mask of a normal image is almost empty. Scores are normalised so that 0.5 is the
decision boundary: 0 at the lowest held-out normal score, linear up to 1 at twice the margin.
With a validation folder holding defects, ``fit_f1`` picks the F1-optimal threshold instead;
``fit_validation`` chooses between the two by what the set holds, and ``calibrate`` runs a model
over a set and fits it (used by training and by ``nferd calibrate``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fit_normal(scores: np.ndarray, maps: np.ndarray, false_alarm_rate: float = 0.01,
               pixel_fpr: float = 0.001) -> dict[str, Any]:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < 2:
        raise ValueError("calibration needs at least 2 held-out normal images; raise --holdout or add a "
                         "validation folder")
    thr = float(np.quantile(scores, 1 - false_alarm_rate))
    values = np.asarray(maps, dtype=np.float32).ravel()
    pix = float(np.quantile(values, 1 - pixel_fpr))
    return {"method": "normal_quantile", "image_threshold": thr, "pixel_threshold": max(pix, 0.0),
            "pixel_median": float(np.median(values)),
            "score_min": float(scores.min()), "false_alarm_rate": false_alarm_rate,
            "pixel_fpr": pixel_fpr, "n_images": int(scores.size)}


def fit_f1(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray | None,
           pixel_fpr: float = 0.001) -> dict[str, Any]:
    """F1-optimal image (and, with masks, pixel) thresholds on a validation set that holds defects.

    The decision is ``score > threshold``, so the threshold sits halfway between the lowest score
    flagged at the F1 optimum and the next score below it. Without masks the pixel threshold is
    the normal images' ``1 - pixel_fpr`` quantile, as in ``fit_normal``.
    """
    from ..metrics import f1_max_threshold
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    f1, cut = f1_max_threshold(scores, labels)
    below = scores[scores < cut]
    thr = (cut + below.max()) / 2 if below.size else cut - 1e-6 * max(abs(cut), 1.0)
    maps = np.asarray(maps, dtype=np.float32)
    normal = scores[labels == 0]
    if masks is not None and np.asarray(masks).any():
        masks = np.asarray(masks) > 0
        _, pix = f1_max_threshold(maps.ravel(), masks.ravel())
        pixel_median = float(np.median(maps[~masks]))
    else:
        normal_maps = maps[labels == 0] if normal.size else maps
        pix, pixel_median = float(np.quantile(normal_maps, 1 - pixel_fpr)), float(np.median(normal_maps))
    lo = float(normal.min()) if normal.size else float(scores.min())
    return {"method": "validation_f1", "image_threshold": float(thr), "pixel_threshold": float(pix),
            "pixel_median": pixel_median, "score_min": min(lo, float(thr) - 1e-6), "image_f1": float(f1),
            "n_images": int(scores.size), "n_defective": int((labels == 1).sum())}


def fit_validation(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray | None = None,
                   false_alarm_rate: float = 0.01) -> dict[str, Any]:
    """Normal-quantile thresholds for a set of good images; F1-optimal ones when it holds defects."""
    labels = np.asarray(labels)
    if (labels == 1).any():
        if not (labels == 0).any():
            raise ValueError("a validation set with defects also needs good images to place the threshold")
        return fit_f1(scores, labels, maps, masks)
    return fit_normal(scores, maps, false_alarm_rate)


def calibrate(model: Any, dataset: Any, false_alarm_rate: float = 0.01, device: Any = "auto",
              precision: str = "auto", batch_size: int = 16) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` (never the test split) and fit the thresholds on it."""
    from .evaluate import infer
    res = infer(model, dataset, batch_size=batch_size, device=device, precision=precision)
    has_masks = getattr(dataset, "has_masks", True)
    cal = fit_validation(res["scores"], res["labels"], res["maps"], res["masks"] if has_masks else None,
                         false_alarm_rate)
    cal["source"] = getattr(dataset, "calibration_source", "holdout")
    cal["fitted_set"] = decision_counts(res["scores"], res["labels"], cal)
    return cal


def decision_counts(scores: np.ndarray, labels: np.ndarray, cal: dict[str, Any]) -> dict[str, int]:
    """False alarms among good images and misses among defective ones at the calibrated threshold."""
    nok = np.asarray(scores) > cal["image_threshold"]
    labels = np.asarray(labels)
    return {"good": int((labels == 0).sum()), "false_alarms": int((nok & (labels == 0)).sum()),
            "defective": int((labels == 1).sum()), "misses": int((~nok & (labels == 1)).sum())}


def display_range(cal: dict[str, Any] | None, amap: np.ndarray) -> tuple[float, float]:
    """Heatmap colour range: the pixel threshold sits mid-scale, so red means 'over threshold'."""
    if cal is None:
        return float(amap.min()), float(max(amap.max(), amap.min() + 1e-6))
    lo, thr = cal.get("pixel_median", 0.0), cal["pixel_threshold"]
    return lo, lo + 2 * max(thr - lo, 1e-6)


def normalize(score: np.ndarray | float, cal: dict[str, Any]) -> np.ndarray:
    """Map raw scores so the threshold becomes 0.5 (clipped to [0, 1])."""
    thr, lo = cal["image_threshold"], cal["score_min"]
    span = max(thr - lo, 1e-12)
    return np.clip(0.5 + 0.5 * (np.asarray(score, dtype=np.float64) - thr) / span, 0.0, 1.0)
