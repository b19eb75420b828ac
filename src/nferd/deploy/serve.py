"""The inspection service: an HTTP API and a one-page operator UI around a loaded predictor.

``create_app(predictor)`` builds a FastAPI app; ``run(checkpoint)`` loads a checkpoint and serves
it with uvicorn (``nferd serve``). Design choices, and why:

* The predictor is used only through ``maps``, ``decide``, ``calibration`` and ``size``, so any
  backend with that API (PyTorch ``Predictor``, an ONNX one) can be served.
* One model worker thread runs every forward pass: torch gains nothing from concurrent calls on a
  small CPU, and one worker keeps memory flat. At most ``1 + max_queue`` image requests are in
  the service at once (being decoded, waiting or running); the next one gets 503 with
  Retry-After at once instead of piling up until the machine collapses.
* Uploads are bounded twice: the request body (Content-Length header and the bytes actually
  received, for chunked uploads too) and every file's size after reading; both give 413.
* Only real images pass: Pillow opens them restricted to PNG/JPEG/BMP/TIFF/WebP (no plug-in that
  shells out), ``verify()`` then a full ``load()``, so non-images get 415 and corrupt or truncated
  ones 400, each with a JSON ``detail`` saying why. Pixel counts are capped before decoding.
* Nothing on the server's disk is reachable from a request: the page is a string in this module,
  and there is no static-file route. The Swagger UI (/docs) is off because it loads from a CDN;
  the OpenAPI schema stays at /openapi.json.
"""


import asyncio
import base64
import io
import json
import math
import os
import threading
from importlib import resources
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..version import __version__
from ..engine.calibration import display_range
from ..data.images import _image_tensor
from .predict import _resize_map
from .visualize import overlay

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers on top of the file bytes
DRAIN_CAP = 8 * 1024 * 1024  # bytes of an oversize body read and dropped so the client sees the 413
DRAIN_SECONDS = 5.0


class MissingServeDependencies(RuntimeError):
    """fastapi / uvicorn / python-multipart are not installed."""


