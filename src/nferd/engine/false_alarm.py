"""The false-alarm guarantee of a threshold taken from held-out normal scores, as plain math.

With the k-th largest of n exchangeable normal scores as threshold, the false-alarm rate of a new
good part is Beta(k, n - k + 1) distributed, whatever the score distribution, so

    P(false-alarm rate > alpha) = P(Binomial(n, alpha) <= k - 1),

and the largest k with that probability at most ``1 - confidence`` keeps the rate under alpha with
that confidence (exact for continuous scores, conservative with ties). When n is too small even
for the maximum (k = 1 needs (1 - alpha)^n <= 1 - confidence), ``threshold_rank`` says so and
``images_needed`` gives the n the rate needs. Why 90 % by default and not 95 %: a higher confidence
moves the threshold up, trading false alarms for missed defects (the worse failure), and needs
about 30 % more held-out images for the same rate.

A module of its own because it needs no model, image or calibration record: ``calibration`` fits
thresholds with it, and the bound's tests check it against simulation.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta, binom

DEFAULT_CONFIDENCE = 0.9


def check_rate(false_alarm_rate: float, confidence: float) -> None:
    """Refuse a rate or confidence outside (0, 1), which no threshold can keep to."""
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
    check_rate(false_alarm_rate, confidence)
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
    check_rate(false_alarm_rate, confidence)
    n = max(1, math.ceil(math.log(1 - confidence) / math.log1p(-false_alarm_rate)))
    while exceed_probability(n, 1, false_alarm_rate) > 1 - confidence:  # rounding of the logarithms
        n += 1
    while n > 1 and exceed_probability(n - 1, 1, false_alarm_rate) <= 1 - confidence:
        n -= 1
    return n
