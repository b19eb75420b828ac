"""What the service needs from a predictor, so that any backend with that API can be served."""

from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch

if TYPE_CHECKING:
    from ...data.tiles import Tiling
    from ...engine.calibration import Calibration


class ServedPredictor(Protocol):
    """A model the service can serve: the PyTorch ``Predictor``, an ``OnnxPredictor`` of a plain
    export, an ``OpenVinoPredictor``, or any object with these members.

    Optional, read with ``getattr`` where they are used: ``tiling`` and ``batch_maps``
    (``TiledPredictor``: uploads scored at their own size, tile by tile), ``explain`` (the
    ``nearest_normal`` entry), ``memory_images``, ``device``, ``metadata``, ``model`` (for /metadata)
    and ``preprocess`` (an ONNX graph that resizes in itself, which the service refuses).
    """

    size: int  # the model's input side, in pixels
    calibration: "Calibration | None"  # None: scores without an OK/NOK decision

    def maps(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """[0, 1] images N x 3 x S x S -> (maps N x S x S, scores N)."""
        ...

    def decide(self, score: float) -> dict[str, Any]:
        """``score``, ``normalized_score`` and ``decision`` of one image; ValueError refuses the score."""
        ...


class TiledPredictor(ServedPredictor, Protocol):
    """A predictor whose ``tiling`` is set: it scores images at their own sizes."""

    tiling: "Tiling"

    def batch_maps(self, images: list[torch.Tensor]) -> tuple[Any, np.ndarray]:
        """Images 3 x H x W at their own sizes -> (a map per image at its size, scores N)."""
        ...


def tiled(predictor: ServedPredictor) -> TiledPredictor | None:
    """The predictor as a ``TiledPredictor`` when its ``tiling`` is set, else None."""
    return cast(TiledPredictor, predictor) if getattr(predictor, "tiling", None) is not None else None
