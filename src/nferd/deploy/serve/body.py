"""Request bodies bounded before and while they are parsed, not after.

``BodyLimit`` (ASGI middleware) answers 413 when Content-Length, or the bytes actually received
(chunked uploads too), pass the route's limit; ``upload_route`` makes the multipart parser stop
at the first part beyond the route's files plus FORM_FIELDS, and spool every part beyond
SPOOL_BYTES to a temporary file, so a body holds at most parts x SPOOL_BYTES in memory.
"""

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

from .limits import MULTIPART_SLACK, Limits
from .responses import strict_json

SPOOL_BYTES = 64 * 1024  # an uploaded file moves from memory to a temporary file on disk beyond this
FORM_FIELDS = 8  # non-file form fields accepted (and ignored) besides the files, MULTIPART_SLACK bytes each
DRAIN_CAP = 8 * 1024 * 1024  # bytes of an oversize body read and dropped so the client sees the 413
DRAIN_SECONDS = 5.0


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
