"""Line monitoring: the drift alarm's statistics (raised on a shift within its window, rarely on
unshifted scores), and the service's /metrics (Prometheus text format), /health and /recent."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nferd.deploy.monitor import DRIFT_ALPHA, DRIFT_WINDOW, DriftMonitor
from nferd.engine.calibration import Calibration, decision

N_REFERENCE = 30  # a typical calibration: a few dozen held-out good images


def reference_and_threshold(rng: np.random.Generator) -> tuple[list[float], float]:
    """Scores of good parts are skewed (a maximum over a map): a gamma distribution stands in."""
    ref = rng.gamma(4.0, 0.25, N_REFERENCE)
    return sorted(ref.tolist()), float(ref.max() * 1.05)


def stream_until_alarm(monitor: DriftMonitor, scores: np.ndarray, threshold: float) -> int | None:
    """Feed the parts judged OK; the number fed when the alarm first rose, or None."""
    fed = 0
    for s in scores:
        if s > threshold:  # NOK parts do not enter the window
            continue
        monitor.add(float(s))
        fed += 1
        if monitor.alarm:
            return fed
    return None


SD = math.sqrt(4.0) * 0.25  # standard deviation of the good parts' scores


def test_unshifted_scores_rarely_raise_the_alarm() -> None:
    """60 calibrations, each followed by 300 good parts from the same distribution: the share of
    tests in alarm stays near the test level alpha (measured over 100 runs: 0.0013 of tests; 1 run
    had an alarm at all)."""
    rng = np.random.default_rng(0)
    in_alarm = tests = runs_with_alarm = 0
    for _ in range(60):
        ref, thr = reference_and_threshold(rng)
        m = DriftMonitor(ref, thr)
        any_alarm = False
        for s in rng.gamma(4.0, 0.25, 300):
            if s > thr:
                continue
            m.add(float(s))
            if m.p_value is not None:
                tests += 1
                in_alarm += m.alarm
                any_alarm |= m.alarm
        runs_with_alarm += any_alarm
    assert in_alarm / tests < 0.005, in_alarm / tests
    assert runs_with_alarm <= 3, runs_with_alarm


def test_a_lighting_shift_raises_the_alarm_within_one_window() -> None:
    """Scores of good parts shifted by 1.5 standard deviations (a lamp that ages, a camera that
    moved): the alarm rises before one window of OK parts has passed since the shift, in every run
    that had no false alarm before it (measured over 100 runs: at most 48 parts, median 32)."""
    rng = np.random.default_rng(1)
    false_starts = 0
    for _ in range(50):
        ref, thr = reference_and_threshold(rng)
        m = DriftMonitor(ref, thr)
        if stream_until_alarm(m, rng.gamma(4.0, 0.25, 2 * DRIFT_WINDOW), thr) is not None:
            false_starts += 1  # an unrepresentative calibration sample: counted above as false alarms
            continue
        after = stream_until_alarm(m, rng.gamma(4.0, 0.25, 20 * DRIFT_WINDOW) + 1.5 * SD, thr)
        assert after is not None and after <= DRIFT_WINDOW, after
        assert m.status()["status"] == "alarm" and m.status()["median_recent"] > m.status()["median_reference"]
    assert false_starts <= 2, false_starts


def test_the_alarm_clears_when_the_line_is_back_to_normal() -> None:
    rng = np.random.default_rng(2)
    ref, thr = reference_and_threshold(rng)
    m = DriftMonitor(ref, thr)
    assert stream_until_alarm(m, rng.gamma(4.0, 0.25, 2000) + 1.5 * SD, thr) is not None
    for s in rng.gamma(4.0, 0.25, 4 * DRIFT_WINDOW):
        if s <= thr:
            m.add(float(s))
    assert not m.alarm and m.status()["status"] == "ok" and m.alarms_raised >= 1


def test_without_reference_scores_drift_is_unavailable_and_says_why() -> None:
    m = DriftMonitor(None, 1.0)
    for _ in range(2 * DRIFT_WINDOW):
        m.add(5.0)
    st = m.status()
    assert st["status"] == "unavailable" and "nferd calibrate" in st["reason"] and not m.alarm
    assert DriftMonitor([0.1, 0.2], 1.0).status()["status"] == "unavailable"
    assert DriftMonitor([0.1] * 10, 1.0).status()["status"] == "warming up"
    with pytest.raises(ValueError):
        DriftMonitor([0.1] * 10, 1.0, window=2)


# ------------------------------------------------------------------------------------------ service
class ScriptedPredictor:
    """A stand-in model whose scores come from a script (a real model's scores cannot be shifted on
    demand); maps are flat, the calibration is a normal one with its reference scores."""

    def __init__(self, scores: list[float], calibration: Calibration) -> None:
        self.scores, self.calibration, self.size = list(scores), calibration, 32
        self.preprocess = False

    def maps(self, images):  # type: ignore[no-untyped-def]
        n = len(images)
        out = [self.scores.pop(0) for _ in range(n)]
        return np.zeros((n, 32, 32), np.float32), np.asarray(out, np.float32)

    def decide(self, score: float) -> dict[str, Any]:
        return {"score": score, "normalized_score": float(self.calibration.normalize(score)),
                "decision": decision(score, self.calibration)}


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("shifted", [False, True])
def test_the_service_raises_drift_on_shifted_scores_only(shifted: bool) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("prometheus_client")
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from nferd.deploy.serve import create_app
    rng = np.random.default_rng(3)
    ref, thr = reference_and_threshold(rng)
    cal = Calibration(image_threshold=thr, pixel_threshold=1.0, score_min=min(ref), normal_scores=tuple(ref))
    stream = rng.gamma(4.0, 0.25, 300) + (1.5 * SD if shifted else 0.0)
    app = create_app(ScriptedPredictor(stream.tolist(), cal), warmup=False)
    image = png()
    with TestClient(app) as client:
        fed_ok = 0
        raised_after = None
        for i in range(len(stream)):
            r = client.post("/predict", files={"file": (f"part{i}.png", image, "image/png")})
            assert r.status_code == 200
            fed_ok += r.json()["decision"] == "OK"
            drift = client.get("/health").json()["drift"]
            if drift["status"] == "alarm":
                raised_after = fed_ok
                break
        health = client.get("/health").json()
        metrics = client.get("/metrics")
        recent = client.get("/recent").json()
    if shifted:
        assert raised_after is not None and raised_after <= DRIFT_WINDOW + 1, raised_after
        assert health["status"] == "drift"
    else:
        assert raised_after is None and health["status"] == "ok" and health["drift"]["p_value"] >= DRIFT_ALPHA
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    assert metrics.headers["content-type"].startswith("text/plain")
    decided = {s.labels["decision"]: s.value for s in families["nferd_decisions"].samples
               if s.name == "nferd_decisions_total"}
    assert decided.get("OK", 0) + decided.get("NOK", 0) == i + 1
    assert [s.value for s in families["nferd_drift_alarm"].samples] == [1.0 if shifted else 0.0]
    counts = [s for s in families["nferd_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert counts[0].value == i + 1 and counts[0].labels["endpoint"] == "/predict"
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value for s in families["nferd_requests"].samples
                if s.name == "nferd_requests_total"}
    assert requests[("/predict", "200")] == i + 1
    assert len(recent["decisions"]) == 12 and recent["decisions"][0]["filename"] == f"part{i}.png"
    thumb = Image.open(io.BytesIO(__import__("base64").b64decode(recent["decisions"][0]["thumbnail_png_base64"])))
    assert max(thumb.size) <= 96


def test_errors_are_counted_and_never_enter_the_drift_window() -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from nferd.deploy.serve import create_app
    cal = Calibration(image_threshold=2.0, pixel_threshold=1.0, score_min=0.0, normal_scores=(0.5,) * 10)
    app = create_app(ScriptedPredictor([float("nan"), 0.5], cal), warmup=False)
    with TestClient(app) as client:
        assert client.post("/predict", files={"file": ("a.png", png(), "image/png")}).status_code == 500
        assert client.post("/predict", files={"file": ("b.txt", b"not an image", "text/plain")}).status_code == 415
        assert client.post("/predict", files={"file": ("c.png", png(), "image/png")}).json()["decision"] == "OK"
        text = client.get("/metrics").text
        recent = client.get("/recent").json()["decisions"]
    fam = {f.name: f for f in text_string_to_metric_families(text)}
    decided = {s.labels["decision"]: s.value for s in fam["nferd_decisions"].samples if s.name.endswith("_total")}
    assert decided == {"ERROR": 2.0, "OK": 1.0}
    statuses = {s.labels["status"]: s.value for s in fam["nferd_requests"].samples if s.name.endswith("_total")}
    assert statuses == {"500": 1.0, "415": 1.0, "200": 1.0}
    assert [d["decision"] for d in recent] == ["OK", "ERROR", "ERROR"]
