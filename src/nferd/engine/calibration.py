"""Decision thresholds fitted on held-out NORMAL images, never on the test split.

Image threshold from good images only: the k-th largest held-out normal score, k chosen so that a
new good part scores above it with probability at most the requested false-alarm rate, with a
stated confidence over the draw of the held-out set (``confidence``, default 0.9), whatever the
score distribution. With the k-th largest of n exchangeable normal scores as threshold, the
false-alarm rate of a new good part is Beta(k, n - k + 1) distributed, so

    P(false-alarm rate > alpha) = P(Binomial(n, alpha) <= k - 1),

and the largest k with that probability at most ``1 - confidence`` is taken (exact for continuous
scores, conservative with ties). When n is too small even for the maximum (k = 1 needs
(1 - alpha)^n <= 1 - confidence), the maximum is used, a ``CalibrationWarning`` says how many
normal images the rate needs, and the calibration records the larger rate it does guarantee.
Why 90 % and not 95 %: a higher confidence moves the threshold up, trading false alarms for missed
defects (the worse failure), and needs about 30 % more held-out images for the same rate.

Pixel threshold: the (1 - pixel false-positive rate) quantile of the normal map values, so the
binary mask of a normal image is almost empty (the pixels of one image are not exchangeable, so
no guarantee is claimed). Scores are normalised so that 0.5 is the decision boundary: 0 at the
lowest held-out normal score, linear up to 1 at twice the margin. With a validation folder holding
defects, ``fit_f1`` picks the F1-optimal threshold instead; ``fit_validation`` chooses between the
two by what the set holds, and ``calibrate`` runs a model over a set and fits it (used by training
and by ``nferd calibrate``).

Decisions fail closed: a NaN or infinite score, map or threshold raises ``NonFiniteError``, since
``score > threshold`` is False for NaN and would read OK.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
from scipy.stats import beta, binom

from .finite import NonFiniteError, require_finite  # noqa: F401  (decisions raise it; callers catch it from here)

DEFAULT_CONFIDENCE = 0.9


class CalibrationWarning(UserWarning):
    """The held-out normal images are too few to guarantee the requested false-alarm rate."""


def _pct(x: float) -> str:
    return f"{100 * x:.3g} %"


def _check_rate(false_alarm_rate: float, confidence: float) -> None:
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"the false-alarm rate must lie between 0 and 1, got {false_alarm_rate}")
    if not 0 < confidence < 1:
        raise ValueError(f"the confidence must lie between 0 and 1, got {confidence}")


def exceed_probability(n: int, rank: int, false_alarm_rate: float) -> float:
    """P(false-alarm rate > ``false_alarm_rate``) with the ``rank``-th largest of n normal scores as threshold."""
    return float(binom.cdf(rank - 1, n, false_alarm_rate))


def threshold_rank(n: int, false_alarm_rate: float, confidence: float = DEFAULT_CONFIDENCE) -> int | None:
    """Largest k such that the k-th largest of n normal scores keeps the false-alarm rate at most
    ``false_alarm_rate`` with probability ``confidence``; None when n is too small even for k = 1."""
    _check_rate(false_alarm_rate, confidence)
    p = binom.cdf(np.arange(n), n, false_alarm_rate)  # entry k - 1: P(rate > alpha) at rank k, rising in k
    ok = np.flatnonzero(p <= 1 - confidence)
    return int(ok[-1]) + 1 if ok.size else None


def false_alarm_bound(n: int, rank: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The false-alarm rate that the ``rank``-th largest of n normal scores keeps to with probability
    ``confidence``: the ``confidence`` quantile of Beta(rank, n - rank + 1)."""
    return float(beta.ppf(confidence, rank, n - rank + 1))


