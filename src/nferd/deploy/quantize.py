"""INT8 post-training quantisation of the OpenVINO IR (NNCF), behind an accuracy gate.

Why NNCF on the OpenVINO IR: on MVTec AD bottle NNCF's quantisation kept the fp32 model's
accuracy, where ONNX Runtime's static QDQ quantisation of the same graph's convolutions lost image
AUROC and ran slower (docs/decisions.md). The statistics come from normal training images only.
Only the student's layers are quantised: the teacher's features are the reference of both terms
of the map (quantised, they cost tire AUPRO), the anomaly map after the network clips a defect's
values to the ranges of normal images when quantised, and the bank search's cosines near 1 differ
by less than an int8 step, so all three stay fp32.

Quantisation moves the anomaly map, so the decision thresholds are fitted again on the int8
model's maps of the calibration images (the checkpoint's held-out good images, or the dataset's
validation split) with the checkpoint's false-alarm rate and confidence. A calibration fitted on
cross-fitted scores (a small training set) cannot be fitted again: its thresholds are shifted by
the int8 model's median change of score and pixel value on the training images. The gate compares the
int8 and fp32 models on labelled images (the test split): it fails when image or pixel AUROC moves
by more than 0.005 or AUPRO by more than 0.01, or when there are no defects to measure with.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import safe_io
from ..engine.calibration import DEFAULT_CONFIDENCE, Calibration, as_calibration, calibration_dict, fit_calibration
from ..errors import MissingDependency
from ..metrics import aupro, auroc, pixel_auroc
from .openvino_runtime import (
    RT_SECTION,
    OpenVinoPredictor,
    compile_cpu,
    export_openvino,
    read_metadata,
    require_openvino,
)

#: Largest change of each metric, int8 against fp32, that the gate lets through.
GATE_BOUNDS = {"image_auroc": 0.005, "pixel_auroc": 0.005, "aupro": 0.01}
# Only the student (OCBE and decoder: the ``/model/ocbe/`` and ``/model/layerN/`` scopes of the
# exported graph) is quantised. The teacher's features are the reference of both map terms, the
# student's target and the bank's keys (stored in fp32): quantised, they cost tire far more AUPRO
# than a quantised student (docs/decisions.md). The anomaly map after the network
# (cosines, resizes, standardisation, bank distance, blur) stays fp32 too: quantised with the
# ranges of normal images, it clips a defect's map.
NOT_STUDENT = r"(?!/model/(ocbe|layer[0-9])/).*"
STATISTICS_IMAGES = 300  # NNCF's default subset: more adds time, not accuracy


def require_nncf():  # type: ignore[no-untyped-def]
    try:
        import nncf
    except ImportError as e:
        raise MissingDependency("INT8 export needs NNCF, which is not installed: pip install nferd[openvino]") from e
    return nncf


def _images(dataset: Any, limit: int | None = None) -> list[np.ndarray]:
    n = len(dataset) if limit is None else min(len(dataset), limit)
    step = max(1, len(dataset) // n) if n else 1
    return [dataset[i]["image"][None].numpy() for i in range(0, step * n, step)][:n]


def quantize_ir(ir: Any, normal_images: list[np.ndarray]) -> Any:
    """The fp32 IR ``ir`` (an ``openvino.Model``) quantised to int8 with statistics of
    ``normal_images`` (1 x 3 x S x S float arrays): the student's layers; the teacher, the
    anomaly map and every matrix product stay fp32."""
    nncf = require_nncf()
    nncf.set_log_level(logging.WARNING)  # NNCF logs every layer it leaves out at INFO
    if not normal_images:
        raise ValueError("INT8 quantisation needs normal training images for its statistics; none were given")
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars, off stdout (`nferd speed --json`)
        return nncf.quantize(ir, nncf.Dataset(normal_images), subset_size=len(normal_images),
                             ignored_scope=nncf.IgnoredScope(types=["MatMul"], patterns=[NOT_STUDENT],
                                                             validate=False))


def quantised_predictor(xml: str | Path, normal_images: list[np.ndarray],
                        threads: int | None = None) -> tuple[OpenVinoPredictor, Any]:
    """The fp32 IR at ``xml`` quantised (:func:`quantize_ir`) and compiled for the CPU, as a
    predictor with the IR's metadata (its tiling too), and the quantised ``openvino.Model``."""
    core = require_openvino().Core()
    meta = read_metadata(core.read_model(str(xml)), xml)
    quantised = quantize_ir(core.read_model(str(xml)), normal_images)
    return OpenVinoPredictor(compile_cpu(core, quantised, threads), meta), quantised


