"""Fail closed: NaN or infinite weights, calibrations, maps or scores never become an OK decision.

A broken checkpoint or .onnx file is refused when it is loaded, naming the tensor or field; an image
the model scores NaN at run time is a failed file (an error row, a non-zero exit code), and every
JSON file nferd writes parses with a strict parser.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nferd.cli import main
from nferd.data.images import load_image
from nferd.deploy.predict import BasePredictor, Predictor
from nferd.engine.calibration import Calibration, CalibrationWarning, NonFiniteError, fit_normal
from nferd.engine.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint, update_metadata
from nferd.engine.evaluate import write_results
from nferd.models.nferd import NFERD, ModelConfig

CAT = "synthetic_tiles"
TENSOR = "decoder.layer1.0.conv1.weight"


def strict_loads(text: str) -> object:
    """``json.loads`` that rejects NaN and Infinity, as strict parsers (JavaScript, Go, jq) do."""
    def reject(word: str) -> None:
        raise ValueError(f"non-standard JSON constant {word}")
    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def model_and_cal(synth_root: Path) -> tuple[NFERD, Calibration]:
    """An untrained tiny model with filled banks, calibrated on 8 good training images."""
    torch.manual_seed(0)
    model = NFERD(ModelConfig(image_size=64, n_bank=4, top_k=2), teacher_weights="random").eval()
    good = sorted((synth_root / CAT / "train" / "good").glob("*.png"))
    with torch.no_grad():
        model.fill_banks(model.teacher(torch.stack([load_image(f, 64) for f in good[:4]])), torch.arange(4))
    maps, scores = Predictor(model, device="cpu", precision="fp32").maps(
        torch.stack([load_image(f, 64) for f in good[4:]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # 8 images: far fewer than 1 % needs
        cal = fit_normal(scores, maps)
    return model, cal


@pytest.fixture(scope="module")
def saved(model_and_cal, tmp_path_factory) -> Path:
    model, cal = model_and_cal
    folder = tmp_path_factory.mktemp("fail_closed") / "ckpt"
    return save_checkpoint(folder, model, {"calibration": cal.to_dict()}).parent


@pytest.fixture
def ckpt(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the checkpoint folder, free to be damaged."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def images(synth_root: Path) -> list[str]:
    test = synth_root / CAT / "test"
    return [str(sorted((test / "good").glob("*.png"))[0]),
            *(str(sorted(d.glob("*.png"))[0]) for d in sorted(test.iterdir()) if d.name != "good")][:3]


def rewrite(ckpt: Path, tensors_edit=None, meta_edit=None) -> Path:
    """Rewrite the weights file by hand (as a damaged disk or an older writer would leave it)."""
    f = ckpt / "model.safetensors"
    with safe_open(str(f), framework="pt") as sf:
        header = sf.metadata()
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    if tensors_edit:
        tensors_edit(tensors)
    if meta_edit:
        meta = json.loads(header["nferd"])
        meta_edit(meta)
        header = {"nferd": json.dumps(meta)}  # Python's default writes NaN as a bare word
    save_file(tensors, str(f), metadata=header)
    return f


@pytest.fixture
def nan_for_first_image(monkeypatch):
    """The model's anomaly map and score come out NaN for the first image it scores, and again for
    the first after each call of the returned ``rearm`` (a batch may take several network calls)."""
    original = NFERD.anomaly_maps
    armed = [True]

    def anomaly_maps(self, t, s, size=None, exclude=None):
        maps, scores = original(self, t, s, size, exclude)
        if armed[0]:
            armed[0] = False
            maps, scores = maps.clone(), scores.clone()
            maps[0], scores[0] = float("nan"), float("nan")
        return maps, scores

    monkeypatch.setattr(NFERD, "anomaly_maps", anomaly_maps)
    return lambda: armed.__setitem__(0, True)


# --------------------------------------------------------------------------- loading a checkpoint


def test_nan_in_one_decoder_tensor_is_refused_naming_file_and_tensor(ckpt, images, tmp_path, capsys) -> None:
    def poison(tensors):
        tensors[TENSOR][0, 0, 0, 0] = float("nan")
    f = rewrite(ckpt, tensors_edit=poison)
    with pytest.raises(CheckpointError, match=re.escape(TENSOR)) as e:
        load_checkpoint(ckpt)
    assert str(f) in str(e.value) and "non-finite" in str(e.value)
    with pytest.raises(CheckpointError, match=re.escape(TENSOR)):
        Predictor.from_checkpoint(ckpt, device="cpu")
    assert main(["predict", "--checkpoint", str(ckpt), *images, "--out", str(tmp_path / "pred")]) == 2
    assert TENSOR in capsys.readouterr().err
    assert not (tmp_path / "pred" / "summary.json").exists()


def test_infinite_memory_value_is_refused_too(ckpt) -> None:
    def poison(tensors):
        tensors["memory.rows"].view(-1)[5] = float("inf")
    rewrite(ckpt, tensors_edit=poison)
    with pytest.raises(CheckpointError, match=re.escape("memory.rows")):
        load_checkpoint(ckpt)


def test_nan_calibration_threshold_is_never_written_and_never_read(ckpt, images, tmp_path, capsys) -> None:
    before = read_metadata(ckpt)["calibration"]
    bad = {**before, "image_threshold": float("nan")}
    with pytest.raises(CheckpointError, match="image_threshold"):
        update_metadata(ckpt, calibration=bad)
    assert read_metadata(ckpt)["calibration"] == before  # the refused write left the checkpoint as it was
    assert strict_loads((ckpt / "config.json").read_text())["calibration"] == before
    # a header holding NaN (written by hand, or by an older writer) is refused wherever it is read
    f = rewrite(ckpt, meta_edit=lambda m: m["calibration"].update(image_threshold=float("nan")))
    for load in (read_metadata, load_checkpoint, Predictor.from_checkpoint):
        with pytest.raises(CheckpointError, match=r"calibration\.image_threshold is nan") as e:
            load(ckpt)
        assert str(f) in str(e.value)
    assert main(["predict", "--checkpoint", str(ckpt), *images, "--out", str(tmp_path / "pred")]) == 2
    assert "image_threshold" in capsys.readouterr().err
    # update_metadata can replace the broken calibration with a sound one
    update_metadata(ckpt, calibration=before)
    assert load_checkpoint(ckpt)[1]["calibration"] == before


def test_predictor_refuses_a_calibration_without_a_finite_threshold(model_and_cal) -> None:
    model, cal = model_and_cal
    d = cal.to_dict()  # as a user's file holds it
    for bad in ({**d, "image_threshold": float("inf")}, {**d, "image_threshold": None},
                {k: v for k, v in d.items() if k != "image_threshold"}):
        with pytest.raises(ValueError, match="image_threshold"):
            Predictor(model, bad, device="cpu")


# --------------------------------------------------------------------------- decisions at run time


def test_decide_never_returns_ok_for_a_non_finite_score_or_threshold(model_and_cal) -> None:
    _, cal = model_and_cal
    p = BasePredictor()
    p.calibration = cal
    assert p.decide(cal.image_threshold - 1.0)["decision"] == "OK"
    assert p.decide(cal.image_threshold + 1.0)["decision"] == "NOK"
    for score in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(NonFiniteError):
            p.decide(score)
    with pytest.raises(NonFiniteError, match="image_threshold is nan"):  # no calibration is made with one
        dataclasses.replace(cal, image_threshold=float("nan"))
    broken = copy.copy(cal)
    object.__setattr__(broken, "image_threshold", float("nan"))  # damaged past every check
    p.calibration = broken
    with pytest.raises(NonFiniteError, match="threshold"):
        p.decide(0.0)
    p.calibration = None  # uncalibrated: no decision at all, never OK
    assert p.decide(0.0)["decision"] is None
    with pytest.raises(NonFiniteError):
        p.decide(float("nan"))


def test_nan_at_run_time_is_an_error_row_and_a_failed_exit(saved, model_and_cal, images, tmp_path,
                                                           nan_for_first_image, capsys) -> None:
    model, cal = model_and_cal
    rows = list(Predictor(model, cal, device="cpu", precision="fp32").predict_paths([Path(p) for p in images]))
    assert [r["path"] for r in rows] == images
    assert set(rows[0]) == {"path", "error"} and "non-finite" in rows[0]["error"]
    assert all(r["decision"] in ("OK", "NOK") and np.isfinite(r["score"]) for r in rows[1:])
    # uncalibrated: still an error, not a null decision
    nan_for_first_image()
    rows = list(Predictor(model, None, device="cpu", precision="fp32").predict_paths([Path(images[0])]))
    assert "error" in rows[0] and "decision" not in rows[0]

    out = tmp_path / "pred"
    capsys.readouterr()
    nan_for_first_image()
    assert main(["predict", "--checkpoint", str(saved), *images, "--out", str(out), "--device", "cpu"]) == 3
    assert "1 failed" in capsys.readouterr().out
    summary = strict_loads((out / "summary.json").read_text())
    first = next(r for r in summary if r["path"] == images[0])
    assert "error" in first and first.get("decision") is None
    assert all(r.get("decision") in ("OK", "NOK") for r in summary if r["path"] != images[0])
    with (out / "summary.csv").open(newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["path"] == images[0])
    assert row["decision"] == "" and row["error"]


def test_uncalibrated_checkpoint_gives_null_decisions_never_ok(model_and_cal, images, tmp_path) -> None:
    model, _ = model_and_cal
    ck = save_checkpoint(tmp_path / "uncal", model).parent
    assert main(["predict", "--checkpoint", str(ck), *images, "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    summary = strict_loads((tmp_path / "pred" / "summary.json").read_text())
    assert len(summary) == len(images) and all(r["decision"] is None for r in summary)


def test_test_command_refuses_nan_scores(saved, synth_root, tmp_path, nan_for_first_image, capsys) -> None:
    assert main(["test", "--checkpoint", str(saved), "--data", str(synth_root), "--category", CAT,
                 "--out", str(tmp_path / "test"), "--device", "cpu"]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "test" / "results.json").exists()


def test_report_shows_error_not_ok_for_a_nan_score(model_and_cal, images, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from nferd.deploy.report import prepare_category, write_report
    _, cal = model_and_cal
    thr = cal.image_threshold
    data = {"metrics": {"image_auroc": 1.0}, "scores": np.array([np.nan, thr - 1, thr + 1, thr - 2]),
            "labels": np.array([1, 0, 1, 0]), "paths": [*images, images[0]]}
    prep = prepare_category(data, cal, gallery_size=4)
    assert {g["index"]: g.get("decision") for g in prep["gallery"]}[0] == "ERROR"
    text = write_report(tmp_path, {"a": prep}, {"checkpoint": "x"}).read_text()
    row = re.search(r'<tr data-index="0"[^>]*>.*?</tr>', text).group(0)
    assert "<td>ERROR</td>" in row and "<td>OK</td>" not in row
    assert "1 of 2</b> defective images passed" not in text  # the NaN defect is not counted as passed (OK)
    assert "<b>1</b> images have a NaN or infinite score" in text


# --------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def exported(model_and_cal, tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from nferd.deploy.export import export_onnx
    model, cal = model_and_cal
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", calibration=cal)


def test_onnx_with_a_nan_initializer_or_calibration_is_refused(exported, images, tmp_path, capsys) -> None:
    import onnx
    from onnx import numpy_helper

    from nferd.deploy.onnx_runtime import OnnxModelError, OnnxPredictor
    OnnxPredictor.from_file(exported)  # the sound file loads
    proto = onnx.load(str(exported))
    init = next(t for t in proto.graph.initializer
                if numpy_helper.to_array(t).dtype == np.float32 and numpy_helper.to_array(t).size > 16)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[7] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "bad_weights.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(OnnxModelError, match=re.escape(init.name)) as e:
        OnnxPredictor.from_file(bad)
    assert str(bad) in str(e.value)
    assert main(["predict", "--backend", "onnx", "--model", str(bad), *images, "--out", str(tmp_path / "p")]) == 2
    assert init.name in capsys.readouterr().err

    proto = onnx.load(str(exported))
    entry = next(e for e in proto.metadata_props if e.key == "calibration")
    cal = json.loads(entry.value)
    entry.value = json.dumps({**cal, "image_threshold": float("nan")})
    bad = tmp_path / "bad_calibration.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(OnnxModelError, match=r"calibration\.image_threshold is nan"):
        OnnxPredictor.from_file(bad)


def test_onnx_nan_at_run_time_is_an_error_row(exported, images, tmp_path, monkeypatch) -> None:
    from nferd.deploy.onnx_runtime import OnnxPredictor
    original = OnnxPredictor.maps

    def maps(self, x):  # one pixel NaN, the score still finite: the map alone makes it an error
        m, s = original(self, x)
        m = m.copy()
        m[0, 3, 3] = np.nan
        return m, s

    monkeypatch.setattr(OnnxPredictor, "maps", maps)
    rows = list(OnnxPredictor.from_file(exported).predict_paths([Path(p) for p in images]))
    assert set(rows[0]) == {"path", "error"}
    assert all(r["decision"] in ("OK", "NOK") for r in rows[1:])
    out = tmp_path / "pred"
    assert main(["predict", "--backend", "onnx", "--model", str(exported), *images, "--out", str(out)]) == 3
    summary = strict_loads((out / "summary.json").read_text())
    assert "error" in summary[0] and summary[0].get("decision") is None


def test_export_refuses_non_finite_weights(model_and_cal, tmp_path) -> None:
    pytest.importorskip("onnx")
    from nferd.deploy.export import export_onnx
    model = copy.deepcopy(model_and_cal[0])
    with torch.no_grad():
        model.state_dict()[TENSOR][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape(TENSOR)):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- strict JSON


def test_results_json_with_a_nan_metric_is_strict(tmp_path) -> None:
    rows = {"a": {"image_auroc": 0.9, "pixel_auroc": float("nan"), "aupro": float("nan")},
            "b": {"image_auroc": 0.7, "pixel_auroc": 0.8, "aupro": float("nan")}}
    path = write_results(tmp_path, rows, {"train_seconds": float("inf"), "teacher": "t"})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    res = strict_loads(text)
    assert res["aupro"] is None  # no category has it: the mean cannot be computed
    assert res["pixel_auroc"] == pytest.approx(0.8) and res["image_auroc"] == pytest.approx(0.8)
    assert res["categories"]["a"]["pixel_auroc"] is None and res["run"]["train_seconds"] is None


def test_test_command_writes_strict_results_when_a_metric_is_nan(saved, synth_root, tmp_path, monkeypatch) -> None:
    import nferd.engine.evaluate as ev
    original = ev.compute_metrics
    monkeypatch.setattr(ev, "compute_metrics", lambda *a, **k: {**original(*a, **k), "aupro": float("nan")})
    assert main(["test", "--checkpoint", str(saved), "--data", str(synth_root), "--category", CAT,
                 "--out", str(tmp_path / "test"), "--device", "cpu"]) == 0
    res = strict_loads((tmp_path / "test" / "results.json").read_text())
    assert res["aupro"] is None and res["categories"][CAT]["aupro"] is None
    # the other metrics are untouched: the mean of one category is that category's value
    assert res["image_auroc"] == res["categories"][CAT]["image_auroc"] and res["image_auroc"] is not None
