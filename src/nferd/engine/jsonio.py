"""Strict JSON for every file nferd writes: no ``NaN`` or ``Infinity``, which strict parsers reject.

Python's ``json`` writes non-finite floats as the bare words ``NaN`` and ``Infinity`` by default.
``dumps`` either turns them into ``null`` (``nulls=True``, for values where null is a legitimate
"absent": a metric that cannot be computed, a loss that diverged) or refuses them with the key
path named (``nulls=False``, for values that must never be missing, e.g. a checkpoint's
calibration). NumPy scalars are written as the numbers they hold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import NferdError

__all__ = ["NonFiniteJSONError", "dumps", "finite_or_none"]


class NonFiniteJSONError(NferdError, ValueError):
    """A value that must be written is NaN or infinite; ``where`` is its key path (``calibration.x``)."""

    def __init__(self, where: str, value: float) -> None:
        super().__init__(f"{where} is {value}, which JSON cannot hold")
        self.where = where


def finite_or_none(obj: Any, nulls: bool = True, _where: str = "") -> Any:
    """``obj`` with NumPy scalars as Python numbers and non-finite floats as None (``nulls``) or refused."""
    if isinstance(obj, np.generic) and not isinstance(obj, (np.str_, np.bytes_)):
        obj = obj.item()
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if nulls:
            return None
        raise NonFiniteJSONError(_where or "the value", obj)
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v, nulls, f"{_where}.{k}" if _where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v, nulls, f"{_where}[{i}]") for i, v in enumerate(obj)]
    return obj


def dumps(obj: Any, *, indent: int | None = None, default: Callable[[Any], Any] | None = None,
          nulls: bool = True, sort_keys: bool = False) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (see the module docstring for ``nulls``)."""
    return json.dumps(finite_or_none(obj, nulls), indent=indent, default=default, allow_nan=False,
                      sort_keys=sort_keys)
