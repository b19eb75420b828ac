"""OpenVINO, the runtime many inspection lines deploy with (anomalib exports to it): an IR written
from the ONNX export, and a predictor over it with the same output contract.

``export_openvino`` converts the checkpoint's ONNX graph (``export.export_onnx``) to an IR pair
(``.xml`` + ``.bin``) and stores the same JSON metadata in its ``rt_info`` under ``nferd``, so the
IR alone makes decisions. ``OpenVinoPredictor`` has ``Predictor``'s public API (``maps``,
``decide``, ``predict_paths``, ``calibration``, ``size``). It compiles for the CPU in fp32
(``INFERENCE_PRECISION_HINT``): OpenVINO would otherwise pick bf16 on CPUs that have it, and a
threshold fitted on fp32 scores must see fp32 scores. Loading fails closed like the ONNX backend:
NaN or infinite weights or calibration are refused. Needs ``openvino`` (``pip install nferd[openvino]``).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import safe_io
from ..engine.calibration import Calibration, as_calibration
from ..errors import MissingDependency
from .onnx_format import ONNX_FORMAT, ONNX_VERSION, OUTPUT_NAMES
from .onnx_runtime import ExportedPredictor, OnnxModelError, check_image_size

INSTALL_HINT = "pip install nferd[openvino]"
RT_SECTION = "nferd"


def require_openvino():  # type: ignore[no-untyped-def]
    try:
        import openvino
    except ImportError as e:
        raise MissingDependency(f"the OpenVINO backend needs openvino, which is not installed: {INSTALL_HINT}") from e
    return openvino


def export_openvino(model: Any, path: str | Path, calibration: Calibration | Mapping[str, Any] | None = None,
                    extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s fp32 inference graph as an OpenVINO IR at ``path`` (``.xml``, ``.bin`` beside)."""
    ov = require_openvino()
    from .export import export_onnx
    out = Path(path)
    if out.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR is written as FILE.xml (with FILE.bin beside it), got '{out}'")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", calibration=calibration, extra_meta=extra_meta)
        import onnx
        meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        ir = ov.convert_model(str(onnx_path))
    for key, value in meta.items():  # the same JSON strings as the ONNX file's metadata_props
        ir.set_rt_info(value, [RT_SECTION, key])
    out.parent.mkdir(parents=True, exist_ok=True)
    with safe_io.staged(out) as tmp:  # FILE.xml and FILE.bin, never through a planted link
        ov.save_model(ir, str(tmp), compress_to_fp16=False)
    return out


class OpenVinoPredictor(ExportedPredictor):
    """A compiled OpenVINO model over an nferd IR, plus the calibration stored in it."""

    def __init__(self, compiled: Any, metadata: dict[str, Any], path: str | Path | None = None) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        super().__init__(metadata, path)
        self.outputs = [compiled.output(name) for name in OUTPUT_NAMES]
        self.precision = metadata.get("inference_precision", "f32")

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None) -> OpenVinoPredictor:
        """Read and compile ``path`` (the ``.xml``) for the CPU in fp32; ``threads`` defaults to the cores."""
        ov = require_openvino()
        p = Path(path)
        if not p.is_file() or not p.with_suffix(".bin").is_file():
            raise OnnxModelError(f"no OpenVINO IR at '{p}' (with '{p.with_suffix('.bin').name}' beside it); make one "
                                 "with `nferd export --checkpoint CKPT --format openvino --out FILE.xml`")
        core = ov.Core()
        try:
            model = core.read_model(str(p))
        except Exception as e:  # OpenVINO raises its own classes
            raise OnnxModelError(f"cannot read OpenVINO IR '{p}': {type(e).__name__}: {e}") from e
        meta = read_metadata(model, p)
        shape = model.input(0).get_partial_shape()
        check_image_size(meta, [d.get_length() if d.is_static else None for d in shape], p)
        try:
            as_calibration(meta.get("calibration"))
        except ValueError as e:
            raise OnnxModelError(f"'{p}' has an unusable calibration: {e}; export it again from a sound "
                                 "checkpoint") from e
        check_constants(model, p)
        precision = meta.get("inference_precision", "f32")
        if precision not in PRECISIONS:
            raise OnnxModelError(f"'{p}' asks for inference precision {precision!r}; this nferd runs "
                                 f"{', '.join(PRECISIONS)}: export it again")
        if precision == "bf16" and not cpu_has_bf16(core):  # OpenVINO would run it in fp32 instead
            warnings.warn(f"'{p}' was exported for bf16, which this CPU lacks: it runs in fp32 with thresholds "
                          "fitted on bf16 maps; export an fp32 IR for this machine", stacklevel=2)
        return cls(compile_cpu(core, model, threads, precision), meta, p)

    def run(self, images: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float [0, 1] images N x 3 x S x S -> (maps N x S x S, scores N), as ``Predictor.maps``."""
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        x = x.astype(np.float32, copy=False)
        if self.preprocess:
            raise ValueError("this IR was exported with the preprocessing built in (uint8 images of any size); "
                             "export a plain one for the OpenVINO backend")
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.size, self.size) or len(x) == 0:
            raise ValueError(f"this model takes float images N x 3 x {self.size} x {self.size} in [0, 1]; "
                             f"got {tuple(x.shape)}")
        res = self.request.infer({0: np.ascontiguousarray(x)})
        return np.asarray(res[self.outputs[0]]).copy(), np.asarray(res[self.outputs[1]]).copy()


PRECISIONS = ("f32", "bf16")  # the floating-point precision an IR is compiled with on the CPU


def cpu_has_bf16(core: Any | None = None) -> bool:
    """Whether OpenVINO runs bf16 natively on this CPU (AVX-512 BF16 or AMX)."""
    core = core if core is not None else require_openvino().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_cpu(core: Any, model: Any, threads: int | None = None, precision: str = "f32") -> Any:
    """``model`` compiled for the CPU with ``precision`` as the floating-point precision (int8 layers
    of a quantised IR stay int8); ``threads`` defaults to the cores. The precision is set, never
    left to OpenVINO's default (bf16 on CPUs that have it), because the thresholds stored with the
    IR were fitted at one precision."""
    from ..engine.device import default_threads
    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                             "INFERENCE_NUM_THREADS": int(threads or default_threads())})


def read_metadata(model: Any, path: str | Path) -> dict[str, Any]:
    """The JSON metadata ``export_openvino`` stored in the IR's rt_info, checked for format and version."""
    if not model.has_rt_info([RT_SECTION, "format"]):
        raise OnnxModelError(f"'{path}' is an OpenVINO model but not an nferd export (no '{RT_SECTION}' rt_info); "
                             "make one with `nferd export --checkpoint CKPT --format openvino --out FILE.xml`")
    section = model.get_rt_info()[RT_SECTION]
    try:
        meta = {k: json.loads(section[k].astype(str)) for k in section}
    except (json.JSONDecodeError, TypeError) as e:
        raise OnnxModelError(f"'{path}' has unreadable nferd metadata ({e}); export it again") from e
    if meta.get("format") != ONNX_FORMAT or int(meta.get("version", 0)) > ONNX_VERSION:
        raise OnnxModelError(f"'{path}' holds nferd metadata this version does not read; export it again")
    return meta


def check_constants(model: Any, path: str | Path) -> None:
    """Refuse an IR whose constants (weights, banks) hold NaN or infinite values."""
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        arr = op.get_data()
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise OnnxModelError(f"OpenVINO IR '{path}' has non-finite values in {op.get_friendly_name()}: it is "
                                 "broken, export it again from a sound checkpoint")
