"""Why is it NOK: the nearest normal region named for every scored image is the memory row the
model's own distance was measured to, and it is a real region of the training image it names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nferd.data.images import load_image
from nferd.deploy.explain import NEEDS_MEMORY
from nferd.deploy.predict import Predictor, predict_to_folder
from nferd.models.nferd import NFERD, ModelConfig

CAT = "synthetic_tiles"


def defective(synth_root: Path) -> Path:
    return min((synth_root / CAT / "test" / "scratch").glob("*.png"))


def test_the_named_row_is_the_nearest_and_comes_from_the_named_image(tiny_checkpoint, synth_root) -> None:
    pred = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")
    path = defective(synth_root)
    (res,) = pred.predict_paths([path])
    near = res["nearest_normal"]
    assert near["available"] and Path(near["normal_path"]).is_file()
    model, memory = pred.model, pred.model.memory
    x = load_image(path, model.config.image_size)[None]
    with torch.no_grad():
        t = model.teacher(x)
        f = memory.features(t)
        own = memory.distance(t)[0, 0]  # the model's own (blocked) nearest-row search
    gy, gx = near["input_cell"]
    # the cell is where the map peaks
    h, w = f.shape[-2:]
    py, px = np.unravel_index(int(np.argmax(res["map"])), res["map"].shape)
    assert (gy, gx) == (int(py) * h // res["map"].shape[0], int(px) * w // res["map"].shape[1])
    brute = ((memory.rows - f[0, :, gy, gx]) ** 2).sum(1).sqrt()
    assert near["memory_row"] == int(brute.argmin())
    assert near["distance"] == pytest.approx(float(brute.min()), rel=1e-4)
    assert near["distance"] == pytest.approx(float(own[gy, gx]), rel=1e-3, abs=1e-4)
    # the row is the named training image's feature at the named cell: the region shown is real
    src = load_image(near["normal_path"], model.config.image_size)[None]
    with torch.no_grad():
        g = memory.features(model.teacher(src))
    sy, sx = near["normal_cell"]
    row = memory.rows[near["memory_row"]]
    assert torch.allclose(g[0, :, sy, sx], row, rtol=2e-3, atol=2e-3)  # the feature cache holds 16-bit floats
    assert float((memory.rows - row).abs().amax(1).topk(2).values[1]) > 0.1  # and no other row is that close
    with Image.open(near["normal_path"]) as im:
        x0, y0, x1, y1 = near["normal_box"]
        assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height
        assert x0 <= sx * im.width / w < x1 and y0 <= sy * im.height / h < y1


def test_predict_writes_the_entry_for_every_image_and_a_side_by_side_per_nok(tiny_checkpoint, synth_root,
                                                                           tmp_path) -> None:
    pred = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")
    paths = [defective(synth_root), min((synth_root / CAT / "test" / "good").glob("*.png"))]
    rows = predict_to_folder(pred, [str(p) for p in paths], tmp_path / "out", progress=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    entries = summary["images"] if isinstance(summary, dict) and "images" in summary else summary
    assert all(r["nearest_normal"]["available"] for r in rows) and any(r["decision"] == "NOK" for r in rows)
    assert len(entries) == 2 and all("nearest_normal" in e for e in entries)
    for r in rows:
        with Image.open(r["path"]) as im:
            x0, y0, x1, y1 = r["nearest_normal"]["input_box"]
            assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height
        assert ("explanation" in r) == (r["decision"] == "NOK")
        if "explanation" in r:
            pair = tmp_path / "out" / r["explanation"]
            assert Image.open(pair).size[0] > Image.open(pair).size[1] // 2  # two panes side by side


def test_a_model_without_memory_says_it_needs_one(synth_root) -> None:
    torch.manual_seed(0)
    model = NFERD(ModelConfig(image_size=64, bank=False), teacher_weights="random")
    (res,) = Predictor(model, device="cpu").predict_paths([defective(synth_root)])
    assert res["nearest_normal"] == {"available": False, "reason": NEEDS_MEMORY}
