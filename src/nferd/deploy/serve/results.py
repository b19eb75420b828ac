"""One scored image's JSON: the decision, the defect area at the image's own size, and the
optional overlay, mask and nearest-normal PNGs, all refused for a non-finite map or score."""

import base64
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from ...engine.calibration import display_range
from ..explain import cell_box, side_by_side
from ..predict import resize_map
from ..visualize import overlay
from .errors import ModelOutputError
from .protocol import ServedPredictor
from .uploads import Decoded, overlay_hw

AREA_EXACT_PIXELS = 4 << 20  # up to this size the full-size mask is built whole, as `nferd predict` does
AREA_BAND_PIXELS = 1 << 20  # above it, it is counted in bands of about this many pixels


def png_base64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def resized_rows(amap: np.ndarray, hw: tuple[int, int], start: int, stop: int,
                 across: np.ndarray | None = None) -> np.ndarray:
    """Rows ``start:stop`` of ``resize_map(amap, hw)`` (bilinear, align_corners=False) without the rest.

    Needs the height to be enlarged (``hw[0] > amap.shape[0]``): then torch's resize is separable,
    width first, and this repeats its height step (float32 weights, a fused multiply-add), which
    gives the same floats on x86-64 builds of torch; elsewhere they may differ in the last bit.
    ``across``: ``resize_map(amap, (S, hw[1]))`` when the caller already has it.
    """
    s, (h, w) = amap.shape[0], hw
    rows = resize_map(amap, (s, w)) if across is None else across  # along the width only: S x W
    scale = np.float32(np.float32(s) / np.float32(h))
    x = np.arange(start, stop, dtype=np.float32) + np.float32(0.5)
    src = np.maximum((np.float64(scale) * x.astype(np.float64) - 0.5).astype(np.float32), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), s - 1)
    t = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)[:, None]
    lo, hi = rows[i0], rows[np.minimum(i0 + 1, s - 1)]
    return ((hi * t).astype(np.float64) + lo.astype(np.float64) * (np.float32(1) - t)).astype(np.float32)


def defect_area(amap: np.ndarray, hw: tuple[int, int], threshold: float) -> int:
    """Pixels of the map, bilinearly resized to ``hw``, above ``threshold``: the full-size mask's count.

    Up to AREA_EXACT_PIXELS (or when the height is not enlarged) it is
    ``(resize_map(amap, hw) > threshold).sum()``, as ``nferd predict`` computes it; above, the
    resized map is built and counted in bands of rows (``resized_rows``), so a 25-megapixel image
    needs about 30 MiB instead of 125.
    """
    h, w = hw
    if h * w <= AREA_EXACT_PIXELS or h <= amap.shape[0]:
        return int((resize_map(amap, hw) > threshold).sum())
    across = resize_map(amap, (amap.shape[0], w))
    band = max(1, AREA_BAND_PIXELS // w)
    return sum(int(np.count_nonzero(resized_rows(amap, hw, r, min(h, r + band), across) > threshold))
               for r in range(0, h, band))


def check_finite(amap: np.ndarray, score: float, filename: str) -> None:
    """Raise ModelOutputError when the map or the score is NaN or infinite."""
    bad = int(amap.size - np.count_nonzero(np.isfinite(amap)))
    if bad or not math.isfinite(score):
        what = f"score is {score}" if not math.isfinite(score) else f"anomaly map has {bad} non-finite values"
        raise ModelOutputError(f"the model gave no usable result for '{filename}': its {what} (NaN or infinite), "
                               "so no decision was made; the model or checkpoint is broken")


def build_result(predictor: ServedPredictor, dec: Decoded, amap: np.ndarray, score: float, want_overlay: bool,
                 want_mask: bool, max_side: int = 1024) -> dict[str, Any]:
    """One image's JSON: decision, defect area at the image's own size, optional overlay/mask PNGs.

    Same conventions as ``nferd predict`` (predict.save_outputs): the map is resized to the
    image size, the mask is map > calibrated pixel threshold, the overlay colour range puts that
    threshold mid-scale and outlines the mask in white. The overlay and mask PNGs are at most
    ``max_side`` pixels on the long side (``overlay_size`` says their size). Raises
    ModelOutputError for a non-finite map or score, whatever ``predictor.decide`` would do.
    """
    check_finite(amap, score, dec.filename)
    try:
        decided = predictor.decide(float(score))
    except ValueError as e:  # a predictor that refuses the score itself
        raise ModelOutputError(f"no decision for '{dec.filename}': {e}") from e
    cal = predictor.calibration
    res: dict[str, Any] = {"filename": dec.filename,
                           "image": {"width": dec.width, "height": dec.height, "format": dec.format,
                                     "mode": dec.mode},
                           **decided, "defect_area_px": None, "defect_area_fraction": None}
    if cal is not None:
        area = defect_area(amap, (dec.height, dec.width), cal.pixel_threshold)
        res["defect_area_px"] = area
        res["defect_area_fraction"] = area / (dec.height * dec.width)
    explain = getattr(predictor, "explain", None)
    if explain is not None:  # why it is NOK: the closest normal region (deploy.explain)
        near = explain(dec.tensor, amap)
        if near.get("available"):
            near = {**near, "input_box": cell_box(tuple(near["input_cell"]), tuple(near["grid"]),
                                                  (dec.width, dec.height))}
            path = near.pop("normal_path", None)  # the server's file system is not the client's business
            if want_overlay and res.get("decision") == "NOK" and dec.display is not None:
                pair = side_by_side(dec.display, {**near, "normal_path": path})
                res["nearest_normal_png_base64"] = png_base64(pair) if pair is not None else None
        res["nearest_normal"] = near
    if want_overlay or want_mask:
        hw = dec.display.shape[:2] if dec.display is not None else overlay_hw(dec.width, dec.height, max_side)
        small = resize_map(amap, hw)
        small_mask = small > cal.pixel_threshold if cal is not None else None
        res["overlay_size"] = {"width": int(hw[1]), "height": int(hw[0])}
        if want_overlay and dec.display is not None:
            vmin, vmax = display_range(cal, small)
            res["overlay_png_base64"] = png_base64(overlay(dec.display, small, vmin, vmax, mask=small_mask))
        if want_mask:
            res["mask_png_base64"] = (png_base64(small_mask.astype(np.uint8) * np.uint8(255))
                                      if small_mask is not None else None)
    return res
