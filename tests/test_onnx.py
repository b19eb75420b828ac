"""ONNX export and the ONNX Runtime predictor: parity with PyTorch, dynamic batch, in-graph
preprocessing against Pillow, the CLI end to end, and clear errors for bad files."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from nferd.cli import main  # noqa: E402
from nferd.data.images import load_image  # noqa: E402
from nferd.deploy.export import InferenceGraph, export_onnx, preprocess_model, preprocess_uint8  # noqa: E402
from nferd.deploy.onnx_runtime import OnnxModelError, OnnxPredictor  # noqa: E402
from nferd.deploy.predict import Predictor, predict_to_folder  # noqa: E402
from nferd.engine.checkpoint import load_checkpoint  # noqa: E402
from nferd.models.nferd import NFERD, ModelConfig  # noqa: E402

CAT = "synthetic_tiles"


def close_maps(got: np.ndarray, ref: np.ndarray, rel: float = 1e-3) -> None:
    rng = float(ref.max() - ref.min())
    assert rng > 0
    assert float(np.abs(got - ref).max()) <= rel * rng, (float(np.abs(got - ref).max()), rng)


def sample_images(root: Path, n: int) -> torch.Tensor:
    files = sorted((root / CAT / "test").rglob("*.png"))[:n]
    return torch.stack([load_image(f, 64) for f in files])


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory) -> Path:
    """A 1-epoch NFERD checkpoint (lite0, 64 px, N=4, K=2) trained through the CLI."""
    ckpt = tmp_path_factory.mktemp("onnx") / "ckpt"
    rc = main(["train", "--data", str(synth_root), "--category", CAT, "--teacher", "efficientnet_lite0",
               "--image-size", "64", "--epochs", "1", "--n-bank", "4", "--top-k", "2", "--batch-size", "4",
               "--holdout", "0.2", "--out", str(ckpt)])
    assert rc == 0
    return ckpt


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    model, meta = load_checkpoint(trained)
    return export_onnx(model, tmp_path_factory.mktemp("onnx_file") / "model.onnx",
                       calibration=meta["calibration"])


def bank_model(synth_root: Path, **kw) -> NFERD:
    """Untrained model whose banks hold real teacher maps and whose fusion (HAFM unless ``kw`` says
    otherwise) is switched fully on."""
    if kw.get("bank", True):
        kw.setdefault("fusion", "hafm")
    torch.manual_seed(0)
    model = NFERD(ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2, **kw)).eval()
    train = sorted((synth_root / CAT / "train" / "good").glob("*.png"))[:4]
    with torch.no_grad():
        feats = model.teacher(torch.stack([load_image(f, 64) for f in train]))
        for f in model.fusions:
            if hasattr(f, "scale"):
                f.scale.fill_(1.0)  # trained models have a small scale; 1 makes the recall matter
    if model.config.bank:
        model.fill_banks(feats, torch.arange(4))
    return model


def test_exported_model_matches_torch_for_batch_1_and_3(trained, exported, synth_root) -> None:
    model, meta = load_checkpoint(trained)
    torch_pred = Predictor(model, meta["calibration"], device="cpu", precision="fp32")
    onnx_pred = OnnxPredictor.from_file(exported)
    assert onnx_pred.size == 64  # the file stores the checkpoint's calibration, key for key
    assert onnx_pred.metadata["calibration"] == meta["calibration"] == onnx_pred.calibration.to_dict()
    assert onnx_pred.metadata["model"] == model.config.to_dict()
    assert onnx_pred.metadata["teacher"]["name"] == "efficientnet_lite0"
    x = sample_images(synth_root, 7)
    for batch in (x[:1], x[1:4]):  # one file, two batch sizes: the batch axis is dynamic
        t_maps, t_scores = torch_pred.maps(batch)
        o_maps, o_scores = onnx_pred.maps(batch)
        assert o_maps.shape == (len(batch), 64, 64) and o_scores.shape == (len(batch),)
        close_maps(o_maps, t_maps)
        np.testing.assert_allclose(o_scores, t_scores, rtol=1e-4, atol=1e-6)
        assert [onnx_pred.decide(float(s))["decision"] for s in o_scores] == \
            [torch_pred.decide(float(s))["decision"] for s in t_scores]


@pytest.mark.parametrize("recall", ["map", "patch"])
def test_bank_recall_is_exported_faithfully(recall, synth_root, tmp_path) -> None:
    """Whole-map recall (TopK + ScatterElements) and patch recall (TopK + Gather, a batched search
    when traced instead of the eager per-image loop); both keep a dynamic batch axis."""
    model = bank_model(synth_root, recall=recall)
    path = export_onnx(model, tmp_path / "bank.onnx")
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"TopK", "MatMul"} <= ops and ("ScatterElements" if recall == "map" else "Gather") in ops
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"
    x = sample_images(synth_root, 4)
    with torch.no_grad():
        ref, _ = InferenceGraph(model)(x)
        for f in model.fusions:
            f.scale.zero_()
        without_bank, _ = InferenceGraph(model)(x)
    # the recalled maps change the output far more than the tolerance, so parity below tests the recall
    assert float((ref - without_bank).abs().max()) > 0.05 * float(ref.max() - ref.min())
    pred = OnnxPredictor.from_file(path)
    for batch in (slice(0, 1), slice(1, 4)):
        got, _ = pred.maps(x[batch])
        close_maps(got, ref[batch].numpy())


def test_rd4ad_exports_without_a_bank(synth_root, tmp_path) -> None:
    model = bank_model(synth_root, bank=False, fusion="none")
    path = export_onnx(model, tmp_path / "rd.onnx")
    assert "TopK" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    pred = OnnxPredictor.from_file(path)
    assert pred.calibration is None and pred.decide(0.3)["decision"] is None
    x = sample_images(synth_root, 2)
    with torch.no_grad():
        ref, ref_scores = InferenceGraph(model)(x)
    got, scores = pred.maps(x)
    close_maps(got, ref.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-4)


def non_square_png(synth_root: Path, out: Path, hw: tuple[int, int]) -> Path:
    src = min((synth_root / CAT / "test").rglob("*.png"))
    with Image.open(src) as im:
        im.convert("RGB").resize((hw[1], hw[0]), Image.Resampling.BICUBIC).save(out)
    return out


def test_preprocess_graph_resizes_like_pillow(synth_root, tmp_path) -> None:
    sess = ort.InferenceSession(preprocess_model(64).SerializeToString(), providers=["CPUExecutionProvider"])
    for hw in ((150, 100), (47, 90), (64, 64), (300, 200)):
        f = non_square_png(synth_root, tmp_path / f"im_{hw[0]}x{hw[1]}.png", hw)
        u8 = np.asarray(Image.open(f).convert("RGB"))[None]
        got = sess.run(None, {"image": u8})[0][0]
        pillow = load_image(f, 64).numpy()  # what the PyTorch predictor feeds the model
        twin = preprocess_uint8(torch.from_numpy(u8.copy()), 64)[0].numpy()
        assert got.shape == (3, 64, 64)
        # Pillow rounds to 8 bits between its two passes and (Pillow 13) picks their order per shape;
        # the graph always goes width first: at most one grey level apart, on under a quarter of the pixels
        diff = np.abs(got - pillow) * 255
        assert diff.max() <= 1.0 + 1e-3 and (diff > 1e-3).mean() <= 0.25
        diff = np.abs(got - twin) * 255  # the PyTorch twin: the same arithmetic, float rounding aside
        assert diff.max() <= 1.0 + 1e-3 and (diff > 1e-3).mean() <= 0.01


def test_preprocess_export_on_a_non_square_uint8_image(trained, synth_root, tmp_path) -> None:
    model, meta = load_checkpoint(trained)
    path = export_onnx(model, tmp_path / "u8.onnx", include_preprocess=True, calibration=meta["calibration"])
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    pred = OnnxPredictor.from_file(path)
    assert pred.preprocess
    f = non_square_png(synth_root, tmp_path / "wide.png", (90, 130))
    u8 = np.asarray(Image.open(f).convert("RGB"))[None].copy()
    got, got_scores = pred.maps(u8)
    assert got.shape == (1, 64, 64)
    # the network part, exactly: PyTorch on what the graph's own resize produces
    pre = ort.InferenceSession(preprocess_model(64).SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref, ref_scores = InferenceGraph(model.eval())(torch.from_numpy(pre.run(None, {"image": u8})[0]))
    close_maps(got, ref.numpy())
    assert [pred.decide(float(s))["decision"] for s in got_scores] == \
        [pred.decide(float(s))["decision"] for s in ref_scores.numpy()]
    # the whole path: a few pixels one grey level apart move the map slightly (measured: 0.3 % of the
    # range against the PyTorch twin and against Pillow for this image, up to 2.2 % for other shapes)
    with torch.no_grad():
        twin, _ = InferenceGraph(model)(preprocess_uint8(torch.from_numpy(u8), 64))
    close_maps(got, twin.numpy(), rel=1e-2)
    torch_pred = Predictor(model, meta["calibration"], device="cpu", precision="fp32")
    [row] = list(torch_pred.predict_paths([f]))  # Pillow resize of the file, as `nferd predict` does
    close_maps(got[0], row["map"], rel=3e-2)
    assert float(got_scores[0]) == pytest.approx(row["score"], rel=1e-2)
    with pytest.raises(ValueError, match="uint8"):
        pred.maps(torch.rand(1, 3, 64, 64))
    # files of different sizes go through predict_paths in one call (grouped by size)
    g = non_square_png(synth_root, tmp_path / "tall.png", (120, 70))
    rows = list(pred.predict_paths([f, g, f], batch_size=3))
    assert [r["path"] for r in rows] == [str(f), str(g), str(f)]
    np.testing.assert_array_equal(rows[0]["map"], rows[2]["map"])
    assert rows[0]["score"] == pytest.approx(float(got_scores[0]), rel=1e-6)
    assert rows[1]["score"] != rows[0]["score"]


def test_cli_export_and_predict_with_the_onnx_backend(trained, synth_root, tmp_path, capsys) -> None:
    out_file = tmp_path / "exp" / "model.onnx"
    assert main(["export", "--checkpoint", str(trained), "--format", "onnx", "--out", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "exported NFERD" in printed and "max |onnx - torch|" in printed
    images = str(synth_root / CAT / "test" / "*" / "*.png")
    assert main(["predict", "--backend", "onnx", "--model", str(out_file), images, "--out",
                 str(tmp_path / "onnx_pred")]) == 0
    assert main(["predict", "--checkpoint", str(trained), "--precision", "fp32", images, "--out",
                 str(tmp_path / "torch_pred")]) == 0

    def rows(folder: str) -> list[dict[str, str]]:
        with (tmp_path / folder / "summary.csv").open() as fh:
            return list(csv.DictReader(fh))
    onnx_rows, torch_rows = rows("onnx_pred"), rows("torch_pred")
    assert len(onnx_rows) == len(torch_rows) == len(list((synth_root / CAT / "test").rglob("*.png")))
    for a, b in zip(onnx_rows, torch_rows):
        assert a["path"] == b["path"] and a["decision"] == b["decision"] and a["decision"] in ("OK", "NOK")
        assert float(a["score"]) == pytest.approx(float(b["score"]), rel=1e-4)
    assert len(list((tmp_path / "onnx_pred" / "overlays").glob("*.png"))) == len(onnx_rows)


def test_predict_to_folder_accepts_the_onnx_predictor(exported, synth_root, tmp_path) -> None:
    good = sorted((synth_root / CAT / "test" / "good").glob("*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    rows = predict_to_folder(OnnxPredictor.from_file(exported), [str(good[0]), str(broken)], tmp_path / "p",
                             progress=False)
    assert "error" not in rows[0] and rows[0]["decision"] in ("OK", "NOK") and "broken.png" in rows[1]["error"]
    assert json.loads((tmp_path / "p" / "summary.json").read_text())[0]["path"] == str(good[0])


def test_predict_onnx_backend_needs_a_model_file(synth_root, tmp_path, capsys) -> None:
    img = str(min((synth_root / CAT / "test" / "good").glob("*.png")))
    assert main(["predict", "--backend", "onnx", img, "--out", str(tmp_path / "o")]) == 2
    assert "--backend onnx needs --model" in capsys.readouterr().err
    assert main(["predict", img, "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err


def test_missing_corrupt_or_foreign_onnx_files_give_clear_errors(synth_root, tmp_path, capsys) -> None:
    with pytest.raises(OnnxModelError, match="no ONNX model at .*nope.onnx.*nferd export"):
        OnnxPredictor.from_file(tmp_path / "nope.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    with pytest.raises(OnnxModelError, match="cannot load ONNX model .*corrupt.onnx.*re-export"):
        OnnxPredictor.from_file(corrupt)
    foreign = tmp_path / "foreign.onnx"
    onnx.save(preprocess_model(64), str(foreign))  # valid ONNX, but no nferd metadata
    with pytest.raises(OnnxModelError, match="not an nferd export"):
        OnnxPredictor.from_file(foreign)
    img = str(min((synth_root / CAT / "test" / "good").glob("*.png")))
    assert main(["predict", "--backend", "onnx", "--model", str(corrupt), img, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nferd: error: cannot load ONNX model") and len(err.strip().splitlines()) == 1


def test_missing_onnxruntime_says_how_to_install(monkeypatch, exported, synth_root, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    img = str(min((synth_root / CAT / "test" / "good").glob("*.png")))
    assert main(["predict", "--backend", "onnx", "--model", str(exported), img, "--out", str(tmp_path / "o")]) == 2
    assert "pip install nferd[onnx]" in capsys.readouterr().err


def test_export_rejects_what_it_cannot_write(synth_root, tmp_path) -> None:
    model = bank_model(synth_root, bank=False, fusion="none")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", opset=11)
    with pytest.raises(ValueError, match="`opset` 18 or newer"):
        export_onnx(model, tmp_path / "m.onnx", opset=17, include_preprocess=True)
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_onnx(model, tmp_path / "m.bin")
    assert not list(tmp_path.iterdir())
