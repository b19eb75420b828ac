"""Line monitoring for the inspection service: Prometheus metrics, a drift alarm, the last decisions.

A line rarely breaks all at once: a lamp ages, a camera is knocked, a supplier changes a
material, and the scores of good parts creep up until false alarms (or, worse, misses) start.
:class:`DriftMonitor` watches for that before it costs decisions. It compares the scores of the
most recent parts judged OK with the scores the calibration images had (stored with the
calibration, ``normal_scores``) by a two-sided Mann-Whitney U test (rank sum; no assumption on the
score distribution) over a sliding window of the last ``window`` OK scores, and raises its alarm
while the test's p-value is below ``alpha``. Only scores under the threshold enter, on both sides,
so that the window (parts judged OK) and the reference are cut the same way. The alarm needs a
full window, so one odd part cannot raise it, and it clears once the window looks like the
calibration again.

:class:`LineMonitor` holds the counters and histograms ``GET /metrics`` exposes in the
Prometheus text format (its own registry, so several services in one process do not mix), the
drift monitor, and the last decisions with their thumbnails for the operator page.
"""

from __future__ import annotations

import base64
import io
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..engine.calibration import Calibration, as_calibration

DRIFT_WINDOW = 50
DRIFT_ALPHA = 0.001
RECENT = 12  # decisions kept for the operator page
THUMB_SIDE = 96
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# normalised scores: the calibrated threshold is 0.5 (engine.calibration.Calibration.normalize)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)


class DriftMonitor:
    """Sliding-window Mann-Whitney U test of recent OK scores against the calibration's normal scores.

    ``reference``: the calibration images' scores (None or fewer than 5: the monitor is
    unavailable and says why). ``threshold``: the image threshold; scores above it are left out
    of the reference, as NOK parts are left out of the window.
    """

    def __init__(self, reference: Sequence[float] | None, threshold: float | None, window: int = DRIFT_WINDOW,
                 alpha: float = DRIFT_ALPHA) -> None:
        if window < 5 or not 0 < alpha < 1:
            raise ValueError(f"the drift window must be >= 5 and alpha in (0, 1); got {window}, {alpha}")
        self.window, self.alpha = window, alpha
        self.reason: str | None = None
        ref = np.asarray(reference if reference is not None else [], dtype=np.float64)
        if threshold is not None:
            ref = ref[ref <= threshold]
        if reference is None:
            self.reason = ("the calibration holds no normal scores (fitted by nferd 0.2 or earlier): run `nferd "
                           "calibrate` again to monitor drift")
        elif ref.size < 5:
            self.reason = f"the calibration holds {ref.size} normal scores under the threshold; drift needs at least 5"
        self.reference = ref
        self.recent: deque[float] = deque(maxlen=window)
        self.p_value: float | None = None
        self.alarm = False
        self.alarms_raised = 0
        self.since: float | None = None

    def add(self, score: float) -> None:
        """One part judged OK; the test runs once the window is full."""
        if self.reason is not None:
            return
        self.recent.append(float(score))
        if len(self.recent) < self.window:
            return
        from scipy.stats import mannwhitneyu
        self.p_value = float(mannwhitneyu(np.fromiter(self.recent, float), self.reference,
                                          alternative="two-sided").pvalue)
        alarm = self.p_value < self.alpha
        if alarm and not self.alarm:
            self.alarms_raised += 1
            self.since = time.time()
        self.alarm = alarm
        if not alarm:
            self.since = None

    def status(self) -> dict[str, Any]:
        """What /health and the operator page show."""
        state = ("unavailable" if self.reason else "alarm" if self.alarm else
                 "warming up" if len(self.recent) < self.window else "ok")
        recent = np.fromiter(self.recent, float) if self.recent else None
        return {"status": state, "reason": self.reason, "test": "two-sided Mann-Whitney U, recent OK scores vs "
                "the calibration images' scores", "window": self.window, "alpha": self.alpha,
                "in_window": len(self.recent), "n_reference": int(self.reference.size), "p_value": self.p_value,
                "median_recent": None if recent is None else float(np.median(recent)),
                "median_reference": float(np.median(self.reference)) if self.reference.size else None,
                "alarm_since": self.since, "alarms_raised": self.alarms_raised}


def thumbnail_png(tensor: torch.Tensor, side: int = THUMB_SIDE) -> str:
    """A small base64 PNG of the model's input (3 x S x S in [0, 1]) for the operator page."""
    arr = (tensor.detach().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr)
    im.thumbnail((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class LineMonitor:
    """Counters, histograms and drift for one service; ``render()`` is the /metrics body."""

    def __init__(self, calibration: Calibration | Mapping[str, Any] | None, window: int = DRIFT_WINDOW,
                 alpha: float = DRIFT_ALPHA, recent: int = RECENT) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        cal = as_calibration(calibration)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nferd_requests", "Scoring requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.decisions = Counter("nferd_decisions", "Images by outcome: OK, NOK, ERROR (no decision) or NONE "
                                 "(no calibration)", ["decision"], registry=r)
        self.latency = Histogram("nferd_request_latency_seconds", "Time from a scoring request's arrival to its "
                                 "answer", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.scores = Histogram("nferd_image_score_normalized", "Normalised image scores (0.5 is the calibrated "
                                "threshold)", buckets=SCORE_BUCKETS, registry=r)
        self.raw_scores = Histogram("nferd_image_score", "Raw image scores", registry=r,
                                    buckets=_raw_buckets(cal))
        self.drift_alarm = Gauge("nferd_drift_alarm", "1 while the recent OK scores differ from the "
                                 "calibration's (see nferd_drift_p_value)", registry=r)
        self.drift_p = Gauge("nferd_drift_p_value", "p-value of the latest drift test (NaN before the window "
                             "is full or without reference scores)", registry=r)
        self.drift_p.set(float("nan"))
        reference, threshold = (None, None) if cal is None else (cal.normal_scores, cal.image_threshold)
        self.drift = DriftMonitor(reference, threshold, window, alpha)
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)

    def record(self, result: dict[str, Any], thumbnail: str | None = None) -> None:
        """One image's answer (a result or an error entry of the service)."""
        if "error" in result:
            self.decisions.labels("ERROR").inc()
        else:
            decision = result.get("decision") or "NONE"
            self.decisions.labels(decision).inc()
            self.raw_scores.observe(result["score"])
            if result.get("normalized_score") is not None:
                self.scores.observe(result["normalized_score"])
            if decision == "OK":
                self.drift.add(result["score"])
                self.drift_alarm.set(1.0 if self.drift.alarm else 0.0)
                if self.drift.p_value is not None:
                    self.drift_p.set(self.drift.p_value)
        self.recent.appendleft({"filename": result.get("filename"), "time": time.time(),
                                "decision": result.get("decision") if "error" not in result else "ERROR",
                                "score": result.get("score"), "normalized_score": result.get("normalized_score"),
                                "error": result.get("error"), "thumbnail_png_base64": thumbnail})

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


def _raw_buckets(calibration: Calibration | None) -> tuple[float, ...]:
    """Raw-score buckets around the calibrated threshold (its scale depends on the model)."""
    thr = None if calibration is None else calibration.image_threshold
    if thr is None or thr <= 0:
        return (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0)
    return tuple(round(thr * f, 6) for f in (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0))
