"""The inspection service over real HTTP: a uvicorn server on 127.0.0.1 and httpx clients.

Covers scoring (same numbers as the Python API), upload limits (413), non-images and truncated
images (415/400 with a reason), batches with a broken file, 200 requests from 8 concurrent
clients (p50/p95 printed; run with -s), the bounded queue (503 + Retry-After), clients that
disconnect (dropped before inference), NaN or infinite model output (500, an error entry, /health
unhealthy, strict JSON, no start with such a model), /health, /metadata, the page, and
`nferd serve` as a subprocess. Memory under large uploads: tests/test_serve_memory.py.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

import nferd  # noqa: E402
from nferd.deploy.predict import Predictor  # noqa: E402
from nferd.deploy.serve import ModelOutputError, create_app, self_check  # noqa: E402
from nferd.engine.checkpoint import read_metadata  # noqa: E402

UPLOAD_LIMIT = 256 * 1024


def make_tiny_checkpoint(synth_root: Path, out: Path) -> Path:
    """One epoch at 64 px with the EfficientNet-Lite0 teacher: enough to exercise the service."""
    from nferd.data.datasets import MVTecDataset
    from nferd.engine.train import TrainConfig, train
    from nferd.models.nferd import ModelConfig
    ds = MVTecDataset(synth_root, "synthetic_tiles", "train", 64)
    train(ds, ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2),
          TrainConfig(epochs=1, batch_size=4, holdout=0.25), out, progress=False)
    return out


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a socket bound to a free port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def sample_images(synth_root: Path) -> dict[str, Path]:
    test = synth_root / "synthetic_tiles" / "test"
    return {"good": min((test / "good").glob("*.png")), "scratch": min((test / "scratch").glob("*.png"))}


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as strict JSON parsers do."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(synth_root, tmp_path_factory.mktemp("serve") / "ckpt")


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint: Path, predictor: Predictor) -> Iterator[str]:
    app = create_app(predictor, read_metadata(checkpoint), max_upload_bytes=UPLOAD_LIMIT, max_queue=16)
    with serve_in_thread(app) as url:
        yield url


def post_image(url: str, path: Path, params: dict[str, str] | None = None) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(f"{url}/predict", files={"file": (path.name, f, "image/png")}, params=params, timeout=60)


def test_good_and_defective_images_are_scored_like_the_python_api(server, predictor, synth_root) -> None:
    cal = predictor.calibration
    assert cal is not None
    for kind, path in sample_images(synth_root).items():
        r = post_image(server, path, {"overlay": "true", "mask": "true"})
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["filename"] == path.name
        assert res["image"] == {"width": 64, "height": 64, "format": "PNG", "mode": "RGB"}
        # the same score as `nferd predict` / Predictor.predict_paths for this file
        ref = next(predictor.predict_paths([path]))
        assert res["score"] == pytest.approx(ref["score"], rel=1e-5), kind
        assert res["decision"] == ("NOK" if res["score"] > cal.image_threshold else "OK")
        assert res["normalized_score"] == pytest.approx(float(cal.normalize(res["score"])), abs=1e-9)
        assert (res["normalized_score"] > 0.5) == (res["decision"] == "NOK")
        # defect area at the image's own size, and the mask PNG says the same
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["mask_png_base64"]))))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert int((mask == 255).sum()) == res["defect_area_px"]
        assert res["defect_area_fraction"] == pytest.approx(res["defect_area_px"] / (64 * 64))
        ov = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["overlay_png_base64"]))))
        assert ov.shape == (64, 64, 3) and ov.std() > 1.0
        assert res["overlay_size"] == {"width": 64, "height": 64}  # a small image keeps its own size
        t = res["timings_ms"]
        assert all(t[k] >= 0 for k in ("decode", "queue", "inference", "postprocess", "total"))
        assert t["total"] >= t["inference"]
    plain = post_image(server, sample_images(synth_root)["good"]).json()
    assert "overlay_png_base64" not in plain and "mask_png_base64" not in plain


def test_oversize_upload_is_413_by_header_and_by_bytes_read(server, synth_root) -> None:
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))
    assert len(big) > UPLOAD_LIMIT + 64 * 1024
    r = httpx.post(f"{server}/predict", files={"file": ("big.png", big, "image/png")}, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    # chunked upload: no Content-Length, so the bytes actually received are counted
    boundary = "nferdtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 32 * 1024):
            yield body[i:i + 32 * 1024]

    r = httpx.post(f"{server}/predict", content=chunks(), timeout=60,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    # the service is still fine afterwards
    assert post_image(server, sample_images(synth_root)["good"]).status_code == 200


def test_non_images_and_truncated_images_are_refused_with_a_reason(server, synth_root) -> None:
    r = httpx.post(f"{server}/predict", files={"file": ("notes.png", b"this is text, not a picture\n" * 20,
                                                         "image/png")}, timeout=60)
    assert r.status_code == 415 and "not a PNG/JPEG/BMP/TIFF/WEBP image" in r.json()["detail"]
    data = sample_images(synth_root)["good"].read_bytes()
    r = httpx.post(f"{server}/predict", files={"file": ("cut.png", data[:len(data) // 2], "image/png")},
                   timeout=60)
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert "cut.png" in detail and ("truncated" in detail or "corrupt" in detail), detail
    r = httpx.post(f"{server}/predict", files={"file": ("empty.png", b"", "image/png")}, timeout=60)
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = httpx.post(f"{server}/predict", files={"other": ("x.png", data, "image/png")}, timeout=60)
    assert r.status_code == 422  # no `file` field


def test_batch_scores_the_good_files_and_reports_the_broken_one(server, synth_root) -> None:
    imgs = sample_images(synth_root)
    good, bad = imgs["good"].read_bytes(), imgs["scratch"].read_bytes()
    files = [("files", ("a.png", good, "image/png")), ("files", ("b.txt", b"hello", "text/plain")),
             ("files", ("c.png", bad[:200], "image/png")), ("files", ("d.png", bad, "image/png"))]
    r = httpx.post(f"{server}/predict/batch", files=files, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    res = out["results"]
    assert [x["filename"] for x in res] == ["a.png", "b.txt", "c.png", "d.png"]
    assert res[1]["status"] == 415 and res[2]["status"] == 400 and "error" in res[1] and "error" in res[2]
    assert out["n_errors"] == 2 and out["n_ok"] + out["n_nok"] == 2
    single = {n: post_image(server, imgs[n]).json()["score"] for n in ("good", "scratch")}
    assert res[0]["score"] == pytest.approx(single["good"], rel=1e-4)
    assert res[3]["score"] == pytest.approx(single["scratch"], rel=1e-4)


def test_200_requests_from_8_concurrent_clients_all_succeed(server, synth_root) -> None:
    paths = sorted((synth_root / "synthetic_tiles" / "test").glob("*/*.png"))
    payloads = [(p.name, p.read_bytes()) for p in paths]
    before = httpx.get(f"{server}/health").json()["images_scored"]
    latencies: list[float] = []
    lock = threading.Lock()

    def client(worker: int) -> list[int]:
        codes = []
        with httpx.Client(base_url=server, timeout=120) as c:
            for i in range(worker, 200, 8):
                name, data = payloads[i % len(payloads)]
                t0 = time.perf_counter()
                r = c.post("/predict", files={"file": (name, data, "image/png")})
                dt = time.perf_counter() - t0
                codes.append(r.status_code)
                if r.status_code == 200:
                    assert r.json()["decision"] in ("OK", "NOK")
                with lock:
                    latencies.append(dt)
        return codes

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        codes = [c for chunk in pool.map(client, range(8)) for c in chunk]
    wall = time.perf_counter() - t0
    assert len(codes) == 200 and set(codes) == {200}
    assert httpx.get(f"{server}/health").json()["images_scored"] - before == 200
    ms = np.array(latencies) * 1000
    print(f"\n[serve] 200 requests, 8 concurrent clients, 64 px: p50 {np.percentile(ms, 50):.1f} ms, "
          f"p95 {np.percentile(ms, 95):.1f} ms, max {ms.max():.1f} ms, {200 / wall:.1f} req/s ({wall:.1f} s)")


class GatedPredictor:
    """Wraps a predictor; every forward pass waits for ``gate``, so the queue fills deterministically."""

    def __init__(self, inner: Predictor) -> None:
        self.inner, self.gate, self.calls = inner, threading.Event(), 0
        self.calibration, self.size = inner.calibration, inner.size

    def maps(self, images):  # type: ignore[no-untyped-def]
        self.calls += 1
        if not self.gate.wait(60):
            raise TimeoutError("test gate never opened")
        return self.inner.maps(images)

    def decide(self, score: float) -> dict[str, Any]:
        return self.inner.decide(score)


def test_a_full_queue_answers_503_with_retry_after(predictor, synth_root) -> None:
    gated = GatedPredictor(predictor)
    app = create_app(gated, max_queue=1, warmup=False)
    data = sample_images(synth_root)["good"].read_bytes()
    with serve_in_thread(app) as url, ThreadPoolExecutor(2) as pool:
        def post() -> httpx.Response:
            return httpx.post(f"{url}/predict", files={"file": ("g.png", data, "image/png")}, timeout=90)

        try:
            first = pool.submit(post)
            second = pool.submit(post)
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/health").json()["in_flight"] < 2:  # one running, one waiting
                assert time.monotonic() < deadline, "the two requests never got in"
                time.sleep(0.02)
            r = post()
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["detail"]
            health = httpx.get(f"{url}/health").json()
            assert health["rejected_busy"] == 1 and health["capacity"] == 2
        finally:
            gated.gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert post().status_code == 200  # room again once the queue drained


def test_a_client_that_disconnects_is_dropped_before_inference(predictor, synth_root) -> None:
    gated = GatedPredictor(predictor)
    app = create_app(gated, max_queue=4, warmup=False)
    data = sample_images(synth_root)["good"].read_bytes()
    with serve_in_thread(app) as url, ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(lambda: httpx.post(f"{url}/predict", files={"file": ("a.png", data, "image/png")},
                                                   timeout=90))
            deadline = time.monotonic() + 30
            while gated.calls < 1:  # the first forward pass has started and holds the model worker
                assert time.monotonic() < deadline, "the first request never reached the model"
                time.sleep(0.02)
            # the second client gives up after 1 s and closes its connection while its image waits
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/predict", files={"file": ("b.png", data, "image/png")},
                           timeout=httpx.Timeout(30, read=1.0))
            while httpx.get(f"{url}/health").json()["dropped_disconnected"] < 1:
                assert time.monotonic() < deadline, "the request of the gone client was not dropped"
                time.sleep(0.05)
            assert gated.calls == 1
        finally:
            gated.gate.set()
        assert first.result().status_code == 200
        health = httpx.get(f"{url}/health").json()
    assert gated.calls == 1 and health["images_scored"] == 1  # no forward pass for the gone client
    assert health["dropped_disconnected"] == 1 and health["in_flight"] == 0


class PoisonedPredictor:
    """Wraps a predictor; images brighter than 0.9 on average (or all, ``which="all"``) get a NaN or
    infinite score or a NaN in their map, as a broken checkpoint would give."""

    def __init__(self, inner: Predictor, what: str, which: str = "bright") -> None:
        self.inner, self.what, self.which = inner, what, which
        self.calibration, self.size = inner.calibration, inner.size

    def maps(self, images):  # type: ignore[no-untyped-def]
        maps, scores = self.inner.maps(images)
        maps, scores = maps.copy(), scores.copy()
        bad = np.ones(len(images), bool) if self.which == "all" else images.mean(dim=(1, 2, 3)).numpy() > 0.9
        if self.what == "map":
            maps[bad, 3, 5] = np.nan
        else:
            scores[bad] = {"nan": np.nan, "inf": np.inf}[self.what]
        return maps, scores

    def decide(self, score: float) -> dict[str, Any]:
        return self.inner.decide(score)


@pytest.mark.parametrize("what", ["nan", "inf", "map"])
def test_a_non_finite_map_or_score_is_an_error_never_a_decision(predictor, synth_root, what) -> None:
    app = create_app(PoisonedPredictor(predictor, what), warmup=False)
    white = png_bytes(np.full((64, 64, 3), 255, np.uint8))
    good = sample_images(synth_root)["good"].read_bytes()
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/predict", params={"overlay": "true", "mask": "true"},
                       files={"file": ("white.png", white, "image/png")}, timeout=60)
        assert r.status_code == 500 and "OK" not in r.text
        assert "white.png" in strict_loads(r.text)["detail"] and "NaN or infinite" in r.text
        h = httpx.get(f"{url}/health")
        assert h.status_code == 503
        health = strict_loads(h.text)
        assert health["status"] == "unhealthy" and health["non_finite_outputs"] == 1

        r = httpx.post(f"{url}/predict/batch", files=[("files", ("good.png", good, "image/png")),
                                                       ("files", ("white.png", white, "image/png"))], timeout=60)
        assert r.status_code == 200
        out = strict_loads(r.text)
        ok, bad = out["results"]
        assert ok["decision"] in ("OK", "NOK") and math.isfinite(ok["score"])
        assert bad["status"] == 500 and "decision" not in bad and "score" not in bad and "OK" not in json.dumps(bad)
        assert out["n_errors"] == 1 and out["n_ok"] + out["n_nok"] == 1
        assert httpx.get(f"{url}/health").status_code == 503  # that forward pass had a non-finite image too

        r = httpx.post(f"{url}/predict", files={"file": ("good.png", good, "image/png")}, timeout=60)
        assert r.status_code == 200 and strict_loads(r.text)["decision"] in ("OK", "NOK")
        h = httpx.get(f"{url}/health")
        assert h.status_code == 200 and strict_loads(h.text)["status"] == "ok"  # a finite pass clears it
        assert strict_loads(h.text)["non_finite_outputs"] == 2


def test_a_model_that_is_not_finite_on_a_grey_image_does_not_start(predictor, checkpoint, monkeypatch,
                                                                   capsys) -> None:
    import asyncio

    from nferd.cli import main
    broken = PoisonedPredictor(predictor, "map", which="all")
    with pytest.raises(ModelOutputError, match="not serving"):
        self_check(broken)
    self_check(predictor)  # a sound model passes
    app = create_app(broken)

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pytest.fail("the app started with a model that gives NaN")

    with pytest.raises(ModelOutputError, match="not serving"):
        asyncio.run(start())
    # `nferd serve`: one line naming the problem, no traceback, and it never listens
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(lambda cls, *a, **k: broken))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("uvicorn was started"))
    assert main(["serve", "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "not serving" in err and "NaN or infinite" in err and "Traceback" not in err


def test_a_response_holding_nan_is_a_strict_json_500(predictor) -> None:
    class NanCalibration(PoisonedPredictor):
        def __init__(self) -> None:
            super().__init__(predictor, "nan")
            self.calibration = copy.copy(predictor.calibration)
            object.__setattr__(self.calibration, "pixel_median", float("nan"))  # damaged past every check

    with serve_in_thread(create_app(NanCalibration(), warmup=False)) as url:
        r = httpx.get(f"{url}/metadata")
    assert r.status_code == 500 and "NaN or Infinity at calibration.pixel_median" in strict_loads(r.text)["detail"]


def test_serve_passes_the_image_memory_budget_and_refuses_zero(checkpoint, monkeypatch, capsys) -> None:
    import nferd.deploy.serve as serve
    from nferd.cli import main
    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve, "run", lambda *a, **k: seen.update(k))
    assert main(["serve", "--checkpoint", str(checkpoint), "--max-image-memory-mb", "256"]) == 0
    assert seen["max_image_memory_bytes"] == 256 * 1024 * 1024
    capsys.readouterr()
    seen.clear()
    try:
        code = main(["serve", "--checkpoint", str(checkpoint), "--max-image-memory-mb", "0"])
    except SystemExit as e:  # argparse's own exit, where main does not turn it into a status
        code = e.code
    assert code == 2 and "--max-image-memory-mb" in capsys.readouterr().err and seen == {}  # never served


def test_health_and_metadata(server, checkpoint, predictor, synth_root) -> None:
    assert post_image(server, sample_images(synth_root)["good"]).status_code == 200
    h = httpx.get(f"{server}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["problem"] is None
    mem = h.json()["image_memory"]
    assert mem["limit_bytes"] == 1024 * 1024 * 1024 and mem["reserved_bytes"] == 0
    assert 0 < mem["peak_reserved_bytes"] <= mem["limit_bytes"]  # the image above reserved memory
    r = httpx.get(f"{server}/metadata")
    assert r.status_code == 200
    m = r.json()
    meta = read_metadata(checkpoint)
    assert m["nferd_version"] == nferd.__version__
    assert m["teacher"]["name"] == "efficientnet_lite0" and m["model"] == meta["model"]
    assert m["image_size"] == 64 and m["decision_available"] is True
    cal = predictor.calibration.to_dict()
    flat = {k: v for k, v in cal.items() if not isinstance(v, (dict, list))}
    assert {k: m["calibration"][k] for k in flat} == pytest.approx(flat)
    assert m["calibration"]["normal_scores"] == pytest.approx(cal["normal_scores"])
    assert m["calibration"]["fitted_set"] == cal["fitted_set"] == meta["calibration"]["fitted_set"]
    assert m["limits"]["max_upload_bytes"] == UPLOAD_LIMIT and m["limits"]["max_queue"] == 16
    assert m["limits"]["max_image_memory_bytes"] == 1024 * 1024 * 1024
    assert str(checkpoint.parent) not in r.text  # no server paths leak


def test_page_is_self_contained_and_no_path_serves_files(server) -> None:
    r = httpx.get(f"{server}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="file"' in r.text and 'id="overlay"' in r.text and 'id="decision"' in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing from a CDN
    assert "default-src 'none'" in r.headers["content-security-policy"]
    for path in ("/../../etc/passwd", "/static/serve.py", "/docs", "/%2e%2e/%2e%2e/etc/hostname", "/etc/passwd"):
        assert httpx.get(f"{server}{path}").status_code == 404, path


def test_missing_web_stack_gives_the_install_command(monkeypatch, capsys, tmp_path) -> None:
    from nferd.cli import main
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "uvicorn" in err and "pip install 'nferd[serve]'" in err and "Traceback" not in err


def test_nferd_serve_command_serves_a_checkpoint(checkpoint, synth_root) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen([sys.executable, "-m", "nferd", "serve", "--checkpoint", str(checkpoint), "--port",
                             str(port), "--log-level", "warning"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "nferd serve did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        assert httpx.get(f"{url}/metadata").json()["image_size"] == 64
        r = post_image(url, sample_images(synth_root)["scratch"])
        assert r.status_code == 200 and r.json()["decision"] in ("OK", "NOK")
        assert math.isfinite(r.json()["score"])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_metadata_without_checkpoint_metadata_still_describes_the_model(predictor) -> None:
    from nferd.deploy.serve import public_metadata
    m = public_metadata(predictor, None)
    assert m["model"]["image_size"] == 64 and m["teacher"]["name"] == "efficientnet_lite0"
    assert json.dumps(m)  # JSON-serialisable
