"""The service behind the routes: the predictor with its queue, memory budget, limits and line
monitor, and a method for each route, which ``create_app`` declares."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from ...engine.calibration import calibration_dict
from ...version import __version__
from ..monitor import DRIFT_ALPHA, DRIFT_WINDOW, LineMonitor, thumbnail_png
from .admission import InferenceQueue, MemoryBudget, self_check
from .errors import CLIENT_GONE_STATUS, ClientGone, ModelOutputError, UploadRejected
from .limits import Limits
from .page import PAGE_HEADERS, page_html
from .protocol import ServedPredictor, tiled
from .responses import strict_json_response
from .results import build_result
from .uploads import ACCEPTED_FORMATS, Decoded, Header, decode_cost, decode_upload, read_header, safe_filename

if TYPE_CHECKING:
    from fastapi import Request, UploadFile
    from starlette.responses import Response


def public_metadata(predictor: ServedPredictor, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """What /metadata shows: model, teacher, calibration; never the server's file paths."""
    own = getattr(predictor, "metadata", None)  # OnnxPredictor carries its export's metadata
    meta = dict(metadata or (own if isinstance(own, dict) else None) or {})
    model = getattr(predictor, "model", None)
    if "model" not in meta and hasattr(getattr(model, "config", None), "to_dict"):
        meta["model"] = model.config.to_dict()
    if "teacher" not in meta and getattr(getattr(model, "teacher", None), "name", None):
        meta["teacher"] = {"name": model.teacher.name}
    by_tile = tiled(predictor)
    return {"model": meta.get("model"), "teacher": meta.get("teacher"),
            "normalization": meta.get("normalization"),
            "tiling": by_tile.tiling.to_dict() if by_tile else None,
            "checkpoint": {"format": meta.get("format"), "version": meta.get("version"),
                           "nferd_version": meta.get("nferd_version"), "epoch": meta.get("epoch")}}


