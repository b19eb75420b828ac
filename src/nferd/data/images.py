"""Image and mask loading with Pillow only (no torchvision).

Every image that enters the package goes through :func:`load_image` or
:func:`load_mask`, so odd file formats are handled (or rejected with a useful
message) in exactly one place.

Decisions worth knowing:

* Alpha channels (RGBA, LA, PA, palette with transparency) are **dropped**, not
  composited: the colour under a transparent pixel is kept as is.  Inspection
  images carry no meaningful transparency, and dropping keeps the sensor data.
* 16-bit images (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) are scaled by 65535.
  Mode ``I`` (32-bit int, which is how some Pillow versions open 16-bit PNGs)
  is scaled by 65535 when all values fit in 16 bits, else by 2**31 - 1.
  Mode ``F`` (float) is taken as [0, 1] if it fits, else as 8-bit or 16-bit
  range; anything larger is rejected.
* EXIF orientation is **not** applied (masks would not follow it).
* Multi-frame files (TIFF stacks, animations) use their first frame.
* ``size`` given as a tuple is ``(height, width)``, the torch convention.
* Only PNG, JPEG, BMP, TIFF and WebP are opened (:data:`IMAGE_FORMATS`), whatever the file's
  name: Pillow's other readers include EPS, which runs Ghostscript, and formats that few
  cameras write and that see little scrutiny. Every file nferd reads as an image goes through
  :func:`open_image`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import NferdError

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


def open_image(path: str | Path) -> Image.Image:
    """``Image.open`` restricted to :data:`IMAGE_FORMATS` (lazy, as Pillow's: call ``load``)."""
    try:
        return Image.open(path, formats=list(IMAGE_FORMATS))
    except UnidentifiedImageError as exc:
        raise UnidentifiedImageError("not one of the formats nferd reads (PNG, JPEG, BMP, TIFF, WebP)") from exc

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "is_image_file",
    "list_images",
    "load_image",
    "load_mask",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_HINT = "Check the file is a valid PNG/JPEG/BMP/TIFF/WebP image."
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

Size = int | tuple[int, int] | Sequence[int] | None


class ImageLoadError(NferdError, ValueError):
    """An image or mask file could not be read or understood."""


def _error(path: Path, reason: str) -> ImageLoadError:
    return ImageLoadError(f"cannot read image '{path}': {reason}. {_HINT}")


def is_image_file(path: str | Path) -> bool:
    """True for a visible file whose extension is in IMAGE_EXTENSIONS (any case)."""
    p = Path(path)
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path) -> list[Path]:
    """Images directly inside ``folder`` (not recursive), hidden files skipped, sorted by name.

    Raises NotADirectoryError with the folder name if ``folder`` is not a directory,
    so a typo in a path is not silently treated as "no images".
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder '{folder}' does not exist or is not a directory")
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def _target_hw(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        hw = (size, size)
    else:
        hw = tuple(int(s) for s in size)
        if len(hw) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
    if hw[0] <= 0 or hw[1] <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return hw  # type: ignore[return-value]


@contextmanager
def _decoded(path: str | Path) -> Iterator[Image.Image]:
    """Open and fully decode, so truncated files fail here rather than later; closes the file."""
    path = Path(path)
    if not path.exists():
        raise _error(path, "the file does not exist")
    if not path.is_file():
        raise _error(path, "the path is not a file")
    img: Image.Image | None = None
    try:
        img = open_image(path)
        img.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data
        if img is not None:
            img.close()
        raise _error(path, f"{type(exc).__name__}: {exc}") from exc
    try:
        if img.width == 0 or img.height == 0:
            raise _error(path, "the image is empty (0 pixels)")
        yield img
    finally:
        img.close()


def _to_float_array(path: Path, img: Image.Image) -> np.ndarray:
    """H x W x C float32 array in [0, 1] for high-bit-depth modes (C is 1)."""
    arr = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        out = arr.astype(np.float32) / 65535.0
    elif img.mode == "I":
        arr = arr.astype(np.int64)
        scale = 65535.0 if arr.min() >= 0 and arr.max() <= 65535 else float(2**31 - 1)
        out = np.clip(arr, 0, None).astype(np.float64) / scale
    elif img.mode == "F":
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise _error(path, "float image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0:
            raise _error(path, f"float image has negative values (min {lo})")
        scale = next((s for s in (1.0, 255.0, 65535.0) if hi <= s), None)
        if scale is None:
            raise _error(path, f"float image values up to {hi} have no known range")
        out = arr / scale
    else:  # pragma: no cover - callers only pass the modes above
        raise _error(path, f"unsupported image mode {img.mode!r}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)[..., None]


def _resize_float(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an H x W x C float array, channel by channel in Pillow mode 'F'."""
    if arr.shape[:2] == hw:
        return arr
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32)).resize(
                (hw[1], hw[0]), Image.Resampling.BILINEAR, reducing_gap=None
            )
        )
        for c in range(arr.shape[2])
    ]
    return np.stack(channels, axis=-1)


