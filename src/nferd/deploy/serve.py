"""The inspection service: an HTTP API and a one-page operator UI around a loaded predictor.

``create_app(predictor)`` builds a FastAPI app; ``run(checkpoint)`` loads a checkpoint and serves
it with uvicorn (``nferd serve``). Design choices, and why:

* The predictor is used only through ``maps``, ``decide``, ``calibration`` and ``size``, so any
  backend with that API (PyTorch ``Predictor``, an ONNX one) can be served.
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
"""

import asyncio
import base64
import ctypes
import io
import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..version import __version__
from ..engine.calibration import display_range
from ..engine.jsonio import NonFiniteJSONError, finite_or_none
from ..data.images import _image_tensor
from .monitor import DRIFT_ALPHA, DRIFT_WINDOW, LineMonitor, thumbnail_png
from .predict import _resize_map
from .explain import cell_box, side_by_side
from .visualize import overlay

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers on top of the file bytes
SPOOL_BYTES = 64 * 1024  # an uploaded file moves from memory to a temporary file on disk beyond this
FORM_FIELDS = 8  # non-file form fields accepted (and ignored) besides the files, MULTIPART_SLACK bytes each
DRAIN_CAP = 8 * 1024 * 1024  # bytes of an oversize body read and dropped so the client sees the 413
DRAIN_SECONDS = 5.0
DISCONNECT_POLL_S = 0.1  # how often a waiting request checks that its client is still there
CLIENT_GONE_STATUS = 499  # nginx's "client closed request"; nobody reads it, logs do

# Peak memory of decoding one image, in bytes per pixel of the image, by Pillow mode: the decoded
# pixels plus the float working copies of the conversion to the model's input (16-bit and 32-bit
# images go through float32/float64 arrays at full size). Measured with VmHWM on 4000 x 4000
# images, rounded up; tests/test_serve_memory.py checks the table against the real peak.
DECODE_BYTES_PER_PIXEL = {
    "1": 8, "L": 8, "P": 8, "LA": 12, "La": 12, "PA": 12,
    "RGB": 8, "YCbCr": 8, "LAB": 8, "HSV": 8,
    "RGBA": 14, "RGBa": 14, "RGBX": 14, "CMYK": 14,
    "I;16": 20, "I;16L": 20, "I;16B": 20, "I;16N": 20,
    "I": 40, "F": 40,
}
DECODE_BYTES_UNKNOWN_MODE = 44
DISPLAY_WORK_BYTES_PER_PIXEL = 32  # float32 RGB temporaries of the display image, per display pixel
AREA_EXACT_PIXELS = 4 << 20  # up to this size the full-size mask is built whole, as `nferd predict` does
AREA_BAND_PIXELS = 1 << 20  # above it, it is counted in bands of about this many pixels


class MissingServeDependencies(RuntimeError):
    """fastapi / uvicorn / python-multipart are not installed."""


class ModelOutputError(RuntimeError):
    """The model gave a NaN or infinite anomaly map or score: no decision may rest on it."""


class UploadRejected(Exception):
    """An uploaded file that cannot be scored; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class ClientGone(Exception):
    """The client disconnected: the rest of its request is not computed."""


def require_serve_dependencies() -> None:
    """Fail with the install command when the optional web stack is missing."""
    missing = []
    for mod, pkg in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart"),
                     ("prometheus_client", "prometheus-client")):
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


def strict_json(content: Any) -> bytes:
    """JSON without NaN or Infinity (which strict parsers reject): raises ValueError instead."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")



try:
    _malloc_trim: Any = ctypes.CDLL("libc.so.6").malloc_trim
    _malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def trim_memory() -> None:
    """Give freed heap memory back to the system (glibc only): the heaps of the decoding threads
    would otherwise keep the peak of every decode, and RSS would not follow what is in use."""
    if _malloc_trim is not None:
        _malloc_trim(0)


@dataclass
class Limits:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_queue: int = 16
    max_batch_files: int = 16
    max_pixels: int = 25_000_000
    overlay_max_side: int = 1024
    max_image_memory_bytes: int = 1024 * 1024 * 1024

    def max_files(self, path: str) -> int | None:
        """Files a path takes in one request; None for routes that take no body."""
        return {"/predict": 1, "/predict/batch": self.max_batch_files}.get(path)

    def body_limit(self, path: str) -> int | None:
        """Request-body limit for a path (the most it could ever accept); None for routes that take no body."""
        files = self.max_files(path)
        return None if files is None else files * (self.max_upload_bytes + MULTIPART_SLACK)