class Service:
    """One served predictor: admission, memory, scoring and what each route answers.

    Raises ValueError for an ONNX model exported with ``--preprocess`` (it takes uint8 images of
    any size; the service feeds float images at the model size).
    """

    def __init__(self, predictor: ServedPredictor, limits: Limits, metadata: dict[str, Any] | None = None,
                 warmup: bool = True, drift_window: int = DRIFT_WINDOW, drift_alpha: float = DRIFT_ALPHA) -> None:
        if getattr(predictor, "preprocess", False):
            raise ValueError("this ONNX model was exported with the preprocessing built in (uint8 images of any "
                             "size); the service feeds float images at the model size: serve a plain `nferd export` "
                             "or the checkpoint")
        self.predictor, self.limits, self.warmup = predictor, limits, warmup
        self.queue = InferenceQueue(predictor, limits.max_queue)
        self.budget = MemoryBudget(limits.max_image_memory_bytes)
        self.size = int(predictor.size)
        self.tiled = tiled(predictor) is not None  # uploads scored at their own size, tile by tile
        self.started = time.time()
        self.info = public_metadata(predictor, metadata)
        self.monitor = LineMonitor(predictor.calibration, drift_window, drift_alpha)
        self.json_response = strict_json_response()  # StrictJSONResponse, the app's default

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """Start: the self-check (``warmup``), in the model thread, so the first real request does not
        pay for lazy initialisation. Stop: the model and post-processing threads."""
        if self.warmup:
            await asyncio.get_running_loop().run_in_executor(self.queue.executor, self_check, self.predictor)
        yield
        self.queue.executor.shutdown(wait=False, cancel_futures=True)
        self.queue.post_executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------- scoring
    async def score(self, request: Request, uploads: list[UploadFile], want_overlay: bool, want_mask: bool
                    ) -> list[dict[str, Any]]:
        """Decode within the memory budget, run one forward pass, build the results in upload order."""
        from fastapi import HTTPException
        from fastapi.concurrency import run_in_threadpool
        t0 = time.perf_counter()

        async def gone() -> bool:
            return await request.is_disconnected()

        names = [safe_filename(f.filename) for f in uploads]
        errors: dict[int, UploadRejected | ModelOutputError] = {}
        heads, costs = await self.headers(uploads, names, want_overlay, want_mask, errors)
        budget = self.budget
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
                    decoded[i] = await run_in_threadpool(decode_upload, uploads[i].file, h, self.size, self.limits,
                                                         want_overlay, self.tiled)
                except UploadRejected as e:
                    errors[i] = e
            budget.release(work)  # decoding is over; display images and results stay reserved until the end
            held -= work
            order = list(decoded)
            queue_ms = inference_ms = 0.0
            if order:
                if await gone():
                    raise ClientGone
                maps, scores, queue_ms, inference_ms = await self.queue.maps([decoded[i].tensor for i in order], gone)
            out: list[dict[str, Any]] = []
            for i, name in enumerate(names):
                if i in errors:
                    e = errors[i]
                    out.append({"filename": name, "error": str(e),
                                "status": e.status if isinstance(e, UploadRejected) else 500})
                    self.monitor.record(out[-1])
                    continue
                if await gone():
                    raise ClientGone
                j = order.index(i)
                spent = {"memory_wait": waited, "queue": queue_ms, "inference": inference_ms}
                out.append(await self.result(decoded.pop(i), maps[j], float(scores[j]), want_overlay, want_mask,
                                             t0, spent))
            return out
        finally:
            budget.release(held)

    async def headers(self, uploads: list[UploadFile], names: list[str], want_overlay: bool, want_mask: bool,
                      errors: dict[int, UploadRejected | ModelOutputError]
                      ) -> tuple[dict[int, Header], dict[int, tuple[int, int]]]:
        """The headers of the uploads and what decoding each costs (``decode_cost``); an upload that is
        rejected, or that alone needs more than the whole budget, goes to ``errors`` instead."""
        from fastapi.concurrency import run_in_threadpool
        heads: dict[int, Header] = {}
        for i, f in enumerate(uploads):
            try:
                heads[i] = await run_in_threadpool(read_header, f.file, names[i], self.limits)
            except UploadRejected as e:
                errors[i] = e
        costs = {i: decode_cost(h, self.size, self.limits.overlay_max_side, want_overlay, want_mask, self.tiled)
                 for i, h in heads.items()}
        limit = self.budget.limit
        for i, (work, keep) in list(costs.items()):
            if work + keep > limit:
                h = heads.pop(i)
                del costs[i]
                errors[i] = UploadRejected(413, f"'{names[i]}' ({h.width} x {h.height}, mode {h.mode}) needs "
                                                f"{(work + keep) / 2**20:.0f} MiB to decode; the service's image "
                                                f"memory is {limit / 2**20:.0f} MiB")
        return heads, costs

    async def result(self, d: Decoded, amap: Any, score: float, want_overlay: bool, want_mask: bool, t0: float,
                     spent: dict[str, float]) -> dict[str, Any]:
        """One decoded image's entry (built in the post-processing thread), recorded by the monitor;
        an error entry when the map or score is not finite."""
        t1 = time.perf_counter()
        thumb = await self.queue.post(thumbnail_png, d.tensor)
        try:
            res = await self.queue.post(build_result, self.predictor, d, amap, score, want_overlay, want_mask,
                                        self.limits.overlay_max_side)
        except ModelOutputError as e:
            err = {"filename": d.filename, "error": str(e), "status": 500}
            self.monitor.record(err, thumb)
            return err
        res["timings_ms"] = {"memory_wait": spent["memory_wait"], "decode": d.decode_ms, "queue": spent["queue"],
                             "inference": spent["inference"], "postprocess": (time.perf_counter() - t1) * 1000,
                             "total": (time.perf_counter() - t0) * 1000}
        self.monitor.record(res, thumb)
        return res

    async def admitted(self, request: Request, uploads: list[UploadFile], want_overlay: bool, want_mask: bool
                       ) -> list[dict[str, Any]] | None:
        """``score`` inside the admission counter; None when the client left (the request was dropped)."""
        begun = self.queue.admit()
        try:
            return await self.score(request, uploads, want_overlay, want_mask)
        except ClientGone:
            self.queue.dropped += 1
            return None
        finally:
            self.queue.release(begun)

    def dropped(self) -> Response:
        return self.json_response({"detail": "the client disconnected; the request was dropped"},
                                  status_code=CLIENT_GONE_STATUS)

    # ----------------------------------------------------------------------------------- routes
    async def internal_error(self, request: Request, exc: Exception) -> Response:
        """An unexpected failure is still a JSON answer (and is logged with its traceback)."""
        return self.json_response({"detail": f"internal error ({type(exc).__name__}); no decision was made"},
                                  status_code=500)

    async def page(self) -> Response:
        from fastapi.responses import HTMLResponse
        return HTMLResponse(page_html(), headers=PAGE_HEADERS)

    async def health(self) -> Response:
        """Liveness, load, memory and drift. 503 with ``status: unhealthy`` while the latest forward pass
        gave a NaN or infinite map or score (the model is not to be trusted); the next finite pass clears
        it. ``status: drift`` (200: the model works, the line has changed) while the drift alarm is up."""
        queue, budget = self.queue, self.budget
        healthy = queue.last_pass_finite
        drift = self.monitor.drift.status()
        body = {"status": "unhealthy" if not healthy else "drift" if drift["status"] == "alarm" else "ok",
                "problem": None if healthy else "the latest forward pass gave a NaN or infinite anomaly map or "
                                                "score: the model or checkpoint is broken",
                "drift": drift,
                "in_flight": queue.active, "capacity": queue.max_queue + 1,
                "rejected_busy": queue.rejected, "dropped_disconnected": queue.dropped,
                "images_scored": queue.served, "non_finite_outputs": queue.non_finite,
                "image_memory": {"limit_bytes": budget.limit, "reserved_bytes": budget.reserved,
                                 "peak_reserved_bytes": budget.peak, "waits": budget.waits},
                "uptime_s": round(time.time() - self.started, 1)}
        return self.json_response(body, status_code=200 if healthy else 503)

    async def get_metadata(self) -> dict[str, Any]:
        """Model, teacher, input size, calibration, nferd version and the service limits."""
        predictor, limits, cal = self.predictor, self.limits, self.predictor.calibration
        return {**self.info, "nferd_version": __version__, "image_size": self.size,
                "calibration": calibration_dict(cal), "decision_available": cal is not None,
                "device": str(getattr(predictor, "device", "unknown")),
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_queue": limits.max_queue,
                           "max_batch_files": limits.max_batch_files, "max_pixels": limits.max_pixels,
                           "overlay_max_side": limits.overlay_max_side,
                           "max_image_memory_bytes": limits.max_image_memory_bytes,
                           "accepted_formats": list(ACCEPTED_FORMATS)}}

    async def metrics(self) -> Response:
        """Prometheus text format: requests, decisions, latency and score histograms, drift."""
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(self.monitor.render(), media_type=CONTENT_TYPE_LATEST)

    async def recent(self) -> dict[str, Any]:
        """The last decisions, newest first, with thumbnails of what the model saw, and the drift status."""
        return {"decisions": list(self.monitor.recent), "drift": self.monitor.drift.status()}

    async def predict(self, request: Request, file: UploadFile, overlay: bool, mask: bool
                      ) -> dict[str, Any] | Response:
        """POST /predict: one image's result, or its error as an HTTP error."""
        from fastapi import HTTPException
        results = await self.admitted(request, [file], overlay, mask)
        if results is None:
            return self.dropped()
        res = results[0]
        if "error" in res:
            raise HTTPException(res["status"], detail=res["error"])
        return res

    async def predict_batch(self, request: Request, files: list[UploadFile], overlay: bool, mask: bool
                            ) -> dict[str, Any] | Response:
        """POST /predict/batch: every image's entry, with the counts of OK, NOK and errors."""
        from fastapi import HTTPException
        if len(files) > self.limits.max_batch_files:
            raise HTTPException(413, detail=f"{len(files)} files sent; the limit is {self.limits.max_batch_files} "
                                            "per batch request")
        results = await self.admitted(request, files, overlay, mask)
        if results is None:
            return self.dropped()
        return {"results": results, "n_ok": sum(r.get("decision") == "OK" for r in results),
                "n_nok": sum(r.get("decision") == "NOK" for r in results),
                "n_errors": sum("error" in r for r in results)}
