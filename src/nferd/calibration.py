"""Decision thresholds fitted on held-out NORMAL images, never on the test split.

Image threshold: the (1 - target false-alarm rate) quantile of held-out normal image scores.
Pixel threshold: the (1 - pixel false-positive rate) quantile of their map values, so the
binary mask of a normal image is almost empty. Scores are normalised so that 0.5 is the
decision boundary: 0 at the lowest held-out normal score, linear up to 1 at twice the margin.
With a validation folder holding defects, ``fit_f1`` picks the F1-optimal threshold instead.
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


def fit_f1(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> dict[str, Any]:
    """F1-optimal image and pixel thresholds on a validation set that holds defects."""
    from .metrics import f1_max_threshold
    _, thr = f1_max_threshold(scores, labels)
    _, pix = f1_max_threshold(np.asarray(maps).ravel(), np.asarray(masks).ravel() > 0)
    normal = np.asarray(scores)[np.asarray(labels) == 0]
    lo = float(normal.min()) if normal.size else float(np.min(scores))
    return {"method": "validation_f1", "image_threshold": float(thr), "pixel_threshold": float(pix),
            "pixel_median": float(np.median(np.asarray(maps)[np.asarray(masks) == 0])),
            "score_min": lo, "n_images": int(len(scores))}


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