@dataclass
class Header:
    """What an upload's header says, read without decoding its pixels."""
    filename: str
    width: int
    height: int
    format: str
    mode: str


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


def overlay_hw(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(height, width) of the overlay and mask: the image's own size, shrunk to ``max_side`` on the long side."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_cost(head: Header, size: int, max_side: int, want_overlay: bool, want_mask: bool,
                tiled: bool = False) -> tuple[int, int]:
    """Bytes an image needs: (while it is decoded, from its decoding until its response is built).

    The second part is the model input (the whole image at its own size when ``tiled``, and its
    stitched map), the display image and the response's PNGs.
    """
    oh, ow = overlay_hw(head.width, head.height, max_side)
    work = head.width * head.height * DECODE_BYTES_PER_PIXEL.get(head.mode, DECODE_BYTES_UNKNOWN_MODE)
    keep = (3 + 2) * head.width * head.height * 4 if tiled else 3 * size * size * 4
    if want_overlay:
        work += oh * ow * DISPLAY_WORK_BYTES_PER_PIXEL
        keep += oh * ow * (3 + 6)  # the display image, then the overlay PNG as base64 (worst case)
    if want_mask:
        keep += oh * ow * 2  # the mask PNG as base64 (worst case)
    return work, keep


def _upload_size(file: BinaryIO) -> int:
    file.seek(0, os.SEEK_END)
    n = file.tell()
    file.seek(0)
    return n


def read_header(file: BinaryIO, filename: str, limits: Limits) -> Header:
    """Size, format and mode of an upload without decoding it, or UploadRejected(413/415/400) saying why.

    ``verify()`` checks the file's structure (PNG chunk CRCs, ...) without decoding the pixels.
    """
    n = _upload_size(file)
    if not n:
        raise UploadRejected(400, f"'{filename}' is empty (0 bytes)")
    if n > limits.max_upload_bytes:
        raise UploadRejected(413, f"'{filename}' is {n} bytes; the limit is {limits.max_upload_bytes}")
    kinds, fmt = "/".join(ACCEPTED_FORMATS), "image"
    try:
        with Image.open(file, formats=list(ACCEPTED_FORMATS)) as im:
            fmt, (w, h), mode = im.format or "?", im.size, im.mode
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
    if w <= 0 or h <= 0:
        raise UploadRejected(400, f"'{filename}' has no pixels ({w} x {h})")
    return Header(filename, w, h, fmt, mode)


def decode_upload(file: BinaryIO, head: Header, size: int, limits: Limits, want_display: bool,
                  tiled: bool = False) -> Decoded:
    """Decode a file whose header was read: model tensor (at the model size, or at the image's own
    size when ``tiled``) (+ display image), or UploadRejected(400)."""
    t0 = time.perf_counter()
    file.seek(0)
    try:
        with Image.open(file, formats=list(ACCEPTED_FORMATS)) as im:
            im.load()  # decodes every pixel: truncated files fail here
            path = Path(head.filename)
            tensor = _image_tensor(path, im, None if tiled else (size, size))
            display = None
            if want_display:
                hw = overlay_hw(head.width, head.height, limits.overlay_max_side)
                display = (_image_tensor(path, im, hw).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    except Exception as e:
        reason = str(e) if "truncated" not in str(e) else f"the file is truncated ({e})"
        raise UploadRejected(400, f"'{head.filename}' could not be decoded as {head.format}: {reason}") from e
    finally:
        if head.width * head.height >= 1 << 20:
            trim_memory()
    return Decoded(head.filename, head.width, head.height, head.format, head.mode, tensor, display,
                   (time.perf_counter() - t0) * 1000)


def png_base64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def resized_rows(amap: np.ndarray, hw: tuple[int, int], start: int, stop: int,
                 across: np.ndarray | None = None) -> np.ndarray:
    """Rows ``start:stop`` of ``_resize_map(amap, hw)`` (bilinear, align_corners=False) without the rest.

    Needs the height to be enlarged (``hw[0] > amap.shape[0]``): then torch's resize is separable,
    width first, and this repeats its height step (float32 weights, a fused multiply-add), which
    gives the same floats on x86-64 builds of torch; elsewhere they may differ in the last bit.
    ``across``: ``_resize_map(amap, (S, hw[1]))`` when the caller already has it.
    """
    s, (h, w) = amap.shape[0], hw
    rows = _resize_map(amap, (s, w)) if across is None else across  # along the width only: S x W
    scale = np.float32(np.float32(s) / np.float32(h))
    x = np.arange(start, stop, dtype=np.float32) + np.float32(0.5)
    src = np.maximum((np.float64(scale) * x.astype(np.float64) - 0.5).astype(np.float32), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), s - 1)
    t = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)[:, None]
    lo, hi = rows[i0], rows[np.minimum(i0 + 1, s - 1)]
    return ((hi * t).astype(np.float64) + lo.astype(np.float64) * (np.float32(1) - t)).astype(np.float32)


