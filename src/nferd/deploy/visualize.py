"""Heatmap overlays without matplotlib: a fixed 256-entry colour map blended onto the image."""

from __future__ import annotations

import numpy as np


def _jet_lut() -> np.ndarray:
    """Jet colour map (blue -> cyan -> yellow -> red) as a 256 x 3 uint8 table."""
    x = np.linspace(0, 1, 256)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], 1) * 255).astype(np.uint8)


JET = _jet_lut()


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """H x W float map -> H x W x 3 uint8 colours, clipped to [vmin, vmax]."""
    t = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return JET[(t * 255).astype(np.uint8)]


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5,
            mask: np.ndarray | None = None) -> np.ndarray:
    """Blend the coloured map onto an H x W x 3 uint8 image; outline ``mask`` in white if given."""
    out = ((1 - alpha) * image.astype(np.float32) + alpha * colorize(amap, vmin, vmax)).astype(np.uint8)
    if mask is not None and mask.any():
        m = mask.astype(bool)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 255
    return out