class UploadRejected(Exception):
    """An uploaded file that cannot be scored; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def require_serve_dependencies() -> None:
    """Fail with the install command when the optional web stack is missing."""
    missing = []
    for mod, pkg in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart")):
        try:
            __import__(mod)
        except ImportError:
            if mod == "python_multipart":
                try:  # older python-multipart releases are imported as `multipart`
                    __import__("multipart.multipart")
                    continue
                except ImportError:
                    pass
            missing.append(pkg)
    if missing:
        raise MissingServeDependencies(f"`nferd serve` needs {', '.join(missing)}: pip install 'nferd[serve]'")


@dataclass
class Limits:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_queue: int = 16
    max_batch_files: int = 16
    max_pixels: int = 25_000_000
    overlay_max_side: int = 1024

    def body_limit(self, path: str) -> int | None:
        """Request-body limit for a path; None for routes that take no body."""
        if path == "/predict":
            return self.max_upload_bytes + MULTIPART_SLACK
        if path == "/predict/batch":
            return self.max_batch_files * (self.max_upload_bytes + MULTIPART_SLACK)
        return None


@dataclass
class Decoded:
    filename: str
    width: int
    height: int
    format: str
    mode: str
    tensor: torch.Tensor  # 3 x S x S in [0, 1], the model's input
    display: np.ndarray | None  # H' x W' x 3 uint8 for the overlay (long side <= overlay_max_side)
    decode_ms: float


def safe_filename(name: str | None) -> str:
    """The base name only, for echoing back: the server never uses it as a path."""
    base = os.path.basename((name or "").replace("\\", "/")).strip()
    return base[:200] or "upload"


def decode_upload(data: bytes, filename: str, size: int, limits: Limits, want_display: bool) -> Decoded:
    """Bytes -> model tensor (+ display image), or UploadRejected(413/415/400) saying why."""
    t0 = time.perf_counter()
    if not data:
        raise UploadRejected(400, f"'{filename}' is empty (0 bytes)")
    if len(data) > limits.max_upload_bytes:
        raise UploadRejected(413, f"'{filename}' is {len(data)} bytes; the limit is {limits.max_upload_bytes}")
    kinds, fmt = "/".join(ACCEPTED_FORMATS), "image"
    try:
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as im:
            fmt, (w, h) = im.format or "?", im.size
            if w * h > limits.max_pixels:
                raise UploadRejected(413, f"'{filename}' is {w} x {h} = {w * h} pixels; the limit is "
                                          f"{limits.max_pixels}")
            im.verify()
    except UploadRejected:
        raise
    except Image.DecompressionBombError as e:
        raise UploadRejected(413, f"'{filename}' is too large to decode: {e}") from e
    except UnidentifiedImageError as e:
        raise UploadRejected(415, f"'{filename}' is not a {kinds} image (Pillow cannot identify it)") from e
    except Exception as e:  # verify() raises SyntaxError, OSError, ValueError, struct.error ... on bad data
        raise UploadRejected(400, f"'{filename}' is a corrupt {fmt} image: {type(e).__name__}: {e}") from e
    try:
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as im:
            im.load()  # decodes every pixel: truncated files fail here
            mode = im.mode
            tensor = _image_tensor(Path(filename), im, (size, size))
            display = None
            if want_display:
                scale = min(1.0, limits.overlay_max_side / max(w, h))
                hw = (max(1, round(h * scale)), max(1, round(w * scale)))
                display = (_image_tensor(Path(filename), im, hw).permute(1, 2, 0).numpy() * 255 + 0.5
                           ).astype(np.uint8)
    except Exception as e:
        reason = str(e) if "truncated" not in str(e) else f"the file is truncated ({e})"
        raise UploadRejected(400, f"'{filename}' could not be decoded as {fmt}: {reason}") from e
    return Decoded(filename, w, h, fmt, mode, tensor, display, (time.perf_counter() - t0) * 1000)


def png_base64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def build_result(predictor: Any, dec: Decoded, amap: np.ndarray, score: float, want_overlay: bool,
                 want_mask: bool) -> dict[str, Any]:
    """One image's JSON: decision, defect area at the image's own size, optional overlay/mask PNGs.

    Same conventions as ``nferd predict`` (predict.save_outputs): the map is resized to the
    image size, the mask is map > calibrated pixel threshold, the overlay colour range puts that
    threshold mid-scale and outlines the mask in white.
    """
    cal = predictor.calibration
    res: dict[str, Any] = {"filename": dec.filename,
                           "image": {"width": dec.width, "height": dec.height, "format": dec.format,
                                     "mode": dec.mode},
                           **predictor.decide(float(score)),
                           "defect_area_px": None, "defect_area_fraction": None}
    mask = None
    if cal is not None:
        mask = _resize_map(amap, (dec.height, dec.width)) > cal["pixel_threshold"]
        res["defect_area_px"] = int(mask.sum())
        res["defect_area_fraction"] = float(mask.mean())
    if want_overlay and dec.display is not None:
        small = _resize_map(amap, dec.display.shape[:2])
        vmin, vmax = display_range(cal, small)
        small_mask = small > cal["pixel_threshold"] if cal is not None else None
        res["overlay_png_base64"] = png_base64(overlay(dec.display, small, vmin, vmax, mask=small_mask))
    if want_mask:
        res["mask_png_base64"] = png_base64((mask * 255).astype(np.uint8)) if mask is not None else None
    return res


class InferenceQueue:
    """Admission counter plus a single model worker thread.

    ``admit()`` is called on the event loop (no lock needed there); it refuses when
    ``1 + max_queue`` requests are already inside.
    """

    def __init__(self, predictor: Any, max_queue: int) -> None:
        self.predictor = predictor
        self.max_queue = max_queue
        self.active = 0
        self.rejected = 0
        self.served = 0
        self.mean_s = 0.1  # running mean of one forward pass, for Retry-After
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nferd-model")
        self.lock = threading.Lock()

    def admit(self) -> None:
        from fastapi import HTTPException
        if self.active > self.max_queue:
            self.rejected += 1
            retry = max(1, math.ceil(self.mean_s * self.active))
            raise HTTPException(503, detail=f"busy: {self.active} requests are being processed or waiting "
                                            f"(limit {self.max_queue + 1}); retry in {retry} s",
                                headers={"Retry-After": str(retry)})
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    async def maps(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Run ``predictor.maps`` in the worker; returns maps, scores, queue ms and inference ms."""
        enqueued = time.perf_counter()

        def job() -> tuple[np.ndarray, np.ndarray, float, float]:
            start = time.perf_counter()
            maps, scores = self.predictor.maps(batch)
            end = time.perf_counter()
            with self.lock:
                self.mean_s = 0.8 * self.mean_s + 0.2 * (end - start)
                self.served += len(batch)
            return maps, scores, (start - enqueued) * 1000, (end - start) * 1000

        return await asyncio.get_running_loop().run_in_executor(self.executor, job)