def defect_area(amap: np.ndarray, hw: tuple[int, int], threshold: float) -> int:
    """Pixels of the map, bilinearly resized to ``hw``, above ``threshold``: the full-size mask's count.

    Up to AREA_EXACT_PIXELS (or when the height is not enlarged) it is
    ``(_resize_map(amap, hw) > threshold).sum()``, as ``nferd predict`` computes it; above, the
    resized map is built and counted in bands of rows (``resized_rows``), so a 25-megapixel image
    needs about 30 MiB instead of 125.
    """
    h, w = hw
    if h * w <= AREA_EXACT_PIXELS or h <= amap.shape[0]:
        return int((_resize_map(amap, hw) > threshold).sum())
    across = _resize_map(amap, (amap.shape[0], w))
    band = max(1, AREA_BAND_PIXELS // w)
    return sum(int(np.count_nonzero(resized_rows(amap, hw, r, min(h, r + band), across) > threshold))
               for r in range(0, h, band))


def check_finite(amap: np.ndarray, score: float, filename: str) -> None:
    """Raise ModelOutputError when the map or the score is NaN or infinite."""
    bad = int(amap.size - np.count_nonzero(np.isfinite(amap)))
    if bad or not math.isfinite(score):
        what = f"score is {score}" if not math.isfinite(score) else f"anomaly map has {bad} non-finite values"
        raise ModelOutputError(f"the model gave no usable result for '{filename}': its {what} (NaN or infinite), "
                               "so no decision was made; the model or checkpoint is broken")


def explain_path(predictor: Any, near: dict[str, Any]) -> str | None:
    """The training image file behind a ``nearest_normal`` entry, from the predictor's checkpoint."""
    images = getattr(predictor, "memory_images", None) or []
    i = near.get("normal_image_id", -1)
    return images[i] if 0 <= i < len(images) else None


def build_result(predictor: Any, dec: Decoded, amap: np.ndarray, score: float, want_overlay: bool,
                 want_mask: bool, max_side: int = 1024) -> dict[str, Any]:
    """One image's JSON: decision, defect area at the image's own size, optional overlay/mask PNGs.

    Same conventions as ``nferd predict`` (predict.save_outputs): the map is resized to the
    image size, the mask is map > calibrated pixel threshold, the overlay colour range puts that
    threshold mid-scale and outlines the mask in white. The overlay and mask PNGs are at most
    ``max_side`` pixels on the long side (``overlay_size`` says their size). Raises
    ModelOutputError for a non-finite map or score, whatever ``predictor.decide`` would do.
    """
    check_finite(amap, score, dec.filename)
    try:
        decided = predictor.decide(float(score))
    except ValueError as e:  # a predictor that refuses the score itself
        raise ModelOutputError(f"no decision for '{dec.filename}': {e}") from e
    cal = predictor.calibration
    res: dict[str, Any] = {"filename": dec.filename,
                           "image": {"width": dec.width, "height": dec.height, "format": dec.format,
                                     "mode": dec.mode},
                           **decided, "defect_area_px": None, "defect_area_fraction": None}
    if cal is not None:
        area = defect_area(amap, (dec.height, dec.width), cal["pixel_threshold"])
        res["defect_area_px"] = area
        res["defect_area_fraction"] = area / (dec.height * dec.width)
    explain = getattr(predictor, "explain", None)
    if explain is not None:  # why it is NOK: the closest normal region (deploy.explain)
        near = explain(dec.tensor, amap)
        if near.get("available"):
            near = {**near, "input_box": cell_box(tuple(near["input_cell"]), tuple(near["grid"]),
                                                  (dec.width, dec.height))}
            near.pop("normal_path", None)  # the server's file system is not the client's business
            if want_overlay and res.get("decision") == "NOK" and dec.display is not None:
                pair = side_by_side(dec.display, {**near, "normal_path": explain_path(predictor, near)})
                res["nearest_normal_png_base64"] = png_base64(pair) if pair is not None else None
        res["nearest_normal"] = near
    if want_overlay or want_mask:
        hw = dec.display.shape[:2] if dec.display is not None else overlay_hw(dec.width, dec.height, max_side)
        small = _resize_map(amap, hw)
        small_mask = small > cal["pixel_threshold"] if cal is not None else None
        res["overlay_size"] = {"width": int(hw[1]), "height": int(hw[0])}
        if want_overlay and dec.display is not None:
            vmin, vmax = display_range(cal, small)
            res["overlay_png_base64"] = png_base64(overlay(dec.display, small, vmin, vmax, mask=small_mask))
        if want_mask:
            res["mask_png_base64"] = (png_base64(small_mask.astype(np.uint8) * np.uint8(255))
                                      if small_mask is not None else None)
    return res


class MemoryBudget:
    """Bytes of image memory shared by every request in flight; reservations are granted in arrival order.

    Lives on the event loop (no lock). A request reserves once, before its first decode, and gives
    back parts as it goes; it never waits while holding a reservation, so waits cannot deadlock.
    ``peak`` is the high-water mark of ``reserved``, which never exceeds ``limit``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reserved = 0
        self.peak = 0
        self.waits = 0  # reservations that had to wait for memory
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def _take(self, n: int) -> None:
        self.reserved += n
        self.peak = max(self.peak, self.reserved)

    def _grant(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():  # its request gave up
                self._waiters.popleft()
                continue
            if self.reserved + n > self.limit:
                return
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)

    async def acquire(self, n: int, gone: Callable[[], Awaitable[bool]]) -> None:
        """Reserve ``n`` bytes, waiting behind earlier requests; ClientGone if the client leaves meanwhile."""
        if n > self.limit:
            raise ValueError(f"{n} bytes is more than the whole budget of {self.limit}")
        if not self._waiters and self.reserved + n <= self.limit:
            self._take(n)
            return
        self.waits += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            while not fut.done():
                await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
                if not fut.done() and await gone():
                    raise ClientGone
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as it gave up
            else:
                fut.cancel()
                self._grant()  # the requests behind it may fit now
            raise

    def release(self, n: int) -> None:
        if n:
            self.reserved -= n
            self._grant()


class InferenceQueue:
    """Admission counter, a single model worker thread and a single post-processing thread.

    ``admit()`` is called on the event loop (no lock needed there); it refuses when
    ``1 + max_queue`` requests are already inside.
    """

    def __init__(self, predictor: Any, max_queue: int) -> None:
        self.predictor = predictor
        self.max_queue = max_queue
        self.active = 0
        self.rejected = 0
        self.served = 0
        self.dropped = 0  # requests whose client left before the answer was computed
        self.non_finite = 0  # images whose map or score was NaN or infinite
        self.last_pass_finite = True
        self.drain_s = 0.1  # running mean of the time between finished requests, for Retry-After
        self._last_done: float | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nferd-model")
        self.post_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nferd-post")
        self.lock = threading.Lock()

    def admit(self) -> float:
        """Count a request in (its start time), or raise 503 with Retry-After when the queue is full."""
        from fastapi import HTTPException
        if self.active > self.max_queue:
            self.rejected += 1
            retry = max(1, math.ceil(self.drain_s * self.active))
            raise HTTPException(503, detail=f"busy: {self.active} requests are being processed or waiting "
                                            f"(limit {self.max_queue + 1}); retry in {retry} s",
                                headers={"Retry-After": str(retry)})
        self.active += 1
        return time.monotonic()

    def release(self, started: float) -> None:
        self.active -= 1
        now = time.monotonic()
        if self._last_done is not None:  # idle time between requests is not service time
            self.drain_s = 0.8 * self.drain_s + 0.2 * min(now - self._last_done, now - started)
        self._last_done = now

    async def maps(self, batch: list[torch.Tensor], gone: Callable[[], Awaitable[bool]]
                   ) -> tuple[Any, np.ndarray, float, float]:
        """Run the predictor on the batch in the worker; returns maps, scores, queue ms and inference ms.

        While the batch waits for the worker, a client that disconnects cancels it (ClientGone):
        no forward pass is started for it.
        """
        enqueued = time.perf_counter()

        def job() -> tuple[np.ndarray, np.ndarray, float, float]:
            start = time.perf_counter()
            if getattr(self.predictor, "tiling", None) is not None:  # maps at the images' own sizes, tile by tile
                maps, scores = self.predictor.batch_maps(batch)
            else:
                maps, scores = self.predictor.maps(torch.stack(batch))
            end = time.perf_counter()
            scores = np.asarray(scores)
            finite = np.array([bool(np.isfinite(m).all()) for m in maps]) & np.isfinite(scores.reshape(-1))
            with self.lock:
                self.served += len(batch)
                self.non_finite += int((~finite).sum())
                self.last_pass_finite = bool(finite.all())
            return maps, scores, (start - enqueued) * 1000, (end - start) * 1000

        cf = self.executor.submit(job)
        fut = asyncio.wrap_future(cf)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
            if done:
                return fut.result()
            if await gone() and cf.cancel():  # cancel() fails once the forward pass has started
                raise ClientGone

    async def post(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the post-processing thread (one image's overlay and mask at a time)."""
        return await asyncio.get_running_loop().run_in_executor(self.post_executor, fn, *args)


def self_check(predictor: Any) -> None:
    """Refuse a model whose map or score is NaN or infinite on a synthetic mid-grey image."""
    size = int(predictor.size)
    maps, scores = predictor.maps(torch.full((1, 3, size, size), 0.5))
    try:
        check_finite(np.asarray(maps)[0], float(np.asarray(scores).reshape(-1)[0]), "a synthetic grey image")
    except ModelOutputError as e:
        raise ModelOutputError(f"not serving: {e}") from None


class TooManyParts(Exception):
    """A multipart body with more parts than its route takes; answered 413."""


def upload_route(limits: Limits) -> type:
    """An APIRoute class whose multipart forms are parsed within ``limits``, as the body arrives.

    Starlette's parser, as FastAPI calls it, takes up to 1000 files and keeps each file of up to
    1 MiB in memory, so a body of hundreds of files just under 1 MiB was held whole before the
    endpoint could count them. Here the parser stops (413) as the first part beyond the route's
    files plus FORM_FIELDS begins, and every file beyond SPOOL_BYTES goes to a temporary file.
    """
    from fastapi import HTTPException
    from fastapi.routing import APIRoute
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import Request

    class Parser(MultiPartParser):
        spool_max_size = SPOOL_BYTES

        def __init__(self, headers: Any, stream: Any, max_parts: int) -> None:
            super().__init__(headers, stream, max_files=max_parts, max_fields=max_parts)
            self.max_part_size = MULTIPART_SLACK  # a non-file field is held in memory: keep it small
            self.max_parts, self.parts = max_parts, 0

        def on_part_begin(self) -> None:
            self.parts += 1
            if self.parts > self.max_parts:
                raise TooManyParts
            super().on_part_begin()

    class UploadRequest(Request):
        def __init__(self, scope: dict, receive: Any, files: int) -> None:
            super().__init__(scope, receive)
            self.files, self.limited_form = files, None

        async def form(self, **_: Any) -> Any:  # replaces FastAPI's own form limits, where it has them
            if self.limited_form is not None:
                return self.limited_form
            max_parts = self.files + FORM_FIELDS
            if self.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
                self.limited_form = await super().form(max_files=0, max_fields=max_parts)
                return self.limited_form
            try:
                async with aclosing(self.stream()) as stream:
                    self.limited_form = await Parser(self.headers, stream, max_parts).parse()
            except TooManyParts:
                raise HTTPException(413, detail=f"the form has more than {max_parts} parts; {self.url.path} "
                                                f"takes at most {self.files} file(s) and {FORM_FIELDS} other "
                                                "fields") from None
            except MultiPartException as e:
                raise HTTPException(400, detail=f"invalid multipart body: {e.message}") from None
            return self.limited_form

    class UploadRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Any], Awaitable[Any]]:
            handler, files = super().get_route_handler(), limits.max_files(self.path) or 0

            async def limited(request: Any) -> Any:
                return await handler(UploadRequest(request.scope, request.receive, files))
            return limited

    return UploadRoute


