"""Strict JSON: every answer is JSON that strict parsers accept (no NaN, no Infinity)."""

import functools
import json
from typing import Any

from ...engine.jsonio import NonFiniteJSONError, finite_or_none


def strict_json(content: Any) -> bytes:
    """JSON without NaN or Infinity (which strict parsers reject): raises ValueError instead."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


@functools.cache
def strict_json_response() -> type:
    """The app's response class, ``StrictJSONResponse`` (built on first use: fastapi is optional)."""
    from fastapi.responses import JSONResponse

    class StrictJSONResponse(JSONResponse):
        """JSON that strict parsers accept: content holding NaN or Infinity becomes a 500 error instead."""

        def __init__(self, content: Any, status_code: int = 200, **kw: Any) -> None:
            try:
                finite_or_none(content, nulls=False)
            except NonFiniteJSONError as e:
                content, status_code = {"detail": f"the answer would hold NaN or Infinity at {e.where}, which no "
                                                  "decision may rest on and strict JSON cannot hold"}, 500
            super().__init__(content, status_code, **kw)

        def render(self, content: Any) -> bytes:
            return strict_json(content)

    return StrictJSONResponse
