"""Admission: what gets into the service and runs. A bounded number of requests, image memory
reserved from one budget before decoding, one model thread and one post-processing thread, and,
at start, only a model that is finite on a synthetic image."""

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .errors import ClientGone, ModelOutputError
from .protocol import ServedPredictor, tiled
from .results import check_finite

DISCONNECT_POLL_S = 0.1  # how often a waiting request checks that its client is still there


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

    def __init__(self, predictor: ServedPredictor, max_queue: int) -> None:
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
            by_tile = tiled(self.predictor)
            if by_tile is not None:  # maps at the images' own sizes, tile by tile
                maps, scores = by_tile.batch_maps(batch)
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


def self_check(predictor: ServedPredictor) -> None:
    """Refuse a model whose map or score is NaN or infinite on a synthetic mid-grey image."""
    size = int(predictor.size)
    maps, scores = predictor.maps(torch.full((1, 3, size, size), 0.5))
    try:
        check_finite(np.asarray(maps)[0], float(np.asarray(scores).reshape(-1)[0]), "a synthetic grey image")
    except ModelOutputError as e:
        raise ModelOutputError(f"not serving: {e}") from None
