"""Uploads: what an image's header says, what decoding it costs, and decoding it.

The header (size, format, mode) is read without decoding the pixels, so that the memory decoding
takes is known, and reserved, before a pixel is decoded (``decode_cost``).
"""

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ...data.images import image_tensor
from .errors import UploadRejected
from .limits import Limits

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")

# Peak memory of decoding one image, in bytes per pixel of the image, by Pillow mode: the decoded
# pixels plus the float working copies of the conversion to the model's input (16-bit and 32-bit
# images go through float32/float64 arrays at full size). Measured with VmHWM on 4000 x 4000
# images, rounded up; tests/test_serve_memory.py checks the table against the real peak.
DECODE_BYTES_PER_PIXEL = {
    "1": 8, "L": 8, "P": 8, "LA": 12, "La": 12, "PA": 12,
    "RGB": 8, "YCbCr": 8, "LAB": 8, "HSV": 8,
    "RGBA": 14, "RGBa": 14, "RGBX": 14, "CMYK": 14,
    "I;16": 20, "I;16L": 20, "I;16B": 20, "I;16N": 20,
    "I": 40, "F": 40,
}
DECODE_BYTES_UNKNOWN_MODE = 44
DISPLAY_WORK_BYTES_PER_PIXEL = 32  # float32 RGB temporaries of the display image, per display pixel


try:
    _malloc_trim: Any = ctypes.CDLL("libc.so.6").malloc_trim
    _malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def trim_memory() -> None:
    """Give freed heap memory back to the system (glibc only): the heaps of the decoding threads
    would otherwise keep the peak of every decode, and RSS would not follow what is in use."""
    if _malloc_trim is not None:
        _malloc_trim(0)


@dataclass
class Header:
    """What an upload's header says, read without decoding its pixels."""
    filename: str
    width: int
    height: int
    format: str
    mode: str


@dataclass
class Decoded:
    filename: str
    width: int
    height: int
    format: str
    mode: str
    tensor: torch.Tensor  # 3 x S x S in [0, 1], the model's input
    display: np.ndarray | None  # H' x W' x 3 uint8 for the overlay (long side <= overlay_max_side)
    decode_ms: float


def safe_filename(name: str | None) -> str:
    """The base name only, for echoing back: the server never uses it as a path."""
    base = os.path.basename((name or "").replace("\\", "/")).strip()
    return base[:200] or "upload"


def overlay_hw(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(height, width) of the overlay and mask: the image's own size, shrunk to ``max_side`` on the long side."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_cost(head: Header, size: int, max_side: int, want_overlay: bool, want_mask: bool,
                tiled: bool = False) -> tuple[int, int]:
    """Bytes an image needs: (while it is decoded, from its decoding until its response is built).

    The second part is the model input (the whole image at its own size when ``tiled``, and its
    stitched map), the display image and the response's PNGs.
    """
    oh, ow = overlay_hw(head.width, head.height, max_side)
    work = head.width * head.height * DECODE_BYTES_PER_PIXEL.get(head.mode, DECODE_BYTES_UNKNOWN_MODE)
    keep = (3 + 2) * head.width * head.height * 4 if tiled else 3 * size * size * 4
    if want_overlay:
        work += oh * ow * DISPLAY_WORK_BYTES_PER_PIXEL
        keep += oh * ow * (3 + 6)  # the display image, then the overlay PNG as base64 (worst case)
    if want_mask:
        keep += oh * ow * 2  # the mask PNG as base64 (worst case)
    return work, keep


def _upload_size(file: BinaryIO) -> int:
    file.seek(0, os.SEEK_END)
    n = file.tell()
    file.seek(0)
    return n


def read_header(file: BinaryIO, filename: str, limits: Limits) -> Header:
    """Size, format and mode of an upload without decoding it, or UploadRejected(413/415/400) saying why.

    ``verify()`` checks the file's structure (PNG chunk CRCs, ...) without decoding the pixels.
    """
    n = _upload_size(file)
    if not n:
        raise UploadRejected(400, f"'{filename}' is empty (0 bytes)")
    if n > limits.max_upload_bytes:
        raise UploadRejected(413, f"'{filename}' is {n} bytes; the limit is {limits.max_upload_bytes}")
    kinds, fmt = "/".join(ACCEPTED_FORMATS), "image"
    try:
        with Image.open(file, formats=list(ACCEPTED_FORMATS)) as im:
            fmt, (w, h), mode = im.format or "?", im.size, im.mode
            if w * h > limits.max_pixels:
                raise UploadRejected(413, f"'{filename}' is {w} x {h} = {w * h} pixels; the limit is "
                                          f"{limits.max_pixels}")
            im.verify()
    except UploadRejected:
        raise
    except Image.DecompressionBombError as e:
        raise UploadRejected(413, f"'{filename}' is too large to decode: {e}") from e
    except UnidentifiedImageError as e:
        raise UploadRejected(415, f"'{filename}' is not a {kinds} image (Pillow cannot identify it)") from e
    except Exception as e:  # verify() raises SyntaxError, OSError, ValueError, struct.error ... on bad data
        raise UploadRejected(400, f"'{filename}' is a corrupt {fmt} image: {type(e).__name__}: {e}") from e
    if w <= 0 or h <= 0:
        raise UploadRejected(400, f"'{filename}' has no pixels ({w} x {h})")
    return Header(filename, w, h, fmt, mode)


def decode_upload(file: BinaryIO, head: Header, size: int, limits: Limits, want_display: bool,
                  tiled: bool = False) -> Decoded:
    """Decode a file whose header was read: model tensor (at the model size, or at the image's own
    size when ``tiled``) (+ display image), or UploadRejected(400)."""
    t0 = time.perf_counter()
    file.seek(0)
    try:
        with Image.open(file, formats=list(ACCEPTED_FORMATS)) as im:
            im.load()  # decodes every pixel: truncated files fail here
            path = Path(head.filename)
            tensor = image_tensor(path, im, None if tiled else (size, size))
            display = None
            if want_display:
                hw = overlay_hw(head.width, head.height, limits.overlay_max_side)
                display = (image_tensor(path, im, hw).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    except Exception as e:
        reason = str(e) if "truncated" not in str(e) else f"the file is truncated ({e})"
        raise UploadRejected(400, f"'{head.filename}' could not be decoded as {head.format}: {reason}") from e
    finally:
        if head.width * head.height >= 1 << 20:
            trim_memory()
    return Decoded(head.filename, head.width, head.height, head.format, head.mode, tensor, display,
                   (time.perf_counter() - t0) * 1000)