class BodyLimit:
    """ASGI middleware: 413 when Content-Length or the bytes actually received pass the limit.

    Before answering, up to DRAIN_CAP further bytes are read and dropped (for at most
    DRAIN_SECONDS), so that a client still sending its body reads the 413 instead of a reset.
    """

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limits = app, limits

    @staticmethod
    async def _reject(send: Any, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _drain(receive: Any, more: bool) -> None:
        async def loop() -> None:
            dropped, more_body = 0, more
            while more_body and dropped < DRAIN_CAP:
                msg = await receive()
                if msg["type"] != "http.request":
                    return
                dropped += len(msg.get("body", b""))
                more_body = msg.get("more_body", False)
        try:
            await asyncio.wait_for(loop(), DRAIN_SECONDS)
        except TimeoutError:
            pass

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        limit = self.limits.body_limit(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await self._reject(send, 400, "invalid Content-Length header")
            if n > limit:
                await self._drain(receive, True)
                return await self._reject(send, 413, f"request body of {n} bytes is over the limit of {limit} "
                                                     f"bytes (max upload {self.limits.max_upload_bytes} bytes "
                                                     "per file)")
        received, answered = 0, False

        async def counted_receive() -> dict:
            nonlocal received, answered
            msg = await receive()
            if msg["type"] == "http.request" and not answered:
                received += len(msg.get("body", b""))
                if received > limit:
                    answered = True
                    await self._drain(receive, msg.get("more_body", False))
                    await self._reject(send, 413, f"request body passed the limit of {limit} bytes "
                                                  f"(max upload {self.limits.max_upload_bytes} bytes per file)")
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: dict) -> None:
            if not answered:  # after our 413 the app's own error answer is dropped
                await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not answered:
                raise


def public_metadata(predictor: Any, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """What /metadata shows: model, teacher, calibration; never the server's file paths."""
    own = getattr(predictor, "metadata", None)  # OnnxPredictor carries its export's metadata
    meta = dict(metadata or (own if isinstance(own, dict) else None) or {})
    model = getattr(predictor, "model", None)
    if "model" not in meta and hasattr(getattr(model, "config", None), "to_dict"):
        meta["model"] = model.config.to_dict()
    if "teacher" not in meta and getattr(getattr(model, "teacher", None), "name", None):
        meta["teacher"] = {"name": model.teacher.name}
    return {"model": meta.get("model"), "teacher": meta.get("teacher"),
            "normalization": meta.get("normalization"),
            "checkpoint": {"format": meta.get("format"), "version": meta.get("version"),
                           "nferd_version": meta.get("nferd_version"), "epoch": meta.get("epoch")}}


def page_html() -> str:
    """The operator page, a resource file of this package (inline script and style, nothing fetched)."""
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

PAGE_HEADERS = {
    # Everything is inline; nothing may be fetched from anywhere but this server (no CDN).
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def create_app(predictor: Any, metadata: dict[str, Any] | None = None, *,
               max_upload_bytes: int = 20 * 1024 * 1024, max_queue: int = 16, max_batch_files: int = 16,
               max_pixels: int = 25_000_000, overlay_max_side: int = 1024, warmup: bool = True) -> Any:
    """FastAPI app serving ``predictor`` (anything with ``maps``, ``decide``, ``calibration``, ``size``).

    ``metadata``: the checkpoint's metadata (``checkpoint.read_metadata``) shown by /metadata.
    ``max_queue``: requests allowed to wait while one is processed; beyond that, 503.
    """
    require_serve_dependencies()
    from fastapi import FastAPI, File, HTTPException, Query, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse

    if max_queue < 0 or max_upload_bytes <= 0 or max_batch_files <= 0 or max_pixels <= 0:
        raise ValueError("max_queue must be >= 0 and max_upload_bytes, max_batch_files, max_pixels > 0")
    if getattr(predictor, "preprocess", False):
        raise ValueError("this ONNX model was exported with --preprocess (uint8 images of any size); the service "
                         "feeds float images at the model size: serve a plain `nferd export` or the checkpoint")
    limits = Limits(max_upload_bytes, max_queue, max_batch_files, max_pixels, overlay_max_side)
    queue = InferenceQueue(predictor, max_queue)
    size = int(predictor.size)
    started = time.time()
    info = public_metadata(predictor, metadata)

    @asynccontextmanager
    async def lifespan(app: Any):  # type: ignore[no-untyped-def]
        if warmup:  # the first real request should not pay for lazy initialisation
            await queue.maps(torch.zeros(1, 3, size, size))
        yield
        queue.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nferd inspection service", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Anomaly score, OK/NOK decision and heat map for uploaded images.")
    app.add_middleware(BodyLimit, limits=limits)
    app.state.queue, app.state.limits = queue, limits

    async def read_upload(f: UploadFile) -> bytes:
        data = await f.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise UploadRejected(413, f"'{safe_filename(f.filename)}' is over the upload limit of "
                                      f"{limits.max_upload_bytes} bytes")
        return data

    async def score(uploads: list[UploadFile], want_overlay: bool, want_mask: bool) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        decoded: list[Decoded | UploadRejected] = []
        for f in uploads:
            name = safe_filename(f.filename)
            try:
                data = await read_upload(f)
                decoded.append(await run_in_threadpool(decode_upload, data, name, size, limits, want_overlay))
            except UploadRejected as e:
                decoded.append(e)
        good = [d for d in decoded if isinstance(d, Decoded)]
        queue_ms = inference_ms = 0.0
        maps = scores = None
        if good:
            maps, scores, queue_ms, inference_ms = await queue.maps(torch.stack([d.tensor for d in good]))
        out: list[dict[str, Any]] = []
        i = 0
        for f, d in zip(uploads, decoded):
            if isinstance(d, UploadRejected):
                out.append({"filename": safe_filename(f.filename), "error": d.detail, "status": d.status})
                continue
            t1 = time.perf_counter()
            res = await run_in_threadpool(build_result, predictor, d, maps[i], float(scores[i]), want_overlay,
                                          want_mask)
            i += 1
            res["timings_ms"] = {"decode": d.decode_ms, "queue": queue_ms, "inference": inference_ms,
                                 "postprocess": (time.perf_counter() - t1) * 1000,
                                 "total": (time.perf_counter() - t0) * 1000}
            out.append(res)
        return out

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html(), headers=PAGE_HEADERS)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and load: requests inside the service now and how many were turned away."""
        return {"status": "ok", "in_flight": queue.active, "capacity": queue.max_queue + 1,
                "rejected_busy": queue.rejected, "images_scored": queue.served,
                "uptime_s": round(time.time() - started, 1)}

    @app.get("/metadata")
    async def get_metadata() -> dict[str, Any]:
        """Model, teacher, input size, calibration, nferd version and the service limits."""
        return {**info, "nferd_version": __version__, "image_size": size, "calibration": predictor.calibration,
                "decision_available": predictor.calibration is not None,
                "device": str(getattr(predictor, "device", "unknown")),
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_queue": limits.max_queue,
                           "max_batch_files": limits.max_batch_files, "max_pixels": limits.max_pixels,
                           "overlay_max_side": limits.overlay_max_side,
                           "accepted_formats": list(ACCEPTED_FORMATS)}}

    @app.post("/predict")
    async def predict(file: Annotated[UploadFile, File(description="the image (PNG/JPEG/BMP/TIFF/WebP)")],
                      overlay: Annotated[bool, Query(description="add the heat-map overlay as base64 PNG")] = False,
                      mask: Annotated[bool, Query(description="add the binary defect mask as base64 PNG")] = False,
                      ) -> dict[str, Any]:
        """Score one image: anomaly score, OK/NOK, defect area, timings; optionally overlay and mask."""
        queue.admit()
        try:
            res = (await score([file], overlay, mask))[0]
        finally:
            queue.release()
        if "error" in res:
            raise HTTPException(res["status"], detail=res["error"])
        return res

    @app.post("/predict/batch")
    async def predict_batch(files: Annotated[list[UploadFile], File(description="several images")],
                            overlay: bool = False, mask: bool = False) -> dict[str, Any]:
        """Score several images in one forward pass; a broken file gets its own error entry."""
        if len(files) > limits.max_batch_files:
            raise HTTPException(413, detail=f"{len(files)} files sent; the limit is {limits.max_batch_files} "
                                            "per batch request")
        queue.admit()
        try:
            results = await score(files, overlay, mask)
        finally:
            queue.release()
        return {"results": results, "n_ok": sum(r.get("decision") == "OK" for r in results),
                "n_nok": sum(r.get("decision") == "NOK" for r in results),
                "n_errors": sum("error" in r for r in results)}

    return app


def run(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
        precision: str = "auto", log_level: str = "info", **limits: Any) -> None:
    """Load ``checkpoint`` and serve it until interrupted (``nferd serve``)."""
    require_serve_dependencies()
    import uvicorn

    from ..engine.checkpoint import read_metadata
    from .predict import Predictor
    meta = read_metadata(checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, device=device, precision=precision)
    app = create_app(predictor, meta, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
