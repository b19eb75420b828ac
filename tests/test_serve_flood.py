"""Request bodies of the inspection service are bounded before and while they are parsed.

The app runs in this process (httpx ASGITransport, which pulls the request body from the client's
generator only as the app reads it, so a test can count how much of a body the service read). A
body whose Content-Length is over the limit is refused before a byte is read; a chunked or lying
body is refused as it passes the limit; a form with more parts than the route takes is refused as
the first extra part begins, not after the whole body was parsed; uploads are spooled to disk,
so receiving files just under Starlette's 1 MiB in-memory threshold does not hold them in memory.
The measurement with the real server under a flood is in docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from nferd.deploy import serve  # noqa: E402
from nferd.deploy.predict import Predictor  # noqa: E402
from nferd.deploy.serve import body as serve_body  # noqa: E402

BOUNDARY = "nferdfloodtest"
CTYPE = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
DRAIN = 64 * 1024  # DRAIN_CAP in these tests, so that "read little of the body" is a tight bound
CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint)


@pytest.fixture(autouse=True)
def _small_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_body, "DRAIN_CAP", DRAIN)  # the module whose BodyLimit reads it


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None, name: str = "files"
              ) -> list[bytes]:
    """A multipart body as pieces of at most CHUNK bytes (what the client sends, one piece at a time)."""
    out: list[bytes] = []
    for key, value in (fields or {}).items():
        out.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        out.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   'Content-Type: image/png\r\n\r\n'.encode())
        out += [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
        out.append(b"\r\n")
    out.append(f"--{BOUNDARY}--\r\n".encode())
    return out


class Body:
    """An async request body that counts the bytes the service pulled from it."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces, self.size, self.pulled = pieces, sum(map(len, pieces)), 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            self.pulled += len(piece)
            yield piece


async def _post(app: Any, requests: list[tuple[str, Body, dict[str, str]]]) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):  # once per app: its end stops the app's worker threads
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://nferd.test", timeout=120) as client:
            return [await client.post(path, content=body, headers={**CTYPE, **headers})
                    for path, body, headers in requests]


def post(app: Any, path: str, body: Body, **headers: str) -> httpx.Response:
    return asyncio.run(_post(app, [(path, body, headers)]))[0]


def detail(r: httpx.Response) -> str:
    return json.loads(r.text)["detail"]


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(predictor) -> None:
    app = serve.create_app(predictor, max_upload_bytes=256 * 1024, max_batch_files=4, warmup=False)
    limit = 4 * (256 * 1024 + serve.MULTIPART_SLACK)
    body = Body(multipart([(f"{i}.png", b"x" * 200_000) for i in range(20)]))
    r = post(app, "/predict/batch", body, **{"content-length": str(body.size)})
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert f"request body of {body.size} bytes is over the limit of {limit} bytes" in detail(r)
    assert "4 file(s) of at most 262144 bytes" in detail(r)
    assert body.pulled <= DRAIN + CHUNK  # only what is drained so that the client reads the answer


def test_a_chunked_or_lying_body_over_the_limit_is_refused_as_it_arrives(predictor) -> None:
    app = serve.create_app(predictor, max_upload_bytes=256 * 1024, max_batch_files=2, warmup=False)
    limit = 2 * (256 * 1024 + serve.MULTIPART_SLACK)
    pieces = multipart([("big.png", b"x" * 4_000_000)])
    for headers in ({}, {"content-length": "1000"}):  # no Content-Length (chunked), one that lies
        body = Body(pieces)
        r = post(app, "/predict/batch", body, **headers)
        assert r.status_code == 413 and f"passed the limit of {limit} bytes" in detail(r), headers
        assert body.pulled <= limit + CHUNK + DRAIN + CHUNK, headers


def test_a_form_with_too_many_parts_is_refused_as_the_first_extra_part_begins(predictor) -> None:
    """300 small files to a batch route that takes 4: 413 after 4 + FORM_FIELDS parts, not after 300.
    (Before, the whole body was parsed, every file held in memory, and only then counted.)"""
    app = serve.create_app(predictor, max_upload_bytes=1 << 20, max_batch_files=4, warmup=False)
    part = b"x" * 10_000
    body = Body(multipart([(f"{i}.png", part) for i in range(300)]))
    assert body.size < 4 * ((1 << 20) + serve.MULTIPART_SLACK)  # under the body limit: only the parts count
    r = post(app, "/predict/batch", body)
    max_parts = 4 + serve.FORM_FIELDS
    assert r.status_code == 413, r.text
    assert detail(r) == (f"the form has more than {max_parts} parts; /predict/batch takes at most 4 file(s) and "
                         f"{serve.FORM_FIELDS} other fields")
    assert r.headers.get("connection") == "close"
    assert body.pulled <= (max_parts + 1) * (len(part) + 200) + DRAIN + CHUNK, (body.pulled, body.size)

    one = serve.create_app(predictor, max_upload_bytes=1 << 20, warmup=False)
    body = Body(multipart([(f"{i}.png", part) for i in range(50)], name="file"))
    r = post(one, "/predict", body)
    assert r.status_code == 413 and "/predict takes at most 1 file(s)" in detail(r)
    assert body.pulled < body.size // 2


def test_a_few_files_over_the_batch_limit_and_extra_fields(predictor, synth_root) -> None:
    """Within the parts limit the endpoint still counts the files (413 naming --max-batch-files), and
    a small extra form field is ignored as before."""
    png = min((synth_root / "synthetic_tiles" / "test" / "good").glob("*.png")).read_bytes()
    app = serve.create_app(predictor, max_upload_bytes=1 << 20, max_batch_files=4, warmup=False)
    over, fields = asyncio.run(_post(app, [
        ("/predict/batch", Body(multipart([(f"{i}.png", png) for i in range(6)])), {}),
        ("/predict", Body(multipart([("a.png", png)], {"line": "7", "station": "B"}, name="file")), {})]))
    assert over.status_code == 413 and detail(over) == "6 files sent; the limit is 4 per batch request"
    assert fields.status_code == 200 and json.loads(fields.text)["decision"] in ("OK", "NOK")


def test_uploads_just_under_one_mib_are_spooled_to_disk_not_held_in_memory(predictor) -> None:
    """12 files of 1 MiB - 4 KiB: Starlette alone keeps each in memory (its spool threshold is 1 MiB),
    12 MiB for this request; spooled beyond SPOOL_BYTES, receiving it allocates a few MiB at most."""
    app = serve.create_app(predictor, max_upload_bytes=2 << 20, max_batch_files=12, warmup=False)
    blob = b"\x89" * ((1 << 20) - 4096)
    body = Body(multipart([(f"{i}.png", blob) for i in range(12)]))

    async def measured() -> tuple[httpx.Response, int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://nferd.test", timeout=120) as client:
                tracemalloc.start()
                try:
                    r = await client.post("/predict/batch", content=body, headers=CTYPE)
                    return r, tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()

    r, peak = asyncio.run(measured())
    assert r.status_code == 200 and body.pulled == body.size
    res = json.loads(r.text)["results"]
    assert len(res) == 12 and all(x["status"] == 415 for x in res)  # received whole; not images
    assert peak < 4 * 2**20, f"receiving 12 MiB of uploads allocated {peak / 2**20:.1f} MiB"
