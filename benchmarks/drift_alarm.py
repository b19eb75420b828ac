"""How often the service's drift alarm fires on unshifted scores, and how fast on shifted ones.

Simulates calibrations of 30 good images and lines of good parts whose scores follow the same
skewed distribution (a gamma, as a maximum over a map is skewed), then shifted by 0.5, 1 and 1.5
standard deviations, and feeds the parts judged OK to ``nferd.deploy.monitor.DriftMonitor`` with
its default window and level. Writes the rates and delays with their provenance:

    python benchmarks/drift_alarm.py --out benchmarks/screens/drift_alarm.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from nferd.deploy.monitor import DRIFT_ALPHA, DRIFT_WINDOW, DriftMonitor
from nferd.engine import safe_io
from nferd.engine.provenance import provenance

SHAPE, SCALE, N_REFERENCE = 4.0, 0.25, 30
SD = float(np.sqrt(SHAPE) * SCALE)


def calibration(rng: np.random.Generator) -> tuple[list[float], float]:
    ref = rng.gamma(SHAPE, SCALE, N_REFERENCE)
    return sorted(ref.tolist()), float(ref.max() * 1.05)  # threshold just above the highest good score


def false_alarms(runs: int, parts: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    tests = alarms = runs_with_alarm = 0
    for _ in range(runs):
        ref, thr = calibration(rng)
        m, any_alarm = DriftMonitor(ref, thr), False
        for s in rng.gamma(SHAPE, SCALE, parts):
            if s <= thr:
                m.add(float(s))
                if m.p_value is not None:
                    tests, alarms, any_alarm = tests + 1, alarms + m.alarm, any_alarm or m.alarm
        runs_with_alarm += any_alarm
    return {"runs": runs, "parts_per_run": parts, "tests": tests, "share_of_tests_in_alarm": alarms / tests,
            "share_of_runs_with_an_alarm": runs_with_alarm / runs}


def delays(shift_sd: float, runs: int, seed: int = 1, limit: int = 5000) -> dict[str, float]:
    """OK parts fed after the shift until the alarm rose (runs without it within ``limit``: never)."""
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(runs):
        ref, thr = calibration(rng)
        m = DriftMonitor(ref, thr)
        for s in rng.gamma(SHAPE, SCALE, DRIFT_WINDOW):
            if s <= thr:
                m.add(float(s))
        fed, when = 0, None
        for s in rng.gamma(SHAPE, SCALE, limit) + shift_sd * SD:
            if s <= thr:
                m.add(float(s))
                fed += 1
                if m.alarm:
                    when = fed
                    break
        found.append(when)
    caught = np.array([d for d in found if d is not None])
    return {"shift_sd": shift_sd, "runs": runs, "share_within_one_window": float(np.mean(
        [d is not None and d <= DRIFT_WINDOW for d in found])),
        "share_never": float(np.mean([d is None for d in found])),
        "median_parts": float(np.median(caught)) if caught.size else None,
        "max_parts_when_caught": int(caught.max()) if caught.size else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--runs", type=int, default=100)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"window": DRIFT_WINDOW, "alpha": DRIFT_ALPHA, "n_reference": N_REFERENCE,
              "scores": f"gamma(shape {SHAPE}, scale {SCALE}), sd {SD}",
              "unshifted": false_alarms(args.runs, 300),
              "shifted": [delays(s, args.runs) for s in (0.5, 1.0, 1.5)],
              "provenance": {**provenance(1, "cpu"), "command": shlex.join(["python", *sys.argv])}}
    safe_io.write_json(args.out, result)
    print(result["unshifted"], *result["shifted"], sep="\n")


if __name__ == "__main__":
    main()
