"""INT8 export: the quantised IR, its refitted thresholds, and the accuracy gate that refuses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from nferd.cli.main import main  # noqa: E402
from nferd.deploy.openvino_runtime import OpenVinoPredictor  # noqa: E402
from nferd.deploy.quantize import GATE_BOUNDS, accuracy_gate  # noqa: E402

CAT = "synthetic_tiles"


@pytest.fixture(scope="module")
def trained(tiny_checkpoint) -> Path:
    return tiny_checkpoint


def test_int8_export_quantises_refits_the_thresholds_and_records_its_gate(trained, tmp_path, capsys) -> None:
    fp32, int8 = tmp_path / "fp32.xml", tmp_path / "int8.xml"
    assert main(["export", "--checkpoint", str(trained), "--format", "openvino", "--out", str(fp32)]) == 0
    # the data comes from the checkpoint's record of its training
    assert main(["export", "--checkpoint", str(trained), "--format", "openvino", "--int8", "--out", str(int8)]) == 0
    out = capsys.readouterr().out
    assert "image_auroc: fp32" in out and "as INT8" in out
    import openvino as ov
    model = ov.Core().read_model(str(int8))
    # the student's convolutions take quantised inputs; the teacher's and the map's blur stay fp32
    quantised = {t.get_node().get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"
                 for t in op.output(0).get_target_inputs()}
    assert any(n.startswith("/model/ocbe/") for n in quantised) and any(n.startswith("/model/layer") for n in quantised)
    assert not any(n.startswith(("/model/teacher/", "/blur/")) for n in quantised)
    a, b = OpenVinoPredictor.from_file(fp32), OpenVinoPredictor.from_file(int8)
    meta = b.metadata["int8"]
    assert meta["gate"]["ok"] and set(meta["gate"]["change"]) == set(GATE_BOUNDS)
    assert meta["statistics_images"] > 0 and meta["tool"].startswith("nncf")
    # the small training set was cross-fitted: the fp32 thresholds move by the int8 model's own change
    assert a.calibration.n_images > 2 and b.calibration.n_images == a.calibration.n_images
    shift = b.calibration.int8_shift
    assert shift["n_images"] > 0 and shift["image_score"] != 0
    assert b.calibration.image_threshold == pytest.approx(a.calibration.image_threshold + shift["image_score"])
    assert b.calibration.pixel_threshold == pytest.approx(a.calibration.pixel_threshold + shift["pixel"])
    x = torch.rand(3, 3, 64, 64)
    maps, scores = b.maps(x)
    assert maps.shape == (3, 64, 64) and np.isfinite(maps).all()
    assert b.decide(float(scores[0]))["decision"] in ("OK", "NOK")


def test_a_failed_or_unmeasurable_gate_writes_nothing_unless_allowed(trained, tmp_path, synth_root, capsys) -> None:
    """A test split of good images only cannot measure AUROC: the export refuses before it quantises
    (exit 2, no file); --allow-accuracy-loss writes it with the failed gate in its metadata."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(synth_root / CAT, root / CAT)
    for d in (root / CAT / "test").iterdir():
        if d.name != "good":
            shutil.rmtree(d)
    shutil.rmtree(root / CAT / "ground_truth", ignore_errors=True)
    out = tmp_path / "int8.xml"
    args = ["export", "--checkpoint", str(trained), "--format", "openvino", "--int8", "--data", str(root),
            "--category", CAT, "--out", str(out)]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "only good images" in captured.err and "image_auroc" not in captured.out  # nothing was quantised
    assert not out.exists() and not out.with_suffix(".bin").exists()
    assert main(args + ["--allow-accuracy-loss"]) == 0
    assert "warning: the accuracy gate failed" in capsys.readouterr().out
    assert not OpenVinoPredictor.from_file(out).metadata["int8"]["gate"]["ok"]


def test_int8_needs_the_openvino_format(trained, tmp_path, capsys) -> None:
    assert main(["export", "--checkpoint", str(trained), "--int8", "--out", str(tmp_path / "m.onnx")]) != 0
    assert "--format openvino" in capsys.readouterr().err


class _Fixed:
    """A predictor whose maps and scores are given per image index."""

    def __init__(self, scores: list[float], shift: float = 0.0) -> None:
        self.scores, self.shift, self.i = scores, shift, 0

    def batch_maps(self, images: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        s = self.scores[self.i]
        self.i += 1
        m = np.full((1, 4, 4), 0.0, dtype=np.float32)
        m[0, :2, :2] = s + self.shift
        return m, np.array([s], dtype=np.float32)


def _labelled(n: int = 8) -> list[dict]:
    items = []
    for i in range(n):
        mask = torch.zeros(1, 4, 4)
        if i % 2:
            mask[0, :2, :2] = 1
        items.append({"image": torch.zeros(3, 4, 4), "label": i % 2, "mask": mask, "path": f"{i}.png"})
    return items


def test_the_gate_passes_an_equal_model_and_fails_one_that_ranks_worse() -> None:
    good = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.15, 0.85]
    worse = [0.1, 0.9, 0.95, 0.8, 0.3, 0.7, 0.15, 0.85]  # a good image now scores highest
    data = _labelled()
    same = accuracy_gate(_Fixed(good), _Fixed(good), data)
    assert same["ok"] and all(abs(d) < 1e-12 for d in same["change"].values())
    bad = accuracy_gate(_Fixed(good), _Fixed(worse), data)
    assert not bad["ok"] and "image_auroc" in bad["reason"]
    assert bad["change"]["image_auroc"] < -GATE_BOUNDS["image_auroc"]
    assert not accuracy_gate(_Fixed(good), _Fixed(good), None)["ok"]
    assert json.dumps(bad)  # the report goes into the IR's metadata as JSON


def test_bf16_export_is_gated_refits_its_thresholds_and_runs_in_bf16(trained, tmp_path, capsys) -> None:
    import openvino as ov

    from nferd.deploy.openvino_runtime import compile_cpu, cpu_has_bf16
    with pytest.raises(ValueError, match="precision"):
        compile_cpu(ov.Core(), None, 1, "f16x")
    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16")
    out = tmp_path / "bf16.xml"
    assert main(["export", "--checkpoint", str(trained), "--format", "openvino", "--precision", "bf16",
                 "--out", str(out)]) == 0
    assert "bf16 " in capsys.readouterr().out
    fp32 = tmp_path / "fp32.xml"
    assert main(["export", "--checkpoint", str(trained), "--format", "openvino", "--out", str(fp32)]) == 0
    a, b = OpenVinoPredictor.from_file(fp32), OpenVinoPredictor.from_file(out)
    assert b.precision == "bf16" and a.precision == "f32"
    assert "bfloat16" in str(b.compiled.get_property("INFERENCE_PRECISION_HINT"))
    assert b.metadata["bf16"]["gate"]["ok"] and set(b.metadata["bf16"]["gate"]["change"]) == set(GATE_BOUNDS)
    # its own thresholds: the fp32 ones moved by what bf16 did to the scores
    assert b.calibration.image_threshold != a.calibration.image_threshold
    x = torch.rand(2, 3, 64, 64)
    ma, sa = a.maps(x)
    mb, sb = b.maps(x)
    assert np.isfinite(mb).all() and not np.array_equal(sa, sb)  # really another precision
    assert np.abs(mb - ma).max() < 0.05 * (ma.max() - ma.min())
    assert main(["export", "--checkpoint", str(trained), "--precision", "bf16", "--out", str(tmp_path / "m.onnx")]) == 2
