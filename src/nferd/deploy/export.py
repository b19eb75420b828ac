"""ONNX export of the whole inference graph, so deployment needs one file and no PyTorch.

Exported: teacher (it normalises its own input), OCBE, the normal feature banks with their
top-K cosine recall (TopK + ScatterElements + MatMul), the fusion modules, the reverse student,
the anomaly map (1 - cosine per stage, upsampled, summed), the Gaussian blur (a fixed conv) and
the image score. Input ``images``: float32 B x 3 x S x S in [0, 1]; outputs ``anomaly_map``
(B x S x S) and ``score`` (B); the batch axis is dynamic. The patch recall searches its
banks one image at a time in eager PyTorch; when traced it switches to one batched search, whose
similarity matrix holds B x HW x P floats per bank (about 64 MiB per image for Lite0 at 256 px).

With ``include_preprocess`` the input is instead uint8 B x H x W x 3 (RGB, any H and W): the graph
resizes to S x S as the Python loader does (Pillow's antialiased bilinear, width then height, each
pass rounded to 8 bits; ONNX ``Resize`` with ``antialias=1, exclude_outside=1`` reproduces it to
within one grey level), so a C++/C#/JS caller only decodes the image.

The model's metadata (config, teacher, image size, normalisation, calibration, format version)
goes into ``metadata_props``, each value a JSON string, so ``OnnxPredictor`` needs only the file.

The TorchScript-based exporter is used (``dynamo=False``): the dynamo exporter needs the
``onnxscript`` package, which the ``onnx`` extra does not install.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import safe_io, scoring
from ..engine.calibration import Calibration, as_calibration, calibration_dict
from ..engine.jsonio import dumps
from ..errors import OptionError, option
from ..models.nferd import NFERD
from .onnx_format import DEFAULT_OPSET, INPUT_NAME, MAX_OPSET, MIN_OPSET, ONNX_FORMAT, ONNX_VERSION, OUTPUT_NAMES  # noqa: F401


class InferenceGraph(nn.Module):
    """What is exported: [0, 1] images in, blurred anomaly maps (B x S x S) and image scores (B) out."""

    def __init__(self, model: NFERD) -> None:
        super().__init__()
        self.model = model
        self.size = (model.config.image_size, model.config.image_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        t, s = self.model(images)
        maps, score = self.model.anomaly_maps(t, s, self.size)
        return maps[:, 0], score


def preprocess_uint8(images: Tensor, size: int) -> Tensor:
    """PyTorch twin of the in-graph preprocessing: uint8 B x H x W x 3 -> float B x 3 x S x S in [0, 1].

    What Pillow does to an 8-bit image in ``load_image``: an antialiased bilinear resize along the
    width, rounded to 8 bits, then along the height, rounded again, then scaled to [0, 1]. Measured
    against Pillow 13: never more than one grey level apart; for some shapes over 99 % of pixels are
    equal, for others about 80 % (Pillow then appears to run the height pass first).
    """
    x = images.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    for hw, needed in (((h, size), w != size), ((size, size), h != size)):
        if needed:
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
            x = torch.floor(x + 0.5).clamp(0, 255)  # Pillow rounds half up
    return x / 255.0


def preprocess_nodes(size: int, inp: str, out: str, prefix: str = "preprocess/") -> tuple[list, list]:
    """ONNX nodes and constants of the twin of ``preprocess_uint8`` (opset >= 18: antialiased Resize)."""
    from onnx import TensorProto, helper

    p = prefix
    consts = [helper.make_tensor(p + "size", TensorProto.INT64, [1], [size]),
              helper.make_tensor(p + "half", TensorProto.FLOAT, [], [0.5]),
              helper.make_tensor(p + "zero", TensorProto.FLOAT, [], [0.0]),
              helper.make_tensor(p + "max", TensorProto.FLOAT, [], [255.0])]
    nodes = [helper.make_node("Transpose", [inp], [p + "nchw"], name=p + "Transpose", perm=[0, 3, 1, 2]),
             helper.make_node("Cast", [p + "nchw"], [p + "x0"], name=p + "Cast", to=TensorProto.FLOAT)]
    for i, axis in enumerate((3, 2)):  # width first, then height, rounding after each pass as Pillow does
        x, q = p + f"x{i}", p + f"{'wh'[i]}_"
        nodes += [
            # exclude_outside renormalises the filter at the borders, as Pillow does (without it,
            # border pixels come out many grey levels off)
            helper.make_node("Resize", [x, "", "", p + "size"], [q + "resized"], name=q + "Resize",
                             mode="linear", antialias=1, exclude_outside=1, axes=[axis],
                             coordinate_transformation_mode="half_pixel"),
            helper.make_node("Add", [q + "resized", p + "half"], [q + "shifted"], name=q + "Add"),
            helper.make_node("Floor", [q + "shifted"], [q + "rounded"], name=q + "Floor"),
            helper.make_node("Clip", [q + "rounded", p + "zero", p + "max"], [p + f"x{i + 1}"], name=q + "Clip"),
        ]
    nodes.append(helper.make_node("Div", [p + "x2", p + "max"], [out], name=p + "Scale"))
    return nodes, consts


def preprocess_model(size: int, opset: int = DEFAULT_OPSET):  # type: ignore[no-untyped-def]
    """The in-graph preprocessing alone as an ONNX model (uint8 B x H x W x 3 -> float B x 3 x S x S)."""
    from onnx import TensorProto, helper

    nodes, consts = preprocess_nodes(size, "image", "images")
    graph = helper.make_graph(
        nodes, "nferd_preprocess",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _prepend_preprocess(proto: Any, size: int, batch: str | int) -> None:
    """Replace the float input by a uint8 B x H x W x 3 one, resized and scaled inside the graph."""
    from onnx import TensorProto, helper

    inner = "images_preprocessed"
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == INPUT_NAME:
                node.input[i] = inner
    nodes, consts = preprocess_nodes(size, INPUT_NAME, inner)
    for i, node in enumerate(nodes):
        proto.graph.node.insert(i, node)
    proto.graph.initializer.extend(consts)
    for v in [v for v in proto.graph.input if v.name == INPUT_NAME]:
        proto.graph.input.remove(v)
    proto.graph.input.insert(0, helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8,
                                                              [batch, "height", "width", 3]))


def onnx_metadata(model: NFERD, include_preprocess: bool, opset: int, calibration: Calibration | None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the runtime side needs to know, besides the graph."""
    from ..engine.checkpoint import model_metadata
    meta = model_metadata(model, extra)
    s = model.config.image_size
    b = "batch"
    meta.update({
        "format": ONNX_FORMAT, "version": ONNX_VERSION, "opset": opset, "image_size": s,
        "calibration": calibration_dict(calibration),
        "input": ({"name": INPUT_NAME, "dtype": "uint8", "shape": [b, "height", "width", 3],
                   "range": [0, 255], "preprocess": "Pillow-like antialiased bilinear resize to image_size "
                                                    "(width then height, 8-bit rounding after each), / 255"}
                  if include_preprocess else
                  {"name": INPUT_NAME, "dtype": "float32", "shape": [b, 3, s, s], "range": [0, 1]}),
        "outputs": {"anomaly_map": [b, s, s], "score": [b]},
        "preprocess": include_preprocess,
    })
    return meta


