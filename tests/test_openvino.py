"""The OpenVINO backend: `nferd export --format openvino` writes an IR with the ONNX file's metadata,
and `predict`, `serve` and the Python API run it with the PyTorch model's maps (fp32, within 1e-3
of the map's range) and decisions; broken or foreign files are refused."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("openvino")

from nferd.cli import main  # noqa: E402
from nferd.data.images import load_image  # noqa: E402
from nferd.deploy.onnx_runtime import OnnxModelError  # noqa: E402
from nferd.deploy.openvino_runtime import OpenVinoPredictor  # noqa: E402
from nferd.deploy.predict import Predictor  # noqa: E402

CAT = "synthetic_tiles"


@pytest.fixture(scope="module")
def trained(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def ir(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ir") / "model.xml"
    assert main(["export", "--checkpoint", str(trained), "--format", "openvino", "--out", str(out)]) == 0
    return out


def test_the_ir_gives_the_torch_maps_and_decisions(trained, ir, synth_root) -> None:
    files = sorted((synth_root / CAT / "test").rglob("*.png"))
    images = torch.stack([load_image(f, 64) for f in files])
    ov = OpenVinoPredictor.from_file(ir)
    torch_pred = Predictor.from_checkpoint(trained, device="cpu", precision="fp32")
    assert ov.calibration == torch_pred.calibration and ov.size == 64
    for batch in (images[:1], images):  # batch 1 and the whole set in one call
        got, got_s = ov.maps(batch)
        ref, ref_s = torch_pred.maps(batch)
        assert np.abs(got - ref).max() <= 1e-3 * float(ref.max() - ref.min())
        assert [ov.decide(float(s))["decision"] for s in got_s] == [torch_pred.decide(float(s))["decision"]
                                                                   for s in ref_s]


def test_cli_predict_with_the_openvino_backend(trained, ir, synth_root, tmp_path) -> None:
    images = str(synth_root / CAT / "test" / "*" / "*.png")
    assert main(["predict", "--backend", "openvino", "--model", str(ir), images, "--out", str(tmp_path / "ov")]) == 0
    assert main(["predict", "--checkpoint", str(trained), "--precision", "fp32", images, "--out",
                 str(tmp_path / "pt")]) == 0

    def rows(folder: str) -> list[dict[str, str]]:
        with (tmp_path / folder / "summary.csv").open() as fh:
            return list(csv.DictReader(fh))
    for a, b in zip(rows("ov"), rows("pt"), strict=True):
        assert a["path"] == b["path"] and a["decision"] == b["decision"] in ("OK", "NOK")
        assert float(a["score"]) == pytest.approx(float(b["score"]), rel=1e-4)


def test_the_service_runs_on_the_ir(ir, synth_root) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from nferd.deploy.serve import create_app
    ov = OpenVinoPredictor.from_file(ir)
    good = min((synth_root / CAT / "test" / "good").glob("*.png"))
    with TestClient(create_app(ov, ov.metadata)) as client:
        r = client.post("/predict", files={"file": (good.name, good.read_bytes(), "image/png")})
        meta = client.get("/metadata").json()
    assert r.status_code == 200 and r.json()["decision"] in ("OK", "NOK")
    assert meta["calibration"]["image_threshold"] == pytest.approx(ov.calibration.image_threshold)


def test_broken_foreign_or_missing_irs_are_refused(ir, tmp_path, capsys) -> None:
    import openvino as ov

    from nferd.deploy.openvino_runtime import check_constants
    with pytest.raises(OnnxModelError, match="no OpenVINO IR"):
        OpenVinoPredictor.from_file(tmp_path / "missing.xml")
    conv = torch.nn.Conv2d(3, 3, 1)
    foreign = tmp_path / "foreign.xml"
    ov.save_model(ov.convert_model(conv, example_input=torch.rand(1, 3, 8, 8)), str(foreign))
    with pytest.raises(OnnxModelError, match="not an nferd export"):
        OpenVinoPredictor.from_file(foreign)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")  # a broken weight: the graph would score images NaN
    with pytest.raises(OnnxModelError, match="non-finite"):
        check_constants(ov.convert_model(conv, example_input=torch.rand(1, 3, 8, 8)), "nan.xml")
    assert main(["predict", "--backend", "openvino", str(ir), "--out", str(tmp_path / "o")]) == 2
    assert "--backend openvino needs --model" in capsys.readouterr().err
    assert main(["export", "--checkpoint", "x", "--format", "openvino", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "FILE.xml" in capsys.readouterr().err


def test_nferd_serve_serves_the_ir(ir, monkeypatch) -> None:
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert main(["serve", "--backend", "openvino", "--model", str(ir), "--port", "8123"]) == 0
    assert served["port"] == 8123 and isinstance(served["app"].state.queue.predictor, OpenVinoPredictor)
    assert main(["serve", "--backend", "openvino", "--model", str(ir), "--checkpoint", "x"]) == 2
