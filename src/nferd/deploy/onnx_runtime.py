"""Prediction with ONNX Runtime from an exported .onnx file alone (no checkpoint, no PyTorch model).

``OnnxPredictor`` has ``Predictor``'s public API (``maps``, ``decide``, ``predict_paths``,
``calibration``, ``size``), so ``predict_to_folder`` and the CLI use either. Everything it needs
(image size, calibration, input kind) is read from the file's metadata written by ``export_onnx``;
no PyTorch model is built. Loading fails closed: a file whose weights (initializers) or calibration
hold NaN or infinite values is refused, and an image whose map or score is not finite gets an
error instead of a decision. Needs ``onnxruntime`` and ``onnx`` (``pip install nferd[onnx]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.tiles import Tiling
from ..engine.calibration import as_calibration
from ..engine.device import micro_batch
from ..errors import MissingDependency, NferdError
from ..models.limits import MAX_IMAGE_SIZE
from .onnx_format import INPUT_NAME, ONNX_FORMAT, ONNX_VERSION, OUTPUT_NAMES
from .predict import BasePredictor

INSTALL_HINT = "pip install nferd[onnx]"


class OnnxModelError(NferdError, ValueError):
    """An .onnx file is missing, unreadable, not an nferd export this version understands, or holds NaN
    or infinite weights or calibration values."""


def require_onnxruntime():  # type: ignore[no-untyped-def]
    """Import onnxruntime or say how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependency(f"the ONNX backend needs onnxruntime, which is not installed: {INSTALL_HINT}") from e
    return onnxruntime


def session_options(threads: int | None = None):  # type: ignore[no-untyped-def]
    """CPU session options: all graph optimisations, sequential execution, one thread per core."""
    from ..engine.device import default_threads
    ort = require_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of convs: nothing to run in parallel
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    return so


def read_onnx_metadata(session: Any, path: str | Path) -> dict[str, Any]:
    """The JSON metadata written by ``export_onnx``, checked for format and version."""
    raw = session.get_modelmeta().custom_metadata_map
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise OnnxModelError(f"'{path}' has unreadable nferd metadata ({e}); re-export it with `nferd export`") from e
    if meta.get("format") != ONNX_FORMAT:
        raise OnnxModelError(f"'{path}' is an ONNX model but not an nferd export (no '{ONNX_FORMAT}' metadata); "
                             "make one with `nferd export --checkpoint CKPT --format onnx --out FILE.onnx`")
    if int(meta.get("version", 0)) > ONNX_VERSION:
        raise OnnxModelError(f"'{path}' has nferd ONNX format version {meta['version']}, newer than this nferd "
                             f"reads ({ONNX_VERSION}): upgrade nferd")
    try:
        as_calibration(meta.get("calibration"))
    except ValueError as e:
        raise OnnxModelError(f"'{path}' has an unusable calibration: {e}. Its decisions cannot be trusted: "
                             "export it again from a sound checkpoint") from e
    return meta


def check_image_size(meta: dict[str, Any], input_shape: list[Any], path: str | Path) -> None:
    """Refuse metadata whose ``image_size`` is not the side of the images the graph takes (metadata
    copied from another export, or edited): every input would be refused or resized wrongly. A
    graph that resizes in itself (``preprocess``) takes any size; only the number is checked."""
    size = meta.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 64 <= size <= MAX_IMAGE_SIZE:
        raise OnnxModelError(f"'{path}' has nferd metadata with image_size {size!r}, not a side from 64 to "
                             f"{MAX_IMAGE_SIZE}: export it again with `nferd export`")
    if meta.get("preprocess"):
        return
    sides = list(input_shape)[-2:]
    if any(isinstance(d, int) and d > 0 and d != size for d in sides):
        raise OnnxModelError(f"'{path}' says it takes {size} px images, but its graph takes "
                             f"{' x '.join(map(str, sides))}: the metadata does not belong to this graph; export it "
                             "again with `nferd export`")


