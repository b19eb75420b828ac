"""The FastAPI app: its routes, middleware and response class around a ``Service``, and ``run``,
which serves a checkpoint with uvicorn (``nferd serve``)."""

import time
from pathlib import Path
from typing import Annotated, Any

from ...version import __version__
from ..monitor import DRIFT_ALPHA, DRIFT_WINDOW, LineMonitor
from .admission import self_check
from .body import BodyLimit, upload_route
from .errors import require_serve_dependencies
from .limits import Limits
from .protocol import ServedPredictor
from .service import Service


class RequestMetrics:
    """ASGI middleware: count and time the scoring requests by endpoint and status for /metrics.
    (Plain ASGI, like ``BodyLimit``: Starlette's BaseHTTPMiddleware would hide a client's
    disconnect from the endpoint, which drops the work of clients that have gone.)"""

    SCORED = ("/predict", "/predict/batch")

    def __init__(self, app: Any, monitor: LineMonitor) -> None:
        self.app, self.monitor = app, monitor

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.SCORED:
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def timed_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.monitor.request(scope["path"], status[0], time.perf_counter() - t0)


def create_app(predictor: ServedPredictor, metadata: dict[str, Any] | None = None, *,
               max_upload_bytes: int = 20 * 1024 * 1024, max_queue: int = 16, max_batch_files: int = 16,
               max_pixels: int = 25_000_000, overlay_max_side: int = 1024,
               max_image_memory_bytes: int = 1024 * 1024 * 1024, warmup: bool = True,
               drift_window: int = DRIFT_WINDOW, drift_alpha: float = DRIFT_ALPHA) -> Any:
    """FastAPI app serving ``predictor`` (anything with ``maps``, ``decide``, ``calibration``, ``size``).

    ``metadata``: the checkpoint's metadata (``checkpoint.read_metadata``) shown by /metadata.
    ``max_queue``: requests allowed to wait while one is processed; beyond that, 503.
    ``max_image_memory_bytes``: memory for decoding images and holding their display copies and
    response PNGs, across all requests in flight (see ``decode_cost``); beyond it requests wait.
    ``warmup``: run the start-up self-check (one synthetic image; a non-finite result stops the start).
    ``drift_window``, ``drift_alpha``: the drift alarm's window of recent OK scores and test level.
    """
    require_serve_dependencies()
    from fastapi import FastAPI, File, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, Response

    limits = Limits(max_upload_bytes, max_queue, max_batch_files, max_pixels, overlay_max_side,
                    max_image_memory_bytes)
    limits.check()
    service = Service(predictor, limits, metadata, warmup, drift_window, drift_alpha)
    app = FastAPI(title="nferd inspection service", version=__version__, lifespan=service.lifespan, docs_url=None,
                  redoc_url=None, default_response_class=service.json_response,
                  description="Anomaly score, OK/NOK decision and heat map for uploaded images.")
    app.router.route_class = upload_route(limits)  # before the routes are declared
    app.add_middleware(BodyLimit, limits=limits)
    app.add_middleware(RequestMetrics, monitor=service.monitor)
    app.state.queue, app.state.limits, app.state.budget, app.state.monitor = (service.queue, limits, service.budget,
                                                                              service.monitor)
    app.add_exception_handler(Exception, service.internal_error)
    app.get("/", response_class=HTMLResponse, response_model=None, include_in_schema=False)(service.page)
    app.get("/health", response_model=None)(service.health)
    app.get("/metadata", response_model=None)(service.get_metadata)
    app.get("/metrics", response_model=None, include_in_schema=False)(service.metrics)
    app.get("/recent", response_model=None)(service.recent)

    @app.post("/predict", response_model=None)
    async def predict(request: Request,
                      file: Annotated[UploadFile, File(description="the image (PNG/JPEG/BMP/TIFF/WebP)")],
                      overlay: Annotated[bool, Query(description="add the heat-map overlay as base64 PNG")] = False,
                      mask: Annotated[bool, Query(description="add the binary defect mask as base64 PNG")] = False,
                      ) -> dict[str, Any] | Response:
        """Score one image: anomaly score, OK/NOK, defect area, timings; optionally overlay and mask.

        A NaN or infinite map or score answers 500, not 422: the image was valid, the model failed,
        and a client must not take it for a problem with its image (nor any answer for OK).
        """
        return await service.predict(request, file, overlay, mask)

    @app.post("/predict/batch", response_model=None)
    async def predict_batch(request: Request, files: Annotated[list[UploadFile], File(description="several images")],
                            overlay: bool = False, mask: bool = False) -> dict[str, Any] | Response:
        """Score several images in one forward pass; a broken file or a non-finite result gets its own
        error entry (with the status /predict would answer), never a decision."""
        return await service.predict_batch(request, files, overlay, mask)

    return app


def run(checkpoint: str | Path | None, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
        precision: str = "auto", log_level: str = "info", predictor: ServedPredictor | None = None,
        tiling: Any = None, **limits: Any) -> None:
    """Load ``checkpoint`` (or take ``predictor``, e.g. an exported file's) and serve it until
    interrupted (``nferd serve``); ``tiling`` replaces the checkpoint's recorded tiling.

    Raises ModelOutputError, before listening, when the model is not finite on a synthetic image.
    """
    require_serve_dependencies()
    import uvicorn

    from ...engine.checkpoint import read_metadata
    from ..predict import Predictor
    if predictor is None:
        meta = read_metadata(checkpoint)
        predictor = Predictor.from_checkpoint(checkpoint, device=device, precision=precision, tiling=tiling)
    else:
        meta = getattr(predictor, "metadata", None)
    self_check(predictor)
    app = create_app(predictor, meta, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
