"""The image threshold from normal images bounds the false-alarm rate with the stated confidence.

Each check draws many held-out sets from a known continuous distribution, fits the threshold, and
computes the exact false-alarm rate of that threshold from the distribution's survival function.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import norm

from nferd.engine.calibration import Calibration, CalibrationWarning, NonFiniteError, fit_normal
from nferd.engine.false_alarm import exceed_probability, false_alarm_bound, images_needed, threshold_rank

DRAWS = 2000
CONFIDENCE = 0.9
# Monte-Carlo margin: 3 standard deviations of a fraction estimated from DRAWS draws at p = 0.1
MARGIN = 3 * np.sqrt(0.1 * 0.9 / DRAWS)
MAPS = np.zeros((1, 2, 2), dtype=np.float32)


def true_rates(n: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Calibration]:
    """Exact false-alarm rates (standard normal scores) of the fitted threshold and of the plain
    (1 - rate) quantile over DRAWS held-out sets of n, the rates each fit guarantees, and the last fit."""
    rng = np.random.default_rng(seed)
    fitted, quantile, bound = np.empty(DRAWS), np.empty(DRAWS), np.empty(DRAWS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        for i in range(DRAWS):
            scores = rng.standard_normal(n)
            cal = fit_normal(scores, MAPS, false_alarm_rate=rate, confidence=CONFIDENCE)
            fitted[i] = norm.sf(cal.image_threshold)
            quantile[i] = norm.sf(np.quantile(scores, 1 - rate))
            bound[i] = cal.false_alarm_bound
    return fitted, quantile, bound, cal


@pytest.mark.parametrize(("n", "rate"), [(100, 0.05), (400, 0.05), (250, 0.02)])
def test_false_alarm_rate_exceeds_the_target_at_most_one_time_in_ten(n: int, rate: float) -> None:
    fitted, quantile, _, cal = true_rates(n, rate, seed=n)
    share = float((fitted > rate).mean())
    assert share <= (1 - CONFIDENCE) + MARGIN
    # the simulation agrees with the formula P(Binomial(n, rate) <= k - 1) for the chosen rank k ...
    k = cal.rank
    expected = exceed_probability(n, k, rate)
    assert expected <= 1 - CONFIDENCE
    assert abs(share - expected) <= 4 * np.sqrt(expected * (1 - expected) / DRAWS) + 1e-3
    # ... k is the least conservative rank that keeps the promise: one rank lower breaks it
    assert exceed_probability(n, k + 1, rate) > 1 - CONFIDENCE
    # the plain quantile, which this replaces, exceeds the target far more often than 1 in 10
    assert float((quantile > rate).mean()) > (1 - CONFIDENCE) + 3 * MARGIN


def test_too_few_images_fall_back_to_the_maximum_and_guarantee_the_stated_bound() -> None:
    n, rate = 30, 0.01  # 1 % needs 230 images at 90 % confidence
    fitted, _, bound, cal = true_rates(n, rate, seed=7)
    assert cal.rank == 1 and cal.images_needed == 230 and "230" in cal.warning
    assert np.all(bound == bound[0]) and bound[0] == pytest.approx(1 - 0.1 ** (1 / n))  # Beta(1, n) quantile
    assert bound[0] > rate
    assert float((fitted > bound[0]).mean()) <= (1 - CONFIDENCE) + MARGIN
    assert float((fitted > rate).mean()) > 0.5  # the requested rate is indeed out of reach


def test_images_needed_matches_a_hand_computation() -> None:
    # the maximum of n normal scores bounds the rate by alpha at 90 % iff (1 - alpha)^n <= 0.1
    assert 0.99 ** 229 > 0.1 >= 0.99 ** 230
    assert images_needed(0.01, 0.9) == 230
    assert 0.95 ** 44 > 0.1 >= 0.95 ** 45
    assert images_needed(0.05, 0.9) == 45
    assert 0.995 ** 459 > 0.1 >= 0.995 ** 460
    assert images_needed(0.005, 0.9) == 460
    assert 0.999 ** 2301 > 0.1 >= 0.999 ** 2302
    assert images_needed(0.001, 0.9) == 2302
    assert 0.99 ** 298 > 0.05 >= 0.99 ** 299
    assert images_needed(0.01, 0.95) == 299
    # and the fit agrees at the boundary: 229 images warn and fall back, 230 do not
    scores = np.random.default_rng(0).random(230)
    with pytest.warns(CalibrationWarning, match="needs at least 230"):
        cal = fit_normal(scores[:229], MAPS)
    assert cal.rank == 1 and cal.false_alarm_bound > 0.01 and cal.image_threshold == scores[:229].max()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        cal = fit_normal(scores, MAPS)
    assert cal.rank == 1 and cal.false_alarm_bound <= 0.01 and cal.warning is None
    assert threshold_rank(229, 0.01, 0.9) is None and threshold_rank(230, 0.01, 0.9) == 1


def test_the_calibration_records_rate_confidence_n_rank_and_bound() -> None:
    scores = np.random.default_rng(1).random(500)
    cal = fit_normal(scores, MAPS, false_alarm_rate=0.02, confidence=0.95)
    assert cal.method == "normal_bound"
    assert (cal.false_alarm_rate, cal.confidence, cal.n_images) == (0.02, 0.95, 500)
    k = cal.rank
    assert cal.image_threshold == np.sort(scores)[::-1][k - 1]
    assert cal.false_alarm_bound == pytest.approx(false_alarm_bound(500, k, 0.95))
    assert cal.false_alarm_bound <= 0.02 < false_alarm_bound(500, k + 1, 0.95)


def test_non_finite_or_invalid_input_is_refused() -> None:
    with pytest.raises(NonFiniteError, match="1 of 3"):
        fit_normal(np.array([0.1, np.nan, 0.3]), MAPS)
    with pytest.raises(NonFiniteError):
        fit_normal(np.array([0.1, 0.2, 0.3]), np.full((3, 2, 2), np.inf))
    with pytest.raises(ValueError, match="confidence"):
        fit_normal(np.arange(10.0), MAPS, confidence=1.0)
    with pytest.raises(ValueError, match="false-alarm rate"):
        fit_normal(np.arange(10.0), MAPS, false_alarm_rate=0.0)
