"""Memory of the inspection service: one image-memory budget shared by every request in flight.

The app runs in this process (httpx ASGITransport, lifespan included) with a random-weight 64 px
model. Eight concurrent 4000 x 4000 16-bit PNG uploads with overlay and mask, against a budget
that holds two of them and a queue that holds four: the reservations never pass the budget, two
requests wait for memory, four are refused with 503, and the peak RSS (VmHWM, reset through
/proc/self/clear_refs) grows by less than the budget plus a fixed allowance. Also: the per-mode
decode costs cover the measured decode peak, an image larger than the whole budget is refused
with 413, and the banded defect-area count equals the full-size mask's.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from nferd.deploy.predict import Predictor, resize_map  # noqa: E402
from nferd.deploy.serve import (  # noqa: E402
    Header,
    Limits,
    create_app,
    decode_cost,
    decode_upload,
    defect_area,
    read_header,
    resized_rows,
    trim_memory,
)
from nferd.engine.calibration import Calibration  # noqa: E402
from nferd.models.nferd import NFERD, ModelConfig  # noqa: E402

MiB = 1024 * 1024
SIDE = 4000  # the large uploads: SIDE x SIDE 16-bit grey PNGs
ALLOWANCE = 128 * MiB  # RSS growth allowed above the budget: post-processing, threads, the client's buffers
PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as strict JSON parsers do."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def rss_bytes(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", PROC_STATUS.read_text()).group(1)) * 1024  # type: ignore[union-attr]


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux 4.0+); False where that is not possible."""
    if sys.platform != "linux":
        return False
    trim_memory()
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """A random-weight 64 px model with filled banks and a calibration from its own maps: the test
    needs real maps, masks and decisions, not a good detector."""
    torch.manual_seed(0)
    model = NFERD(ModelConfig(image_size=64, n_bank=4, top_k=2), teacher_weights="random").eval()
    images = torch.rand(8, 3, 64, 64)
    with torch.no_grad():
        model.fill_banks([t[:4] for t in model.teacher(images[:4])], torch.arange(4))
    pred = Predictor(model, None, device="cpu")
    maps, scores = pred.maps(images[4:])
    pred.calibration = Calibration(image_threshold=float(np.median(scores)), score_min=float(scores.min()),
                                   pixel_threshold=float(np.quantile(maps, 0.9)), pixel_median=float(np.median(maps)))
    return pred


def grey16_png(side: int) -> bytes:
    """A smooth 16-bit grey ramp: large in pixels, about 2 MiB as PNG (under the upload limit)."""
    ramp = np.arange(side, dtype=np.uint32) * 65535 // (2 * side)
    arr = np.add.outer(ramp, ramp).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


