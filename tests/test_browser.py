"""The operator page in a real browser: headless Debian chromium driven by Playwright.

Loads the page from a live server, uploads an image through the file input, waits for the
heat-map overlay, saves a screenshot and checks that it shows the decision and is not blank.
Skips only when /usr/bin/chromium is absent (scripts/setup.sh --dev installs it as root).
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium, or scripts/setup.sh --dev as root)",
                allow_module_level=True)
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")

from nferd.data.images import load_image  # noqa: E402
from nferd.deploy.predict import Predictor  # noqa: E402
from nferd.deploy.serve import create_app  # noqa: E402
from nferd.engine.calibration import fit_normal  # noqa: E402
from nferd.models.nferd import NFERD, ModelConfig  # noqa: E402
from tests.test_serve import serve_in_thread  # noqa: E402

# Offline sandbox: without the background-networking flags chromium tries (refused) connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_server(synth_root: Path):  # type: ignore[no-untyped-def]
    """An untrained 64 px model with banks and calibration from the synthetic good images: the page
    only needs real maps and a decision, not a good detector."""
    torch.manual_seed(0)
    model = NFERD(ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2)).eval()
    train = sorted((synth_root / "synthetic_tiles" / "train" / "good").glob("*.png"))
    images = torch.stack([load_image(p, 64) for p in train[:8]])
    with torch.no_grad():
        model.fill_banks([t[:4] for t in model.teacher(images)], torch.arange(4))
    predictor = Predictor(model, None, device="cpu", memory_images=[str(p) for p in train[:4]])
    maps, scores = predictor.maps(images[4:])
    predictor.calibration = fit_normal(scores, maps)
    with serve_in_thread(create_app(predictor)) as url:
        yield url


def launch(pw):  # type: ignore[no-untyped-def]
    return pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def test_upload_shows_decision_and_heatmap(page_server: str, synth_root: Path, tmp_path: Path) -> None:
    image = min((synth_root / "synthetic_tiles" / "test" / "scratch").glob("*.png"))
    with image.open("rb") as f:
        api = httpx.post(f"{page_server}/predict", files={"file": (image.name, f, "image/png")}, timeout=60).json()
    with sync_api.sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(page_server + "/")
            # Selector waits, not wait_for_function: Playwright evaluates a function string with eval,
            # which the page's CSP (no 'unsafe-eval', on purpose) refuses on some chromium builds.
            page.locator("#model", has_text="teacher").wait_for(timeout=30_000)
            page.set_input_files("#file", str(image))
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            overlay = page.locator("#overlay")
            assert overlay.is_visible()
            src = overlay.get_attribute("src") or ""
            assert src.startswith("data:image/png;base64,")
            assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (64, 64)
            decision = page.inner_text("#decision").strip()
            assert decision == {"OK": "OK", "NOK": "NOT OK"}[api["decision"]]  # the API's answer, shown
            assert page.inner_text("#fname") == image.name
            assert page.inner_text("#score") == f"{api['score']:.4f}"
            # the line panel: the last decisions with thumbnails, newest first, and the drift state
            page.locator("#recent figure").first.wait_for(timeout=30_000)
            first = page.locator("#recent figure").first
            assert (first.locator("img").get_attribute("src") or "").startswith("data:image/png;base64,")
            assert first.get_attribute("class") == api["decision"]
            if api["decision"] == "NOK":  # why: this region beside the closest normal one, from a named image
                assert page.locator("#nearest").is_visible()
                assert api["nearest_normal"]["normal_image"] in page.inner_text("#whytext")
            assert page.inner_text("#drift") == "unavailable"  # this calibration holds no normal scores
            assert "nferd calibrate" in page.inner_text("#driftinfo")
            shot = Path(os.environ.get("NFERD_SCREENSHOTS", tmp_path)) / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            overlay_shot = overlay.screenshot()
        finally:
            browser.close()
    assert not problems, problems  # no script errors, no CSP violations
    whole = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    region = np.asarray(Image.open(io.BytesIO(overlay_shot)).convert("RGB"), dtype=np.float32)
    assert whole.std() > 10, "the page screenshot is blank"
    assert region.shape[0] > 50 and region.std() > 10, "the overlay region is blank"
    assert (np.abs(region[..., 0] - region[..., 2]) > 30).mean() > 0.05  # heat-map colours, not grey


def test_a_non_image_shows_the_reason(page_server: str, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image\n" * 10)
    with sync_api.sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page()
            page.goto(page_server + "/")
            page.set_input_files("#file", str(text))
            page.wait_for_selector("body[data-state=error]", timeout=60_000)
            assert page.inner_text("#decision").strip() == "ERROR"
            msg = page.inner_text("#error")
            assert "415" in msg and "not a PNG/JPEG/BMP/TIFF/WEBP image" in msg
            assert not page.locator("#images").is_visible()
            # in the line panel the rejected upload says why, and shows no broken-image icon
            rejected = page.locator("#recent figure", has=page.locator(".nothumb")).first
            rejected.wait_for(timeout=30_000)
            assert rejected.locator("img").count() == 0
            assert "not a PNG/JPEG/BMP/TIFF/WEBP image" in rejected.locator(".why").inner_text()
            page.screenshot(path=str(Path(os.environ.get("NFERD_SCREENSHOTS", tmp_path)) / "rejected.png"),
                            full_page=True)
        finally:
            browser.close()