class BodyLimit:
    """ASGI middleware: 413 when Content-Length or the bytes actually received pass the limit.

    Before answering (this 413, or any answer the app gives while the body is still coming, such
    as the parser's 413 for too many parts), up to DRAIN_CAP further bytes are read and dropped
    (for at most DRAIN_SECONDS), so that a client still sending its body reads the answer instead
    of a reset; then the connection is closed.
    """

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limits = app, limits

    @staticmethod
    async def _reject(send: Any, status: int, detail: str) -> None:
        body = strict_json({"detail": detail})
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

    def _why(self, path: str) -> str:
        files = self.limits.max_files(path)
        return (f"{files} file(s) of at most {self.limits.max_upload_bytes} bytes, plus {MULTIPART_SLACK} bytes "
                "of multipart headers per file")

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
            if n > limit:  # refused before a byte of the body is read
                await self._drain(receive, True)
                return await self._reject(send, 413, f"request body of {n} bytes is over the limit of {limit} "
                                                     f"bytes ({self._why(scope['path'])})")
        received, answered, finished = 0, False, False

        async def counted_receive() -> dict:
            nonlocal received, answered, finished
            msg = await receive()
            if msg["type"] == "http.request" and not answered:
                received += len(msg.get("body", b""))
                finished = not msg.get("more_body", False)
                if received > limit:
                    answered = True
                    await self._drain(receive, not finished)
                    await self._reject(send, 413, f"request body passed the limit of {limit} bytes "
                                                  f"({self._why(scope['path'])})")
                    return {"type": "http.disconnect"}
            elif msg["type"] == "http.disconnect":
                finished = True
            return msg

        async def guarded_send(msg: dict) -> None:
            if answered:  # after our 413 the app's own error answer is dropped
                return
            if msg["type"] == "http.response.start" and not finished:  # answered before the whole body came
                await self._drain(receive, True)
                msg = {**msg, "headers": [*msg.get("headers", []), (b"connection", b"close")]}
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not answered:
                raise


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