def _drop_alpha(img: Image.Image) -> Image.Image:
    if img.mode == "P":
        # Converting a palette image with transparency straight to RGB makes Pillow warn.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        bands = img.split()[:-1]
        img = bands[0] if len(bands) == 1 else Image.merge("RGB", bands)
        if img.mode == "P":  # PA split gives a palette band without its palette
            img = img.convert("RGB")
    return img


def load_image(path: str | Path, size: Size = None) -> torch.Tensor:
    """Load any common image as a float32 ``3 x H x W`` tensor in [0, 1].

    ``size``: None keeps the native size, an int resizes to ``size x size``,
    a pair is ``(height, width)``.  Resizing is Pillow bilinear (antialiased
    when shrinking, ``reducing_gap=None``), applied on 8-bit data for 8-bit
    images and on float data for 16-bit ones.  No normalisation is applied.
    """
    path, hw = Path(path), _target_hw(size)
    with _decoded(path) as img:
        return image_tensor(path, img, hw)


def image_tensor(path: Path, img: Image.Image, hw: tuple[int, int] | None) -> torch.Tensor:
    try:
        if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
            arr = _to_float_array(path, img)
            if hw is not None:
                arr = _resize_float(arr, hw)
            arr = np.repeat(arr, 3, axis=2)
        else:
            img = _drop_alpha(img)
            if img.mode != "RGB":
                img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...
            if hw is not None and (img.height, img.width) != hw:
                img = img.resize((hw[1], hw[0]), Image.Resampling.BILINEAR, reducing_gap=None)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except ImageLoadError:
        raise
    except Exception as exc:
        raise _error(path, f"cannot convert mode {img.mode!r}: {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def load_mask(path: str | Path, size: Size = None) -> torch.Tensor:
    """Load a defect mask as a float32 ``1 x H x W`` tensor with values in {0, 1}.

    Any nonzero (non-black) pixel, in any colour channel and any bit depth, is
    defect; palettes are expanded to colours first and alpha is ignored.  To resize, the
    mask is turned into 0/255, resized bilinearly and thresholded at 0.5: this is
    how the reference evaluation data were made, and it keeps thin defects.
    """
    path, hw = Path(path), _target_hw(size)
    with _decoded(path) as img:
        return _mask_tensor(path, img, hw)


def _mask_tensor(path: Path, img: Image.Image, hw: tuple[int, int] | None) -> torch.Tensor:
    try:
        img = _drop_alpha(img)  # also expands palettes: index 0 is not necessarily black
        arr = np.asarray(img)
        binary = arr != 0 if arr.ndim == 2 else np.any(arr != 0, axis=2)
    except Exception as exc:
        raise _error(path, f"cannot interpret mode {img.mode!r} as a mask: {exc}") from exc
    mask = Image.fromarray(binary.astype(np.uint8) * 255)  # uint8 2-D -> mode "L"
    if hw is not None and (mask.height, mask.width) != hw:
        mask = mask.resize((hw[1], hw[0]), Image.Resampling.BILINEAR, reducing_gap=None)
    out = (np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)
    return torch.from_numpy(out[None])