def export_onnx(model: NFERD, path: str | Path, opset: int = DEFAULT_OPSET, include_preprocess: bool = False,
                calibration: Calibration | Mapping[str, Any] | None = None,
                extra_meta: dict[str, Any] | None = None) -> Path:
    """Write the fp32 eval-mode inference graph of ``model`` to ``path`` (one self-contained .onnx file).

    ``calibration`` (a ``Calibration`` or the checkpoint's JSON object) is stored so decisions can be
    made from the file alone.
    The model itself is not modified (a CPU fp32 copy is exported). NaN or infinite weights or
    calibration values are refused: the file would decide nothing the runtime could trust.
    """
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is not supported; use {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    if include_preprocess and opset < 18:
        raise OptionError(f"{option('include_preprocess')} needs {option('opset')} 18 or newer (antialiased "
                          f"Resize); got {opset}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"ONNX output file must end in .onnx, got '{path}'")
    calibration = as_calibration(calibration)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"refusing to export a model with non-finite values in {bad[0]}"
                         + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).cpu().float().eval()
    m = m.to(memory_format=torch.contiguous_format)
    graph = InferenceGraph(m).eval()
    s = m.config.image_size
    dummy = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    dyn = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with safe_io.staged(path) as tmp:
        with warnings.catch_warnings():
            # The spatial size is fixed at export, so the shape-dependent Python branches (TF 'SAME'
            # padding, blur border mode, bank resize) are constants by design.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*Constant folding.*")
            # chosen on purpose (module docstring): the dynamo exporter needs onnxscript
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            with torch.no_grad():
                torch.onnx.export(graph, (dummy,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                  dynamic_axes=dyn, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        if include_preprocess:
            _prepend_preprocess(proto, s, "batch")
        meta = onnx_metadata(m, include_preprocess, opset, calibration, extra_meta)
        del proto.metadata_props[:]
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, dumps(v, nulls=False)
        proto.doc_string = (f"nferd {'NFERD' if m.config.bank else 'RD4AD'} ({m.config.teacher}, {s} px): "
                            "images -> anomaly_map, score")
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


def check_export(model: NFERD, path: str | Path, batch: int = 2, seed: int = 0,
                 predictor: Any = None) -> dict[str, Any]:
    """Run the exported file (``predictor``: its runtime, ONNX Runtime by default) and the PyTorch model
    (fp32) on the same random images; report the gap.

    A file with in-graph preprocessing gets uint8 images at the model size, where its resize is the
    identity, so the network is compared exactly (the resize is compared with Pillow in the tests:
    one grey level of rounding moves the map by more than the fp32 gap this check is for).
    """
    from .onnx_runtime import OnnxPredictor
    pred = predictor if predictor is not None else OnnxPredictor.from_file(path)
    s = model.config.image_size
    g = torch.Generator().manual_seed(seed)
    if pred.preprocess:
        raw = torch.randint(0, 256, (batch, s, s, 3), dtype=torch.uint8, generator=g)
        x = preprocess_uint8(raw, s)
        got_maps, got_scores = pred.run(raw)  # the whole batch in one call: the file's batch axis is free
    else:
        x = torch.rand(batch, 3, s, s, generator=g)
        got_maps, got_scores = pred.run(x)
    m = copy.deepcopy(model).cpu().float().eval()
    ref_maps, ref_scores = scoring.score_batch(m, x, torch.device("cpu"))
    rng = float(ref_maps.max() - ref_maps.min())
    diff = float(np.abs(got_maps - ref_maps).max())
    return {"batch": batch, "max_abs_diff_map": diff, "map_range": rng,
            "max_abs_diff_score": float(np.abs(got_scores - ref_scores).max()),
            "relative_diff": diff / max(rng, 1e-12), "ok": diff <= 1e-3 * max(rng, 1e-12)}