async def post_all(app: Any, data: bytes, n: int) -> tuple[list[httpx.Response], dict[str, Any], int]:
    """``n`` concurrent /predict uploads with overlay and mask; the responses, /health after, the RSS growth."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://nferd.test", timeout=300) as client:
            measured = reset_peak_rss()
            before = rss_bytes("VmRSS") if measured else 0
            responses = await asyncio.gather(*[
                client.post("/predict", params={"overlay": "true", "mask": "true"},
                            files={"file": (f"big{i}.png", data, "image/png")}) for i in range(n)])
            growth = rss_bytes("VmHWM") - before if measured else -1
            health = (await client.get("/health")).json()
    return responses, health, growth


def test_concurrent_large_uploads_stay_within_the_image_memory_budget(predictor) -> None:
    data = grey16_png(SIDE)
    assert len(data) < Limits().max_upload_bytes
    work, keep = decode_cost(Header("big.png", SIDE, SIDE, "PNG", "I;16"), predictor.size, 1024, True, True)
    one = work + keep
    budget = 2 * one + MiB  # room for two decodes at a time, not three
    capacity = 4  # max_queue=3: four requests inside, the other four refused at once
    app = create_app(predictor, max_queue=capacity - 1, max_image_memory_bytes=budget)
    responses, health, growth = asyncio.run(post_all(app, data, 8))

    codes = [r.status_code for r in responses]
    assert sorted(codes) == [200] * capacity + [503] * (8 - capacity), [r.text[:200] for r in responses]
    for r in responses:
        body = strict_loads(r.text)
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "busy" in body["detail"]
            continue
        assert body["decision"] in ("OK", "NOK") and body["image"]["width"] == SIDE
        assert body["defect_area_fraction"] == pytest.approx(body["defect_area_px"] / SIDE**2)
        # overlay and mask at the capped size, and the response says which
        assert body["overlay_size"] == {"width": 1024, "height": 1024}
        for key, shape in (("overlay_png_base64", (1024, 1024, 3)), ("mask_png_base64", (1024, 1024))):
            assert np.asarray(Image.open(io.BytesIO(base64.b64decode(body[key])))).shape == shape
    mem = health["image_memory"]
    assert mem["limit_bytes"] == budget and mem["reserved_bytes"] == 0  # everything given back
    assert mem["peak_reserved_bytes"] <= budget  # the accounting never passed the budget ...
    assert mem["peak_reserved_bytes"] == 2 * one  # ... and two decodes did run side by side
    assert mem["waits"] == capacity - 2  # the other two admitted requests waited for memory
    assert health["rejected_busy"] == 8 - capacity and health["images_scored"] == capacity
    if growth < 0:
        pytest.skip("peak RSS not measurable here (needs Linux /proc/self/clear_refs)")
    print(f"\n[serve memory] 8 x {SIDE} x {SIDE} 16-bit PNG, budget {budget / MiB:.0f} MiB: "
          f"peak RSS growth {growth / MiB:.0f} MiB")
    # four 16-bit decodes at once (no budget) grow RSS by about 1 GB here; within the budget, under 0.6 GB
    assert growth <= budget + ALLOWANCE, f"RSS grew by {growth / MiB:.0f} MiB"


def measure_decode(mode: str) -> tuple[int, int] | None:
    """(peak RSS growth while decoding a 2000 x 2000 image of ``mode``, its ``decode_cost``), or None
    where the peak cannot be measured."""
    if not reset_peak_rss():
        return None
    side = 2000
    ramp = np.add.outer(np.arange(side), np.arange(side)) / (2 * side)
    grey8 = (ramp * 255).astype(np.uint8)
    if mode == "L":
        image = Image.fromarray(grey8)
    elif mode == "RGB":
        image = Image.fromarray(np.stack([grey8] * 3, -1))
    elif mode == "RGBA":
        image = Image.fromarray(np.stack([grey8] * 4, -1))
    elif mode == "I;16":
        image = Image.fromarray((ramp * 65535).astype(np.uint16))
    elif mode == "I":
        image = Image.fromarray((ramp * 65535).astype(np.int32))
    elif mode == "F":
        image = Image.fromarray(ramp.astype(np.float32))
    else:
        raise KeyError(mode)
    buf = io.BytesIO()
    image.save(buf, format="TIFF" if mode in ("I", "F") else "PNG")
    del image, ramp, grey8
    limits = Limits(max_upload_bytes=64 * MiB)
    head = read_header(buf, "x", limits)
    assert head.mode == mode
    work, _ = decode_cost(head, 64, limits.overlay_max_side, True, True)
    reset_peak_rss()
    before = rss_bytes("VmRSS")
    decoded = decode_upload(buf, head, 64, limits, want_display=True)
    growth = rss_bytes("VmHWM") - before
    assert decoded.tensor.shape == (3, 64, 64) and decoded.display is not None
    return growth, work


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "I", "F"])
def test_decode_cost_covers_the_measured_decode_peak(mode: str) -> None:
    """Measured in a fresh interpreter: the heap that earlier tests leave behind (allocator arenas,
    runtime thread pools) must not count against one decode."""
    import subprocess
    code = ("import json; from tests.test_serve_memory import measure_decode; "
            f"print(json.dumps(measure_decode({mode!r})))")
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    measured = json.loads(p.stdout.strip().splitlines()[-1])
    if measured is None:
        pytest.skip("peak RSS not measurable here (needs Linux /proc/self/clear_refs)")
    growth, work = measured
    # the allocator's own state adds a few MiB
    assert growth <= work + 32 * MiB, f"{mode}: decoding took {growth / MiB:.0f} MiB; its cost is {work / MiB:.0f} MiB"


def test_an_image_larger_than_the_whole_budget_is_refused_with_413(predictor) -> None:
    app = create_app(predictor, max_image_memory_bytes=4 * MiB, warmup=False)
    small = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(small, format="PNG")
    large = io.BytesIO()
    Image.fromarray(np.zeros((1000, 1000, 3), np.uint8)).save(large, format="PNG")

    async def go() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nferd.test") as c:
            one = await c.post("/predict", files={"file": ("large.png", large.getvalue(), "image/png")})
            batch = await c.post("/predict/batch", files=[("files", ("large.png", large.getvalue(), "image/png")),
                                                          ("files", ("small.png", small.getvalue(), "image/png"))])
            fine = await c.post("/predict", files={"file": ("small.png", small.getvalue(), "image/png")})
        return one, batch, fine

    one, batch, fine = asyncio.run(go())
    assert one.status_code == 413 and "image memory is 4 MiB" in strict_loads(one.text)["detail"]
    res = strict_loads(batch.text)["results"]
    assert res[0]["status"] == 413 and "decision" not in res[0] and res[1]["decision"] in ("OK", "NOK")
    assert fine.status_code == 200


def test_banded_defect_area_equals_the_full_size_mask() -> None:
    torch.manual_seed(0)
    amap = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8), size=(64, 64), mode="bilinear")[0, 0].numpy()
    for hw in ((3000, 2000), (2001, 2999), (4500, 1000)):
        full = resize_map(amap, hw)
        bands = np.concatenate([resized_rows(amap, hw, r, min(hw[0], r + 777)) for r in range(0, hw[0], 777)])
        # the same floats as torch on x86-64; one ulp elsewhere
        np.testing.assert_allclose(bands, full, rtol=1e-6, atol=1e-7)
        threshold = float(np.quantile(full, 0.7))
        expected = int((full > threshold).sum())
        assert abs(defect_area(amap, hw, threshold) - expected) <= hw[0] * hw[1] * 1e-6, hw
