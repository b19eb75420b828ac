"""Files nferd did not write, or that were changed after: an image in a format nferd does not
read, a calibration, a config, index tensors or export metadata edited by hand. Each is refused
with a message naming the file and the fault, never a traceback and never a decision."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nferd.cli import main
from nferd.data.images import ImageLoadError, load_image
from nferd.engine.checkpoint import CheckpointError, load_checkpoint, read_metadata, weights_file

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def fake_ghostscript(folder: Path) -> Path:
    """A `gs` on PATH that leaves a mark when it runs."""
    mark = folder / "gs-ran"
    gs = folder / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{mark}'\nexit 1\n")
    gs.chmod(gs.stat().st_mode | stat.S_IEXEC)
    return mark


def test_an_eps_file_named_png_never_runs_ghostscript(tiny_checkpoint, tmp_path, monkeypatch, capsys) -> None:
    from PIL import EpsImagePlugin
    mark = fake_ghostscript(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None, raising=False)  # Pillow looks for gs again
    bad = tmp_path / "x.png"
    bad.write_bytes(EPS)
    with pytest.raises(ImageLoadError, match="formats nferd reads"):
        load_image(bad, 64)
    # a batch prediction reports the file and goes on
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), str(bad), "--out", str(tmp_path / "pred")]) != 0
    assert "x.png" in capsys.readouterr().out
    assert not mark.exists()


def tampered(src: Path, dst: Path, edit_meta=None, edit_tensors=None) -> Path:
    """A copy of checkpoint ``src`` with its metadata and/or tensors edited, signed as nferd writes it."""
    shutil.copytree(src, dst)
    f = weights_file(dst)
    meta = read_metadata(dst, check=False)
    with safe_open(str(f), framework="pt") as sf:
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    f.unlink()
    save_file(tensors, str(f), metadata={"nferd": json.dumps(meta)})  # as an editor would, no checks
    return dst


@pytest.mark.parametrize("key", ["pixel_threshold", "score_min", "image_threshold"])
def test_a_calibration_without_a_threshold_is_refused_when_loaded(tiny_checkpoint, tmp_path, key, capsys) -> None:
    ck = tampered(tiny_checkpoint, tmp_path / "ck", edit_meta=lambda m: m["calibration"].pop(key))
    with pytest.raises(CheckpointError, match=f"calibration.{key}"):
        load_checkpoint(ck)
    image = tmp_path / "part.png"
    from PIL import Image
    Image.new("RGB", (64, 64), (128, 128, 128)).save(image)
    code = main(["predict", "--checkpoint", str(ck), str(image), "--out", str(tmp_path / "p")])
    out = capsys.readouterr()
    assert code == 2 and f"calibration.{key}" in out.err and "Traceback" not in out.err


def test_a_huge_image_size_in_a_checkpoint_is_refused_before_any_allocation(tiny_checkpoint, tmp_path) -> None:
    ck = tampered(tiny_checkpoint, tmp_path / "ck", edit_meta=lambda m: m["model"].update(image_size=1048576))
    with pytest.raises(CheckpointError, match="`image_size` must be a multiple of 32 from 64 to 4096"):
        load_checkpoint(ck)


def test_index_tensors_that_point_outside_what_they_index_are_refused(tiny_checkpoint, tmp_path) -> None:
    def poison(t: dict[str, torch.Tensor], key: str, value: int) -> None:
        t[key] = t[key].clone()
        t[key][0] = value
    with safe_open(str(weights_file(tiny_checkpoint)), framework="pt") as sf:
        keys = list(sf.keys())
    index = [k for k in keys if k.endswith(("patch_index", "memory.source"))]
    assert index, "the default keeps index tensors"
    for i, key in enumerate(index):
        ck = tampered(tiny_checkpoint, tmp_path / f"ck{i}", edit_tensors=lambda t, k=key: poison(
            t, k, 99999999 if k.endswith("patch_index") else -5))
        with pytest.raises(CheckpointError, match="inconsistent"):
            load_checkpoint(ck)
    # the memory's cached row norms are checked against its rows: a wrong one would hide a defect
    if "memory.row_sq" in keys:
        ck = tampered(tiny_checkpoint, tmp_path / "sq", edit_tensors=lambda t: t.update(
            {"memory.row_sq": torch.zeros_like(t["memory.row_sq"])}))
        with pytest.raises(CheckpointError, match="row_sq"):
            load_checkpoint(ck)


def test_export_metadata_for_another_image_size_is_refused(tiny_checkpoint, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from nferd.deploy.onnx_runtime import OnnxModelError, OnnxPredictor
    path = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(path)]) == 0
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == "image_size":
            p.value = "128"
    onnx.save(proto, str(path))
    with pytest.raises(OnnxModelError, match="128 px images, but its graph takes"):
        OnnxPredictor.from_file(path)


def test_openvino_metadata_for_another_image_size_is_refused(tiny_checkpoint, tmp_path) -> None:
    ov = pytest.importorskip("openvino")
    from nferd.deploy.onnx_runtime import OnnxModelError
    from nferd.deploy.openvino_runtime import RT_SECTION, OpenVinoPredictor
    path = tmp_path / "m.xml"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "openvino", "--out", str(path)]) == 0
    model = ov.Core().read_model(str(path))
    model.set_rt_info("128", [RT_SECTION, "image_size"])
    edited = tmp_path / "edited.xml"
    ov.save_model(model, str(edited), compress_to_fp16=False)
    with pytest.raises(OnnxModelError, match="128 px images, but its graph takes"):
        OpenVinoPredictor.from_file(edited)
    model.set_rt_info("null", [RT_SECTION, "image_size"])
    ov.save_model(model, str(edited), compress_to_fp16=False)
    with pytest.raises(OnnxModelError, match="image_size None"):
        OpenVinoPredictor.from_file(edited)
