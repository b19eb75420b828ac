"""Heatmap overlays without matplotlib: a fixed 256-entry colour map blended onto the image, and
a caption band with the decision and score, so an overlay read on its own says what was decided."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DECISION_COLOURS = {"NOK": (200, 30, 30), "OK": (30, 140, 60), None: (90, 90, 90)}


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


def captioned(image: np.ndarray, decision: str | None, score: float, threshold: float | None) -> np.ndarray:
    """``image`` (H x W x 3 uint8) under a band that reads e.g. "NOK  score 0.731 > 0.512"."""
    h, w = image.shape[:2]
    band = max(16, min(48, h // 12))
    font = ImageFont.load_default(size=max(10, band * 2 // 3))
    if threshold is None:
        text = f"score {score:.4g} (no calibration: no decision)"
    else:
        text = f"{decision}  score {score:.4g} {'>' if decision == 'NOK' else '<='} threshold {threshold:.4g}"
    canvas = Image.new("RGB", (w, h + band), DECISION_COLOURS.get(decision, DECISION_COLOURS[None]))
    canvas.paste(Image.fromarray(image), (0, band))
    ImageDraw.Draw(canvas).text((4, band // 2), text, fill=(255, 255, 255), font=font, anchor="lm")
    return np.asarray(canvas)