def run_over(predictor: Any, dataset: Any) -> dict[str, Any]:
    """Scores, maps, labels, masks and paths of ``dataset`` through ``predictor`` (as ``infer``)."""
    scores, maps, labels, masks, paths = [], [], [], [], []
    for i in range(len(dataset)):
        item = dataset[i]
        m, s = predictor.batch_maps([item["image"]])  # tile by tile for a tiled model
        maps.append(m[0])
        scores.append(float(s[0]))
        labels.append(int(item["label"]))
        masks.append((item["mask"][0] > 0.5).numpy().astype(np.uint8))
        paths.append(item.get("path", str(i)))
    return {"scores": np.asarray(scores), "maps": np.stack(maps), "labels": np.asarray(labels),
            "masks": np.stack(masks), "paths": paths}


def detection_metrics(res: dict[str, Any], has_masks: bool) -> dict[str, float]:
    out = {"image_auroc": auroc(res["scores"], res["labels"])}
    if has_masks and res["masks"].any():
        out["pixel_auroc"] = pixel_auroc(res["maps"], res["masks"])
        out["aupro"] = aupro(res["maps"], res["masks"])
    return out


def accuracy_gate(fp32: Any, int8: Any, test_set: Any | None, name: str = "int8") -> dict[str, Any]:
    """Detection metrics of both models on ``test_set`` and whether every change is within
    ``GATE_BOUNDS``; without a test split holding defects the gate cannot pass. ``name``: the
    reduced model's key in the record (int8, bf16)."""
    if test_set is None or len(test_set) == 0:
        return {"ok": False, "reason": f"no labelled test images to measure the {name} model with"}
    a, b = run_over(fp32, test_set), run_over(int8, test_set)
    if len(set(a["labels"].tolist())) < 2:
        return {"ok": False, "reason": "the test images are all of one class: AUROC cannot be measured"}
    has_masks = getattr(test_set, "has_masks", True)
    m32, m8 = detection_metrics(a, has_masks), detection_metrics(b, has_masks)
    change = {k: m8[k] - m32[k] for k in m32}
    failed = [k for k, d in change.items() if abs(d) > GATE_BOUNDS[k]]
    return {"ok": not failed, "fp32": m32, name: m8, "change": change, "bounds": GATE_BOUNDS,
            "n_images": len(test_set), **({"reason": f"{', '.join(failed)} moved beyond the bounds"} if failed else {})}


def shifted_calibration(calibration: Calibration, fp32: Any, int8: Any, images: list[torch.Tensor],
                        name: str = "int8") -> Calibration:
    """The fp32 thresholds moved by the int8 model's median change of image score and of pixel
    value on ``images``: a calibration fitted on cross-fitted scores (fold students that saw the
    other images) cannot be fitted again on the int8 model, and quantisation shifts both terms."""
    d_score, d_pixel = [], []
    for image in images:
        m32, s32 = fp32.batch_maps([image])
        m8, s8 = int8.batch_maps([image])
        d_score.append(float(s8[0]) - float(s32[0]))
        d_pixel.append(float(np.median(m8[0] - m32[0])))
    return calibration.shifted(name, float(np.median(d_score)), float(np.median(d_pixel)), len(images))


def refit_calibration(calibration: Calibration | None, fp32: Any, reduced: Any, normal_set: Any,
                      calibration_set: Any | None, name: str) -> tuple[Calibration | None, str]:
    """The reduced-precision model's thresholds and how they were obtained: fitted again on the
    calibration images, or, for a cross-fitted calibration, the fp32 ones shifted by its change."""
    held = len(calibration_set) if calibration_set is not None else 0
    if calibration is not None and (calibration.n_images or 0) > held:
        # fitted on cross-fitted scores of fp32 fold students, which no reduced model can give again
        images = [torch.from_numpy(x[0]) for x in _images(normal_set, STATISTICS_IMAGES)]
        return shifted_calibration(calibration, fp32, reduced, images, name), (
            f"carried over from the fp32 model, shifted by the {name} model's median change on {len(images)} "
            "training images")
    if held >= 2:
        rate = getattr(calibration, "false_alarm_rate", None) or 0.01  # the fp32 calibration's, when it has one
        confidence = getattr(calibration, "confidence", None) or DEFAULT_CONFIDENCE
        cal = fit_calibration(run_over(reduced, calibration_set), calibration_set, rate, confidence)
        return cal, f"refitted on the {name} model"
    return None, "absent (no calibration images)"


