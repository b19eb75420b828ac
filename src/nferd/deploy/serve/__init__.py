"""The inspection service: an HTTP API and a one-page operator UI around a loaded predictor.

``create_app(predictor)`` builds a FastAPI app; ``run(checkpoint)`` loads a checkpoint and serves
it with uvicorn (``nferd serve``). Design choices, and why:

* The predictor is used only through ``maps``, ``decide``, ``calibration`` and ``size``
  (``protocol.ServedPredictor``), so any backend with that API (PyTorch ``Predictor``, an ONNX
  one) can be served.
* One model worker thread runs every forward pass: torch gains nothing from concurrent calls on a
  small CPU, and one worker keeps memory flat. At most ``1 + max_queue`` image requests are in
  the service at once (being decoded, waiting or running); the next one gets 503 with
  Retry-After at once instead of piling up until the machine collapses.
* Memory is bounded across requests, not only per upload: before an image is decoded, its header
  (size and mode, read without decoding) says how much memory decoding it takes, and that much
  is reserved from one budget shared by every request (``max_image_memory_bytes``). A request
  that does not fit waits, inside the queue above, until others release theirs. Overlays and
  masks are built at most ``overlay_max_side`` pixels on the long side, one image at a time in
  one post-processing thread, so they add a fixed amount, whatever the image size.
* Work for a client that has gone is dropped: the connection is checked before each expensive
  step, and a forward pass not yet started is cancelled.
* Fail closed: a NaN or infinite anomaly map or score is an error for that image (500), never a
  decision, and /health reports the model unhealthy until a forward pass is finite again. A
  model that is not finite on a synthetic image does not start. Every response is strict JSON.
* Uploads are bounded before and while they are parsed, not after: the request body (Content-Length
  header, then the bytes actually received, for chunked uploads too), the number of parts (the
  parser stops at the first one over the route's files plus a few small fields) and every file's
  size; each gives 413 with the limit. Every part beyond SPOOL_BYTES goes to a temporary file on
  disk as it arrives, so receiving a body holds at most parts x SPOOL_BYTES in memory, whatever
  its size; Pillow reads the uploads from those files.
* Only real images pass: Pillow opens them restricted to PNG/JPEG/BMP/TIFF/WebP (no plug-in that
  shells out), ``verify()`` then a full ``load()``, so non-images get 415 and corrupt or truncated
  ones 400, each with a JSON ``detail`` saying why. Pixel counts are capped before decoding.
* The line is watched, not only the images: ``GET /metrics`` (Prometheus text format) counts
  requests, OK / NOK / errors and latencies and histograms the scores, and a drift alarm
  (``monitor.DriftMonitor``) compares the scores of recent OK parts with the calibration images'
  scores; it shows in /health, /metrics and on the operator page with the last decisions.
* Nothing on the server's disk is reachable from a request: the page is a package resource, and
  there is no static-file route. The Swagger UI (/docs) is off because it loads from a CDN; the
  OpenAPI schema stays at /openapi.json.

The package, one idea a module:

* ``app``: ``create_app`` (routes, middleware), ``RequestMetrics``, ``run``.
* ``service``: ``Service``, what each route answers (scoring within the budget, /health, ...).
* ``admission``: ``InferenceQueue`` (admission counter, model and post-processing threads),
  ``MemoryBudget``, ``self_check``.
* ``body``: ``BodyLimit`` and the multipart route class (``upload_route``, ``TooManyParts``).
* ``uploads``: headers, decode costs, decoding, file names.
* ``results``: one image's JSON (``build_result``, ``defect_area``, ``png_base64``, ...).
* ``limits``, ``errors``, ``responses`` (strict JSON), ``protocol`` (``ServedPredictor``),
  ``page`` (the operator page, ``page.html``, and its headers).

The names below are re-exported from those modules; a constant rebound here changes nothing:
patch it in the module that reads it (``body.DRAIN_CAP``, ...).
"""

from .admission import DISCONNECT_POLL_S, InferenceQueue, MemoryBudget, self_check
from .app import RequestMetrics, create_app, run
from .body import DRAIN_CAP, DRAIN_SECONDS, FORM_FIELDS, SPOOL_BYTES, BodyLimit, TooManyParts, upload_route
from .errors import (
    CLIENT_GONE_STATUS,
    ClientGone,
    MissingServeDependencies,
    ModelOutputError,
    UploadRejected,
    require_serve_dependencies,
)
from .limits import MULTIPART_SLACK, Limits
from .page import PAGE_HEADERS, page_html
from .protocol import ServedPredictor, TiledPredictor
from .responses import strict_json, strict_json_response
from .results import (
    AREA_BAND_PIXELS,
    AREA_EXACT_PIXELS,
    build_result,
    check_finite,
    defect_area,
    png_base64,
    resized_rows,
)
from .service import Service, public_metadata
from .uploads import (
    ACCEPTED_FORMATS,
    DECODE_BYTES_PER_PIXEL,
    DECODE_BYTES_UNKNOWN_MODE,
    DISPLAY_WORK_BYTES_PER_PIXEL,
    Decoded,
    Header,
    decode_cost,
    decode_upload,
    overlay_hw,
    read_header,
    safe_filename,
    trim_memory,
)

__all__ = [
    "ACCEPTED_FORMATS", "AREA_BAND_PIXELS", "AREA_EXACT_PIXELS", "CLIENT_GONE_STATUS", "DECODE_BYTES_PER_PIXEL",
    "DECODE_BYTES_UNKNOWN_MODE", "DISCONNECT_POLL_S", "DISPLAY_WORK_BYTES_PER_PIXEL", "DRAIN_CAP", "DRAIN_SECONDS",
    "FORM_FIELDS", "MULTIPART_SLACK", "PAGE_HEADERS", "SPOOL_BYTES",
    "BodyLimit", "ClientGone", "Decoded", "Header", "InferenceQueue", "Limits", "MemoryBudget",
    "MissingServeDependencies", "ModelOutputError", "RequestMetrics", "ServedPredictor", "Service", "TiledPredictor",
    "TooManyParts", "UploadRejected",
    "build_result", "check_finite", "create_app", "decode_cost", "decode_upload", "defect_area",
    "overlay_hw", "page_html", "png_base64", "public_metadata", "read_header", "require_serve_dependencies",
    "resized_rows", "run", "safe_filename", "self_check", "strict_json", "strict_json_response", "trim_memory",
    "upload_route",
]
