"""Numpy views of what the metrics take (arrays, tensors, sequences), shape-checked."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """Numpy view of an array, torch tensor (any device) or sequence, without copying if possible."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        tensor = x.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError:  # dtypes numpy lacks, e.g. bfloat16
            return tensor.float().numpy()
    return np.asarray(x)


def image_level_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D float scores and boolean labels (True = anomalous)."""
    scores = to_numpy(scores).astype(np.float64, copy=False).reshape(-1)
    labels = to_numpy(labels).reshape(-1)
    if scores.size != labels.size:
        raise ValueError(f"got {scores.size} scores but {labels.size} labels")
    if scores.size == 0:
        raise ValueError("scores and labels are empty")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous); got values {np.unique(labels)[:10]}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return scores, labels.astype(bool)


def squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def pixel_inputs(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps and masks as C-contiguous numpy arrays of the same number of pixels."""
    maps, masks = to_numpy(maps), to_numpy(masks)
    if squeezed_shape(maps.shape) != squeezed_shape(masks.shape):
        raise ValueError(f"anomaly maps of shape {maps.shape} do not match masks of shape {masks.shape}")
    if maps.size == 0:
        raise ValueError("anomaly maps are empty")
    if maps.dtype.kind not in "fiub":
        raise ValueError(f"anomaly maps must be numeric, got dtype {maps.dtype}")
    return np.ascontiguousarray(maps), np.ascontiguousarray(masks)


def image_stack(x: np.ndarray, name: str) -> np.ndarray:
    """View (H, W), (N, H, W) or (N, 1, H, W) input as an (N, H, W) stack of images."""
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), (N, 1, H, W) or (H, W); got {x.shape}")
    return x