def save_gated(ir: Any, meta: dict[str, Any], out: Path) -> Path:
    """The IR ``ir`` with ``meta`` in its rt_info, written to ``out`` (and its .bin) safely."""
    ov = require_openvino()
    for key, value in meta.items():
        ir.set_rt_info(json.dumps(value), [RT_SECTION, key])
    out.parent.mkdir(parents=True, exist_ok=True)
    with safe_io.staged(out) as staged_out:
        ov.save_model(ir, str(staged_out), compress_to_fp16=False)
    return out


def export_int8(model: Any, out: str | Path, normal_set: Any, calibration_set: Any | None, test_set: Any | None,
                calibration: Calibration | Mapping[str, Any] | None, extra_meta: dict[str, Any] | None = None,
                allow_accuracy_loss: bool = False, threads: int | None = None) -> tuple[Path | None, dict[str, Any]]:
    """Quantise ``model``'s IR with ``normal_set`` (training images), gate it on ``test_set``,
    refit the thresholds on ``calibration_set`` and write ``out`` (``.xml``). Returns the path (None
    when the gate failed and ``allow_accuracy_loss`` is off: nothing is written) and the report."""
    out, calibration = Path(out), as_calibration(calibration)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_openvino(model, Path(tmp) / "fp32.xml", calibration=calibration, extra_meta=extra_meta)
        fp32 = OpenVinoPredictor.from_file(fp32_path, threads=threads)
        int8, quantised = quantised_predictor(fp32_path, _images(normal_set, STATISTICS_IMAGES), threads)
        report: dict[str, Any] = {"gate": accuracy_gate(fp32, int8, test_set), "statistics_images":
                                  min(len(normal_set), STATISTICS_IMAGES), "nncf": require_nncf().__version__}
        cal, report["calibration"] = refit_calibration(calibration, fp32, int8, normal_set, calibration_set, "int8")
        if not report["gate"]["ok"] and not allow_accuracy_loss:
            return None, report
        meta = {**int8.metadata, "calibration": calibration_dict(cal),
                "int8": {"tool": f"nncf {report['nncf']}", "gate": report["gate"],
                         "statistics_images": report["statistics_images"]}}
        return save_gated(quantised, meta, out), report


def export_bf16(model: Any, out: str | Path, normal_set: Any, calibration_set: Any | None, test_set: Any | None,
                calibration: Calibration | Mapping[str, Any] | None, extra_meta: dict[str, Any] | None = None,
                allow_accuracy_loss: bool = False, threads: int | None = None) -> tuple[Path | None, dict[str, Any]]:
    """``model``'s IR marked to run in bf16 on the CPU (every layer: on CPUs with native bf16 its
    matrix products run at twice fp32's peak), gated on ``test_set`` against the fp32 IR and with
    its thresholds refitted, as :func:`export_int8`. Returns the path (None when refused) and the report."""
    ov = require_openvino()
    out, calibration = Path(out), as_calibration(calibration)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_openvino(model, Path(tmp) / "fp32.xml", calibration=calibration, extra_meta=extra_meta)
        fp32 = OpenVinoPredictor.from_file(fp32_path, threads=threads)
        core = ov.Core()
        ir = core.read_model(str(fp32_path))
        meta = {**fp32.metadata, "inference_precision": "bf16"}
        bf16 = OpenVinoPredictor(compile_cpu(core, ir, threads, "bf16"), meta)
        report: dict[str, Any] = {"gate": accuracy_gate(fp32, bf16, test_set, name="bf16")}
        cal, report["calibration"] = refit_calibration(calibration, fp32, bf16, normal_set, calibration_set, "bf16")
        if not report["gate"]["ok"] and not allow_accuracy_loss:
            return None, report
        meta = {**meta, "calibration": calibration_dict(cal), "bf16": {"gate": report["gate"]}}
        return save_gated(ir, meta, out), report