def images_needed(false_alarm_rate: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """Fewest normal images whose maximum keeps the false-alarm rate at most ``false_alarm_rate`` with
    probability ``confidence``: the smallest n with (1 - rate)^n <= 1 - confidence."""
    _check_rate(false_alarm_rate, confidence)
    n = max(1, math.ceil(math.log(1 - confidence) / math.log1p(-false_alarm_rate)))
    while exceed_probability(n, 1, false_alarm_rate) > 1 - confidence:  # rounding of the logarithms
        n += 1
    while n > 1 and exceed_probability(n - 1, 1, false_alarm_rate) <= 1 - confidence:
        n -= 1
    return n


REQUIRED_NUMBERS = ("image_threshold", "pixel_threshold", "score_min")  # read by every decision and map
NORMAL_BOUND_NUMBERS = ("false_alarm_rate", "confidence", "rank", "false_alarm_bound", "n_images")


def check_calibration(cal: Any) -> None:
    """Refuse a calibration no decision can be trusted on: not a mapping, a number the decisions
    read missing or not a number, or any NaN or infinite number in it (None, no calibration at
    all, is fine: decisions are then None). Checked as a whole when a file is loaded, so a
    tampered or truncated calibration fails there, with its key named, and not at the first image."""
    if cal is None:
        return
    if not isinstance(cal, dict):
        raise ValueError(f"calibration is a {type(cal).__name__}, not a JSON object")
    needed = REQUIRED_NUMBERS + (NORMAL_BOUND_NUMBERS if cal.get("method") == "normal_bound" else ())
    for key in needed:
        value = cal.get(key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"calibration.{key} is {value!r}, not a number: fit the calibration again")
    for key in ("pixel_median",):
        if key in cal and (isinstance(cal[key], bool) or not isinstance(cal[key], numbers.Real)):
            raise ValueError(f"calibration.{key} is {cal[key]!r}, not a number: fit the calibration again")
    scores = cal.get("normal_scores", [])
    if not isinstance(scores, list) or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in scores):
        raise ValueError("calibration.normal_scores is not a list of numbers: fit the calibration again")

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")
        elif isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
            raise NonFiniteError(f"{where} is {obj}")

    walk(cal, "calibration")


def decision(score: float, cal: dict[str, Any] | None) -> str | None:
    """'NOK' when ``score`` is above the calibrated image threshold, 'OK' otherwise, None without calibration.

    Fails closed: a NaN or infinite score, or a threshold that is missing or not finite, raises
    ``NonFiniteError`` (``score > nan`` is False, which would read OK).
    """
    if not math.isfinite(score):
        raise NonFiniteError(f"the image score is {score}: the model produced a non-finite value, so no decision "
                             "can be made (a broken model or checkpoint)")
    if cal is None:
        return None
    thr = cal.get("image_threshold")
    if isinstance(thr, bool) or not isinstance(thr, numbers.Real) or not math.isfinite(thr):
        raise NonFiniteError(f"the calibration's image threshold is {thr!r}: no decision can be made; "
                             "fit the calibration again")
    return "NOK" if score > thr else "OK"


def describe_guarantee(cal: dict[str, Any]) -> str:
    """One line on what a ``fit_normal`` threshold guarantees, for people reading a log."""
    k = cal["rank"]
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    nth = "highest" if k == 1 else f"{k}{suffix} highest"
    return (f"false-alarm rate on new good parts at most {_pct(cal['false_alarm_bound'])} with "
            f"{_pct(cal['confidence'])} confidence ({_pct(cal['false_alarm_rate'])} requested; threshold: the {nth} "
            f"of {cal['n_images']} normal scores)")


def describe_calibration(cal: dict[str, Any]) -> str:
    """The calibration in one sentence for an operator or a report: where the thresholds come from
    and what they promise."""
    source = cal.get("source", "held-out good images")
    thresholds = f"image threshold {cal['image_threshold']:.4g}, pixel threshold {cal['pixel_threshold']:.4g}"
    if cal.get("method") == "normal_bound":
        return f"{thresholds}; fitted on {cal['n_images']} good images ({source}): {describe_guarantee(cal)}"
    if cal.get("method") == "validation_f1":
        return (f"{thresholds}; the F1-optimal threshold on {cal['n_images']} validation images, "
                f"{cal.get('n_defective', 0)} of them defective ({source})")
    return f"{thresholds} ({source})"