def public_metadata(predictor: Any, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """What /metadata shows: model, teacher, calibration; never the server's file paths."""
    own = getattr(predictor, "metadata", None)  # OnnxPredictor carries its export's metadata
    meta = dict(metadata or (own if isinstance(own, dict) else None) or {})
    model = getattr(predictor, "model", None)
    if "model" not in meta and hasattr(getattr(model, "config", None), "to_dict"):
        meta["model"] = model.config.to_dict()
    if "teacher" not in meta and getattr(getattr(model, "teacher", None), "name", None):
        meta["teacher"] = {"name": model.teacher.name}
    tiling = getattr(predictor, "tiling", None)
    return {"model": meta.get("model"), "teacher": meta.get("teacher"),
            "normalization": meta.get("normalization"), "tiling": tiling.to_dict() if tiling else None,
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
    from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response

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

    if max_queue < 0 or max_upload_bytes <= 0 or max_batch_files <= 0 or max_pixels <= 0 or \
            overlay_max_side <= 0 or max_image_memory_bytes <= 0:
        raise ValueError("max_queue must be >= 0 and max_upload_bytes, max_batch_files, max_pixels, "
                         "overlay_max_side, max_image_memory_bytes > 0")
    if getattr(predictor, "preprocess", False):
        raise ValueError("this ONNX model was exported with --preprocess (uint8 images of any size); the service "
                         "feeds float images at the model size: serve a plain `nferd export` or the checkpoint")
    limits = Limits(max_upload_bytes, max_queue, max_batch_files, max_pixels, overlay_max_side,
                    max_image_memory_bytes)
    queue = InferenceQueue(predictor, max_queue)
    budget = MemoryBudget(max_image_memory_bytes)
    size = int(predictor.size)
    tiled = getattr(predictor, "tiling", None) is not None  # uploads scored at their own size, tile by tile
    started = time.time()
    info = public_metadata(predictor, metadata)
    monitor = LineMonitor(predictor.calibration, drift_window, drift_alpha)

    @asynccontextmanager
    async def lifespan(app: Any):  # type: ignore[no-untyped-def]
        if warmup:  # in the model thread, so the first real request does not pay for lazy initialisation
            await asyncio.get_running_loop().run_in_executor(queue.executor, self_check, predictor)
        yield
        queue.executor.shutdown(wait=False, cancel_futures=True)
        queue.post_executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nferd inspection service", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, default_response_class=StrictJSONResponse,
                  description="Anomaly score, OK/NOK decision and heat map for uploaded images.")
    app.router.route_class = upload_route(limits)  # before the routes are declared
    app.add_middleware(BodyLimit, limits=limits)
    app.add_middleware(RequestMetrics, monitor=monitor)
    app.state.queue, app.state.limits, app.state.budget, app.state.monitor = queue, limits, budget, monitor

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> StrictJSONResponse:
        """An unexpected failure is still a JSON answer (and is logged with its traceback)."""
        return StrictJSONResponse({"detail": f"internal error ({type(exc).__name__}); no decision was made"},
                                  status_code=500)

    async def score(request: Request, uploads: list[UploadFile], want_overlay: bool, want_mask: bool
                    ) -> list[dict[str, Any]]:
        """Decode within the memory budget, run one forward pass, build the results in upload order."""
        t0 = time.perf_counter()

        async def gone() -> bool:
            return await request.is_disconnected()

        names = [safe_filename(f.filename) for f in uploads]
        errors: dict[int, UploadRejected | ModelOutputError] = {}
        heads: dict[int, Header] = {}
        for i, f in enumerate(uploads):
            try:
                heads[i] = await run_in_threadpool(read_header, f.file, names[i], limits)
            except UploadRejected as e:
                errors[i] = e
        costs = {i: decode_cost(h, size, limits.overlay_max_side, want_overlay, want_mask, tiled)
                 for i, h in heads.items()}
        for i, (work, keep) in list(costs.items()):
            if work + keep > budget.limit:
                h = heads.pop(i)
                del costs[i]
                errors[i] = UploadRejected(413, f"'{names[i]}' ({h.width} x {h.height}, mode {h.mode}) needs "
                                                f"{(work + keep) / 2**20:.0f} MiB to decode; the service's image "
                                                f"memory is {budget.limit / 2**20:.0f} MiB")
        work = max((c[0] for c in costs.values()), default=0)
        held = work + sum(c[1] for c in costs.values())
        if held > budget.limit:
            raise HTTPException(413, detail=f"these {len(costs)} images need {held / 2**20:.0f} MiB together; the "
                                            f"service's image memory is {budget.limit / 2**20:.0f} MiB: send fewer")
        waited = time.perf_counter()
        if held:
            await budget.acquire(held, gone)
        waited = (time.perf_counter() - waited) * 1000
        try:
            decoded: dict[int, Decoded] = {}
            for i, h in heads.items():
                if await gone():
                    raise ClientGone
                try:
                    decoded[i] = await run_in_threadpool(decode_upload, uploads[i].file, h, size, limits, want_overlay,
                                                         tiled)
                except UploadRejected as e:
                    errors[i] = e
            budget.release(work)  # decoding is over; display images and results stay reserved until the end
            held -= work
            order = list(decoded)
            queue_ms = inference_ms = 0.0
            if order:
                if await gone():
                    raise ClientGone
                maps, scores, queue_ms, inference_ms = await queue.maps([decoded[i].tensor for i in order], gone)
            out: list[dict[str, Any]] = []
            for i, name in enumerate(names):
                if i in errors:
                    e = errors[i]
                    out.append({"filename": name, "error": str(e),
                                "status": e.status if isinstance(e, UploadRejected) else 500})
                    monitor.record(out[-1])
                    continue
                if await gone():
                    raise ClientGone
                d, j, t1 = decoded.pop(i), order.index(i), time.perf_counter()
                thumb = await queue.post(thumbnail_png, d.tensor)
                try:
                    res = await queue.post(build_result, predictor, d, maps[j], float(scores[j]), want_overlay,
                                           want_mask, limits.overlay_max_side)
                except ModelOutputError as e:
                    out.append({"filename": name, "error": str(e), "status": 500})
                    monitor.record(out[-1], thumb)
                    continue
                res["timings_ms"] = {"memory_wait": waited, "decode": d.decode_ms, "queue": queue_ms,
                                     "inference": inference_ms, "postprocess": (time.perf_counter() - t1) * 1000,
                                     "total": (time.perf_counter() - t0) * 1000}
                out.append(res)
                monitor.record(res, thumb)
            return out
        finally:
            budget.release(held)

    async def admitted(request: Request, uploads: list[UploadFile], want_overlay: bool, want_mask: bool
                       ) -> list[dict[str, Any]] | None:
        """``score`` inside the admission counter; None when the client left (the request was dropped)."""
        begun = queue.admit()
        try:
            return await score(request, uploads, want_overlay, want_mask)
        except ClientGone:
            queue.dropped += 1
            return None
        finally:
            queue.release(begun)

    def dropped() -> StrictJSONResponse:
        return StrictJSONResponse({"detail": "the client disconnected; the request was dropped"},
                                  status_code=CLIENT_GONE_STATUS)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html(), headers=PAGE_HEADERS)

    @app.get("/health", response_model=None)
    async def health() -> StrictJSONResponse:
        """Liveness, load, memory and drift. 503 with ``status: unhealthy`` while the latest forward pass
        gave a NaN or infinite map or score (the model is not to be trusted); the next finite pass clears
        it. ``status: drift`` (200: the model works, the line has changed) while the drift alarm is up."""
        healthy = queue.last_pass_finite
        drift = monitor.drift.status()
        body = {"status": "unhealthy" if not healthy else "drift" if drift["status"] == "alarm" else "ok",
                "problem": None if healthy else "the latest forward pass gave a NaN or infinite anomaly map or "
                                                "score: the model or checkpoint is broken",
                "drift": drift,
                "in_flight": queue.active, "capacity": queue.max_queue + 1,
                "rejected_busy": queue.rejected, "dropped_disconnected": queue.dropped,
                "images_scored": queue.served, "non_finite_outputs": queue.non_finite,
                "image_memory": {"limit_bytes": budget.limit, "reserved_bytes": budget.reserved,
                                 "peak_reserved_bytes": budget.peak, "waits": budget.waits},
                "uptime_s": round(time.time() - started, 1)}
        return StrictJSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metadata", response_model=None)
    async def get_metadata() -> dict[str, Any]:
        """Model, teacher, input size, calibration, nferd version and the service limits."""
        return {**info, "nferd_version": __version__, "image_size": size, "calibration": predictor.calibration,
                "decision_available": predictor.calibration is not None,
                "device": str(getattr(predictor, "device", "unknown")),
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_queue": limits.max_queue,
                           "max_batch_files": limits.max_batch_files, "max_pixels": limits.max_pixels,
                           "overlay_max_side": limits.overlay_max_side,
                           "max_image_memory_bytes": limits.max_image_memory_bytes,
                           "accepted_formats": list(ACCEPTED_FORMATS)}}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus text format: requests, decisions, latency and score histograms, drift."""
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(monitor.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/recent", response_model=None)
    async def recent() -> dict[str, Any]:
        """The last decisions, newest first, with thumbnails of what the model saw, and the drift status."""
        return {"decisions": list(monitor.recent), "drift": monitor.drift.status()}

    @app.post("/predict", response_model=None)
    async def predict(request: Request,
                      file: Annotated[UploadFile, File(description="the image (PNG/JPEG/BMP/TIFF/WebP)")],
                      overlay: Annotated[bool, Query(description="add the heat-map overlay as base64 PNG")] = False,
                      mask: Annotated[bool, Query(description="add the binary defect mask as base64 PNG")] = False,
                      ) -> dict[str, Any] | StrictJSONResponse:
        """Score one image: anomaly score, OK/NOK, defect area, timings; optionally overlay and mask.

        A NaN or infinite map or score answers 500, not 422: the image was valid, the model failed,
        and a client must not take it for a problem with its image (nor any answer for OK).
        """
        results = await admitted(request, [file], overlay, mask)
        if results is None:
            return dropped()
        res = results[0]
        if "error" in res:
            raise HTTPException(res["status"], detail=res["error"])
        return res

    @app.post("/predict/batch", response_model=None)
    async def predict_batch(request: Request, files: Annotated[list[UploadFile], File(description="several images")],
                            overlay: bool = False, mask: bool = False) -> dict[str, Any] | StrictJSONResponse:
        """Score several images in one forward pass; a broken file or a non-finite result gets its own
        error entry (with the status /predict would answer), never a decision."""
        if len(files) > limits.max_batch_files:
            raise HTTPException(413, detail=f"{len(files)} files sent; the limit is {limits.max_batch_files} "
                                            "per batch request")
        results = await admitted(request, files, overlay, mask)
        if results is None:
            return dropped()
        return {"results": results, "n_ok": sum(r.get("decision") == "OK" for r in results),
                "n_nok": sum(r.get("decision") == "NOK" for r in results),
                "n_errors": sum("error" in r for r in results)}

    return app


def run(checkpoint: str | Path | None, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
        precision: str = "auto", log_level: str = "info", predictor: Any = None, tiling: Any = None,
        **limits: Any) -> None:
    """Load ``checkpoint`` (or take ``predictor``, e.g. an exported file's) and serve it until
    interrupted (``nferd serve``); ``tiling`` replaces the checkpoint's recorded tiling.

    Raises ModelOutputError, before listening, when the model is not finite on a synthetic image.
    """
    require_serve_dependencies()
    import uvicorn

    from ..engine.checkpoint import read_metadata
    from .predict import Predictor
    if predictor is None:
        meta = read_metadata(checkpoint)
        predictor = Predictor.from_checkpoint(checkpoint, device=device, precision=precision, tiling=tiling)
    else:
        meta = getattr(predictor, "metadata", None)
    self_check(predictor)
    app = create_app(predictor, meta, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