def check_weights(path: str | Path) -> None:
    """Refuse an .onnx file whose initializers (the weights, banks and folded constants) hold NaN or
    infinite values, naming the first such tensor (the graph would score images NaN, which a plain
    ``>`` reads as OK)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise MissingDependency(f"checking an ONNX model's weights needs the onnx package, which is not installed: "
                          f"{INSTALL_HINT}") from e
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # the protobuf parser raises its own classes
        raise OnnxModelError(f"cannot read ONNX model '{path}': {type(e).__name__}: {e}") from e
    bad = []
    for t in proto.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad.append(t.name)
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise OnnxModelError(f"ONNX model '{path}' has non-finite values in {bad[0]}{more}: it is broken, export "
                             "it again from a sound checkpoint or restore a copy")


class ExportedPredictor(BasePredictor):
    """A predictor over an exported file (ONNX, OpenVINO IR): what it knows comes from the nferd
    metadata ``export_onnx`` wrote into the file, its calibration checked as it is read."""

    def __init__(self, metadata: dict[str, Any], path: str | Path | None = None) -> None:
        self.metadata = metadata
        self.path = None if path is None else Path(path)
        self.size = int(metadata["image_size"])
        self.micro_batch = micro_batch(torch.device("cpu"), self.size ** 2)  # runs on the CPU
        self.tiling = Tiling.from_dict(metadata.get("tiling"))
        self.calibration = as_calibration(metadata.get("calibration"))
        self.preprocess = bool(metadata.get("preprocess", False))
        self.config = metadata.get("model", {})


class OnnxPredictor(ExportedPredictor):
    """An ONNX Runtime session over an nferd export, plus the calibration stored in it."""

    def __init__(self, session: Any, metadata: dict[str, Any], path: str | Path | None = None) -> None:
        self.session = session
        super().__init__(metadata, path)

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None) -> OnnxPredictor:
        """Open ``path`` on the CPU execution provider; ``threads`` defaults to the cores available.

        Refuses (``OnnxModelError``) a file whose weights or calibration hold NaN or infinite values.
        """
        ort = require_onnxruntime()
        p = Path(path)
        if not p.is_file():
            raise OnnxModelError(f"no ONNX model at '{p}'; make one with "
                                 "`nferd export --checkpoint CKPT --format onnx --out FILE.onnx`")
        try:
            session = ort.InferenceSession(str(p), sess_options=session_options(threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
            raise OnnxModelError(f"cannot load ONNX model '{p}': {type(e).__name__}: {e}. The file is damaged or "
                                 "not an ONNX model; re-export it with `nferd export`") from e
        meta = read_onnx_metadata(session, p)
        check_image_size(meta, session.get_inputs()[0].shape, p)
        check_weights(p)
        return cls(session, meta, p)

    def run(self, images: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (maps N x S x S, scores N) as NumPy.

        Plain export: float [0, 1] images N x 3 x S x S (as ``Predictor.maps``). Export with
        preprocessing: uint8 N x H x W x 3 RGB images of one size.
        """
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if self.preprocess:
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"this ONNX model resizes in the graph and takes uint8 N x H x W x 3 RGB images; "
                                 f"got {x.dtype} {tuple(x.shape)}")
        else:
            x = x.astype(np.float32, copy=False)
            if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.size, self.size):
                raise ValueError(f"this ONNX model takes float images N x 3 x {self.size} x {self.size} in [0, 1]; "
                                 f"got {tuple(x.shape)}")
        if len(x) == 0:
            raise ValueError("no images to score (empty batch)")
        maps, scores = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(x)})
        return maps, scores

    # ---------------------------------------------------- file loading hooks
    def load(self, path: Path) -> torch.Tensor:
        """Float images at the model size, or (with in-graph preprocessing) native-size uint8 H x W x 3."""
        if not self.preprocess:
            return super().load(path)
        from ..data.images import load_image
        x = load_image(path)  # every bit depth and mode handled as for the PyTorch model
        return (x * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()

    def batch_maps(self, images: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        if not self.preprocess:
            return super().batch_maps(images)
        # The graph takes one H x W per run: batch the images that share a size.
        maps: list[np.ndarray | None] = [None] * len(images)
        scores = np.zeros(len(images), dtype=np.float32)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape), []).append(i)
        for idx in groups.values():
            m, s = self.maps(torch.stack([images[i] for i in idx]))
            for j, i in enumerate(idx):
                maps[i], scores[i] = m[j], s[j]
        return np.stack(maps), scores  # type: ignore[arg-type]