def fit_normal(scores: np.ndarray, maps: np.ndarray, false_alarm_rate: float = 0.01, pixel_fpr: float = 0.001,
               confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
    """Image threshold with a false-alarm guarantee and pixel threshold by quantile, from good images only.

    See the module docstring for the bound. The result records the requested rate, the confidence,
    n, the chosen rank (1 = the highest score), the rate guaranteed at that confidence
    (``false_alarm_bound``) and the normal images the requested rate needs (``images_needed``); with
    too few images it also holds the ``warning`` that was issued.
    """
    _check_rate(false_alarm_rate, confidence)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size < 2:
        raise ValueError("calibration needs at least 2 held-out normal images; raise --holdout or add a "
                         "validation folder")
    require_finite(scores, maps, what="held-out normal images")
    n = int(scores.size)
    needed = images_needed(false_alarm_rate, confidence)
    rank = threshold_rank(n, false_alarm_rate, confidence)
    warning = None
    if rank is None:
        rank = 1
        warning = (f"{n} normal images (never trained on) are too few to keep the false-alarm rate under "
                   f"{_pct(false_alarm_rate)} with {_pct(confidence)} confidence: that needs at least {needed}. "
                   f"The threshold is the highest normal score, which keeps it under "
                   f"{_pct(false_alarm_bound(n, 1, confidence))}")
        warnings.warn(warning, CalibrationWarning, stacklevel=2)
    thr = float(np.sort(scores)[n - rank])
    values = np.asarray(maps, dtype=np.float32).ravel()
    pix = float(np.quantile(values, 1 - pixel_fpr))
    return {"method": "normal_bound", "image_threshold": thr, "pixel_threshold": max(pix, 0.0),
            "pixel_median": float(np.median(values)), "score_min": float(scores.min()),
            "false_alarm_rate": false_alarm_rate, "confidence": confidence, "rank": rank,
            "false_alarm_bound": false_alarm_bound(n, rank, confidence), "images_needed": needed,
            "pixel_fpr": pixel_fpr, "n_images": n, **({"warning": warning} if warning else {})}


def fit_f1(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray | None,
           pixel_fpr: float = 0.001) -> dict[str, Any]:
    """F1-optimal image (and, with masks, pixel) thresholds on a validation set that holds defects.

    The decision is ``score > threshold``, so the threshold sits halfway between the lowest score
    flagged at the F1 optimum and the next score below it. Without masks the pixel threshold is
    the normal images' ``1 - pixel_fpr`` quantile, as in ``fit_normal``.
    """
    from ..metrics import f1_max_threshold
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    require_finite(scores, maps, what="validation images")
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
                   false_alarm_rate: float = 0.01, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
    """Guaranteed-rate thresholds for a set of good images; F1-optimal ones when it holds defects."""
    labels = np.asarray(labels)
    if (labels == 1).any():
        if not (labels == 0).any():
            raise ValueError("a validation set with defects also needs good images to place the threshold")
        return fit_f1(scores, labels, maps, masks)
    return fit_normal(scores, maps, false_alarm_rate, confidence=confidence)


def calibrate(model: Any, dataset: Any, false_alarm_rate: float = 0.01, device: Any = "auto",
              precision: str = "auto", batch_size: int = 16, confidence: float = DEFAULT_CONFIDENCE,
              tiling: Any = None) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` (never the test split; full-resolution images scored tile
    by tile with ``tiling``) and fit the thresholds on it."""
    from .evaluate import infer
    res = infer(model, dataset, batch_size=batch_size, device=device, precision=precision, tiling=tiling)
    return fit_calibration(res, dataset, false_alarm_rate, confidence)


def fit_calibration(res: dict[str, Any], dataset: Any, false_alarm_rate: float = 0.01,
                    confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
    """The thresholds for inference results ``res`` (scores, maps, labels, masks, paths) of the
    calibration ``dataset``, with its source, the decisions on it and the normal scores."""
    require_finite(res["scores"], res["maps"], res["paths"], what="calibration images")
    has_masks = getattr(dataset, "has_masks", True)
    cal = fit_validation(res["scores"], res["labels"], res["maps"], res["masks"] if has_masks else None,
                         false_alarm_rate, confidence)
    cal["source"] = getattr(dataset, "calibration_source", "holdout")
    cal["fitted_set"] = decision_counts(res["scores"], res["labels"], cal)
    # the reference a deployed model's drift alarm compares recent OK parts with
    cal["normal_scores"] = [float(v) for v in np.sort(np.asarray(res["scores"])[np.asarray(res["labels"]) == 0])]
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
