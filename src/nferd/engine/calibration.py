"""Decision thresholds fitted on held-out NORMAL images, never on the test split, and the typed
record that every decision, map and file reads them from.

``Calibration`` is that record. It is frozen, so the thresholds of a running service or export
cannot change under it, and it is checked whenever it is made, so a tampered or truncated
calibration fails where its file is loaded, with its key named, and not at the first image.
``from_dict`` and ``to_dict`` read and write the JSON object that checkpoints and exported models
store (the same keys and values, so files written before and after load alike; keys it does not
know are kept in ``extra`` and written back).

Image threshold from good images only: the k-th largest held-out normal score, k chosen so that a
new good part scores above it with probability at most the requested false-alarm rate, with a
stated confidence over the draw of the held-out set (``confidence``, default 0.9), whatever the
score distribution (the bound and why 90 %: ``false_alarm``). When the held-out images are too few
even for the maximum, the maximum is used, a ``CalibrationWarning`` says how many normal images the
rate needs, and the calibration records the larger rate it does guarantee.

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

import copy
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from ..errors import OptionError, option
from .false_alarm import DEFAULT_CONFIDENCE, check_rate, false_alarm_bound, images_needed, threshold_rank
from .finite import NonFiniteError, require_finite

__all__ = ["DEFAULT_CONFIDENCE", "Calibration", "CalibrationWarning", "NonFiniteError", "as_calibration",
           "calibrate", "calibration_dict", "decision", "display_range", "fit_calibration", "fit_f1", "fit_normal",
           "fit_validation", "mid_scale_range"]

REQUIRED_NUMBERS = ("image_threshold", "pixel_threshold", "score_min")  # read by every decision and map
NORMAL_BOUND_NUMBERS = ("false_alarm_rate", "confidence", "rank", "false_alarm_bound", "n_images")
SHIFTED_PRECISIONS = ("int8", "bf16")  # reduced-precision exports whose thresholds may be shifted


class CalibrationWarning(UserWarning):
    """The held-out normal images are too few to guarantee the requested false-alarm rate."""


def _pct(x: float) -> str:
    return f"{100 * x:.3g} %"


def _not_a_number(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, numbers.Real)


def _check(cal: Mapping[str, Any]) -> None:
    """Refuse a calibration no decision can be trusted on: a number the decisions read missing or
    not a number, or any NaN or infinite number in it, naming its key."""
    needed = REQUIRED_NUMBERS + (NORMAL_BOUND_NUMBERS if cal.get("method") == "normal_bound" else ())
    for key in needed:
        if _not_a_number(cal.get(key)):
            raise ValueError(f"calibration.{key} is {cal.get(key)!r}, not a number: fit the calibration again")
    if "pixel_median" in cal and _not_a_number(cal["pixel_median"]):
        raise ValueError(f"calibration.pixel_median is {cal['pixel_median']!r}, not a number: fit the calibration "
                         "again")
    scores = cal.get("normal_scores", [])
    if not isinstance(scores, (list, tuple)) or any(_not_a_number(v) for v in scores):
        raise ValueError("calibration.normal_scores is not a list of numbers: fit the calibration again")

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{where}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")
        elif isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
            raise NonFiniteError(f"{where} is {obj}")

    walk(cal, "calibration")


def _require_finite_score(score: float) -> None:
    if not math.isfinite(score):
        raise NonFiniteError(f"the image score is {score}: the model produced a non-finite value, so no decision "
                             "can be made (a broken model or checkpoint)")


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The decision thresholds of one model and where they come from.

    Every instance is checked as ``from_dict`` checks a file (``ValueError`` naming the key,
    ``NonFiniteError`` for a NaN or infinite number), so no decision rests on a broken one. Fields
    that a calibration does not state are None and left out of ``to_dict``.
    """

    method: str | None = None  # 'normal_bound' (good images only) or 'validation_f1' (a set with defects)
    image_threshold: float  # NOK when the image score is above it
    pixel_threshold: float  # a pixel is defective when its map value is above it
    pixel_median: float = 0.0  # median normal map value: the bottom of the heatmap colours
    score_min: float  # lowest normal score: 0 of the normalised score
    false_alarm_rate: float | None = None  # normal_bound: the requested rate ...
    confidence: float | None = None  # ... the confidence it is kept with ...
    rank: int | None = None  # ... the threshold's rank among the normal scores (1 = the highest) ...
    false_alarm_bound: float | None = None  # ... the rate it keeps to at that confidence ...
    images_needed: int | None = None  # ... and the normal images the requested rate needs
    pixel_fpr: float | None = None  # normal_bound: the pixel threshold's quantile is 1 - pixel_fpr
    image_f1: float | None = None  # validation_f1: the image F1 at the threshold
    n_images: int | None = None  # images the thresholds were fitted on
    warning: str | None = None  # normal_bound: why the requested rate is not guaranteed
    n_defective: int | None = None  # validation_f1: defective images among n_images
    source: str | None = None  # which images, in words
    fitted_set: Mapping[str, int] | None = None  # good, false_alarms, defective, misses on those images
    normal_scores: tuple[float, ...] | None = None  # sorted normal scores: the drift monitor's reference
    int8_shift: Mapping[str, float] | None = None  # fp32 thresholds moved for an int8 export (``shifted``)
    bf16_shift: Mapping[str, float] | None = None  # ... and for a bf16 one
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys of other nferd versions, written back

    def __post_init__(self) -> None:
        if self.normal_scores is not None and not isinstance(self.normal_scores, tuple):
            object.__setattr__(self, "normal_scores", tuple(self.normal_scores))
        _check(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """The calibration stored as ``d`` (a checkpoint's or an export's JSON object), checked as a
        whole: ``ValueError`` naming the key for a missing or non-numeric number the decisions read,
        ``NonFiniteError`` for any NaN or infinite number."""
        if not isinstance(d, Mapping):
            raise ValueError(f"calibration is a {type(d).__name__}, not a JSON object")
        _check(d)
        d = copy.deepcopy(dict(d))  # nothing the caller changes later reaches the record
        return cls(**{k: v for k, v in d.items() if k in _FIELDS},
                   extra={k: v for k, v in d.items() if k not in _FIELDS})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in checkpoints and exports (None fields left out, ``extra`` kept)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None:
                out[f.name] = list(value) if f.name == "normal_scores" else value
        return copy.deepcopy({**out, **self.extra})

    def decide(self, score: float) -> str:
        """'NOK' when ``score`` is above the image threshold, 'OK' otherwise.

        Fails closed: a NaN or infinite score, or a threshold that is not a finite number, raises
        ``NonFiniteError`` (``score > nan`` is False, which would read OK).
        """
        _require_finite_score(score)
        thr = self.image_threshold
        if _not_a_number(thr) or not math.isfinite(thr):
            raise NonFiniteError(f"the calibration's image threshold is {thr!r}: no decision can be made; "
                                 "fit the calibration again")
        return "NOK" if score > thr else "OK"

    def normalize(self, score: np.ndarray | float) -> np.ndarray:
        """Raw scores mapped so that the threshold becomes 0.5 (clipped to [0, 1])."""
        thr, lo = self.image_threshold, self.score_min
        span = max(thr - lo, 1e-12)
        return np.clip(0.5 + 0.5 * (np.asarray(score, dtype=np.float64) - thr) / span, 0.0, 1.0)

    def counts(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, int]:
        """False alarms among good images and misses among defective ones at the image threshold."""
        nok = np.asarray(scores) > self.image_threshold
        labels = np.asarray(labels)
        return {"good": int((labels == 0).sum()), "false_alarms": int((nok & (labels == 0)).sum()),
                "defective": int((labels == 1).sum()), "misses": int((~nok & (labels == 1)).sum())}

    def guarantee(self) -> str:
        """One line on what a ``normal_bound`` threshold guarantees, for people reading a log."""
        k, n, bound = self.rank, self.n_images, self.false_alarm_bound
        if k is None or n is None or bound is None or self.confidence is None or self.false_alarm_rate is None:
            raise ValueError(f"a {self.method} calibration states no false-alarm guarantee")
        suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
        nth = "highest" if k == 1 else f"{k}{suffix} highest"
        return (f"false-alarm rate on new good parts at most {_pct(bound)} with {_pct(self.confidence)} confidence "
                f"({_pct(self.false_alarm_rate)} requested; threshold: the {nth} of {n} normal scores)")

    def describe(self) -> str:
        """The calibration in one sentence for an operator or a report: where the thresholds come from
        and what they promise."""
        source = self.source if self.source is not None else "held-out good images"
        thresholds = f"image threshold {self.image_threshold:.4g}, pixel threshold {self.pixel_threshold:.4g}"
        if self.method == "normal_bound":
            return f"{thresholds}; fitted on {self.n_images} good images ({source}): {self.guarantee()}"
        if self.method == "validation_f1":
            return (f"{thresholds}; the F1-optimal threshold on {self.n_images} validation images, "
                    f"{self.n_defective or 0} of them defective ({source})")
        return f"{thresholds} ({source})"

    def shifted(self, precision: str, image_score: float, pixel: float, n_images: int) -> Calibration:
        """These thresholds (and the normal scores) moved by a reduced-precision model's median change
        of image score and of pixel value on ``n_images`` images, recorded as ``{precision}_shift``:
        for a calibration that cannot be fitted again on that model (see ``deploy.quantize``)."""
        if precision not in SHIFTED_PRECISIONS:
            raise ValueError(f"thresholds are shifted for {' or '.join(SHIFTED_PRECISIONS)}, not {precision!r}")
        scores = self.normal_scores
        return replace(self, image_threshold=float(self.image_threshold) + image_score,
                       score_min=float(self.score_min) + image_score,
                       normal_scores=None if scores is None else tuple(float(v) + image_score for v in scores),
                       pixel_threshold=float(self.pixel_threshold) + pixel,
                       pixel_median=float(self.pixel_median) + pixel,
                       **{f"{precision}_shift": {"image_score": image_score, "pixel": pixel, "n_images": n_images}})


_FIELDS = frozenset(f.name for f in fields(Calibration)) - {"extra"}


def as_calibration(cal: Calibration | Mapping[str, Any] | None) -> Calibration | None:
    """``cal`` as a ``Calibration``: a JSON object (from a user's file or a checkpoint) is checked
    with ``Calibration.from_dict``; None (no calibration: scores without decisions) stays None."""
    if cal is None or isinstance(cal, Calibration):
        return cal
    return Calibration.from_dict(cal)


def calibration_dict(cal: Calibration | None) -> dict[str, Any] | None:
    """What a file stores for ``cal``: its JSON object, or None (no calibration)."""
    return None if cal is None else cal.to_dict()


def decision(score: float, cal: Calibration | None) -> str | None:
    """'NOK' / 'OK' at the calibrated image threshold (``Calibration.decide``), None without
    calibration; a NaN or infinite score raises ``NonFiniteError`` either way."""
    _require_finite_score(score)
    return None if cal is None else cal.decide(score)


def mid_scale_range(low: float, threshold: float) -> tuple[float, float]:
    """Heatmap colour range from ``low`` with ``threshold`` mid-scale, so red means 'over threshold'."""
    return low, low + 2 * max(threshold - low, 1e-6)


def display_range(cal: Calibration | None, amap: np.ndarray) -> tuple[float, float]:
    """Heatmap colour range: the pixel threshold mid-scale, or without calibration the map's own range."""
    if cal is None:
        return float(amap.min()), float(max(amap.max(), amap.min() + 1e-6))
    return mid_scale_range(cal.pixel_median, cal.pixel_threshold)


def fit_normal(scores: np.ndarray, maps: np.ndarray, false_alarm_rate: float = 0.01, pixel_fpr: float = 0.001,
               confidence: float = DEFAULT_CONFIDENCE) -> Calibration:
    """Image threshold with a false-alarm guarantee and pixel threshold by quantile, from good images only.

    See the module docstring for the bound. The result records the requested rate, the confidence,
    n, the chosen rank (1 = the highest score), the rate guaranteed at that confidence
    (``false_alarm_bound``) and the normal images the requested rate needs (``images_needed``); with
    too few images it also holds the ``warning`` that was issued.
    """
    check_rate(false_alarm_rate, confidence)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size < 2:
        raise OptionError(f"calibration needs at least 2 held-out normal images; raise {option('holdout')} or add "
                          "a validation folder")
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
    values = np.asarray(maps, dtype=np.float32).ravel()
    pix = float(np.quantile(values, 1 - pixel_fpr))
    return Calibration(method="normal_bound", image_threshold=float(np.sort(scores)[n - rank]),
                       pixel_threshold=max(pix, 0.0), pixel_median=float(np.median(values)),
                       score_min=float(scores.min()), false_alarm_rate=false_alarm_rate, confidence=confidence,
                       rank=rank, false_alarm_bound=false_alarm_bound(n, rank, confidence), images_needed=needed,
                       pixel_fpr=pixel_fpr, n_images=n, warning=warning)


def fit_f1(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray | None,
           pixel_fpr: float = 0.001) -> Calibration:
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
    return Calibration(method="validation_f1", image_threshold=float(thr), pixel_threshold=float(pix),
                       pixel_median=pixel_median, score_min=min(lo, float(thr) - 1e-6), image_f1=float(f1),
                       n_images=int(scores.size), n_defective=int((labels == 1).sum()))


def fit_validation(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray | None = None,
                   false_alarm_rate: float = 0.01, confidence: float = DEFAULT_CONFIDENCE) -> Calibration:
    """Guaranteed-rate thresholds for a set of good images; F1-optimal ones when it holds defects."""
    labels = np.asarray(labels)
    if (labels == 1).any():
        if not (labels == 0).any():
            raise ValueError("a validation set with defects also needs good images to place the threshold")
        return fit_f1(scores, labels, maps, masks)
    return fit_normal(scores, maps, false_alarm_rate, confidence=confidence)


def calibrate(model: Any, dataset: Any, false_alarm_rate: float = 0.01, device: Any = "auto",
              precision: str = "auto", batch_size: int = 16, confidence: float = DEFAULT_CONFIDENCE,
              tiling: Any = None) -> Calibration:
    """Run ``model`` over ``dataset`` (never the test split; full-resolution images scored tile
    by tile with ``tiling``) and fit the thresholds on it."""
    from .evaluate import infer
    res = infer(model, dataset, batch_size=batch_size, device=device, precision=precision, tiling=tiling)
    return fit_calibration(res, dataset, false_alarm_rate, confidence)


def fit_calibration(res: dict[str, Any], dataset: Any, false_alarm_rate: float = 0.01,
                    confidence: float = DEFAULT_CONFIDENCE) -> Calibration:
    """The thresholds for inference results ``res`` (scores, maps, labels, masks, paths) of the
    calibration ``dataset``, with its source, the decisions on it and the normal scores."""
    require_finite(res["scores"], res["maps"], res["paths"], what="calibration images")
    has_masks = getattr(dataset, "has_masks", True)
    cal = fit_validation(res["scores"], res["labels"], res["maps"], res["masks"] if has_masks else None,
                         false_alarm_rate, confidence)
    normal = np.sort(np.asarray(res["scores"])[np.asarray(res["labels"]) == 0])
    # the reference a deployed model's drift alarm compares recent OK parts with
    return replace(cal, source=getattr(dataset, "calibration_source", "holdout"),
                   fitted_set=cal.counts(res["scores"], res["labels"]), normal_scores=tuple(float(v) for v in normal))
