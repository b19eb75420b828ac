"""Non-finite values (NaN, infinity) in what a model produces: the error that stops a decision, and the check.

A module of its own so that evaluation and calibration (which runs evaluation's inference) share it
without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import NferdError


class NonFiniteError(NferdError, ValueError):
    """A score, an anomaly map or a calibration value is NaN or infinite: no decision may rest on it."""


def require_finite(scores: np.ndarray, maps: np.ndarray | None = None, paths: Sequence[str] | None = None,
                   what: str = "images") -> None:
    """Raise ``NonFiniteError`` when a score or map value is NaN or infinite, naming the first such image."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(scores)
    if maps is not None:
        m = np.asarray(maps)
        if m.ndim > 1 and len(m) == bad.size:
            bad |= ~np.isfinite(m.reshape(len(m), -1)).all(axis=1)
        elif not np.isfinite(m).all():
            raise NonFiniteError(f"the anomaly maps of these {what} hold non-finite values: the model produces NaN "
                                 "or infinite values (diverged training or damaged weights)")
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        first = f" (first: {paths[i]})" if paths is not None else ""
        raise NonFiniteError(f"{int(bad.sum())} of {bad.size} {what} got a non-finite score or map{first}: the "
                             "model produces NaN or infinite values (diverged training or damaged weights); "
                             "train it again or restore a copy of the checkpoint")
