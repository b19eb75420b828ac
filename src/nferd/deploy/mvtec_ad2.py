"""MVTec AD 2: the segmentation threshold from validation images, and the evaluation server's
submission folder.

The private test splits have no labels; MVTec's server scores them from a submission whose form
its public checker (``check_and_prepare_data_for_upload.py`` in ``MVTecAD2_public_code_utils``)
enforces, and which this module writes:

* ``<out>/anomaly_images/<category>/<split>/<stem>.tiff``: the anomaly map of every image of
  ``test_private`` and ``test_private_mixed``, single channel, float16, at the image's full size
  (the map is upsampled bilinearly from the model's resolution);
* ``<out>/anomaly_images_thresholded/<category>/<split>/<stem>.png``: the same maps binarised
  (0 normal, 255 anomalous) at the category's segmentation threshold;
* ``<out>.tar.gz``, the folder packed as the checker's ``compress_submission`` packs it.

The threshold is the one MVTec's baseline uses and the paper prescribes: the mean plus three
standard deviations of the per-pixel anomaly values of the good validation images, never of a
test image. A map value beyond float16's range (65504) is clipped; a NaN or infinite map is an
error, never a submission.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import AD2_PRIVATE_SPLITS, MVTecAD2Dataset
from ..data.images import open_image
from ..engine import safe_io
from ..errors import MissingDependency
from ..metrics import validation_threshold
from .predict import resize_map

FLOAT16_MAX = 65504.0


def _maps(predictor: Any, dataset: Dataset, batch_size: int = 8):  # type: ignore[no-untyped-def]
    """(paths, maps at the model's resolution) batch by batch."""
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        maps, _ = predictor.maps(batch["image"])
        yield list(batch["path"]), np.asarray(maps, dtype=np.float32)


def segmentation_threshold(predictor: Any, validation: Dataset) -> float:
    """Mean + 3 standard deviations of the good validation images' map values."""
    maps = np.concatenate([m for _, m in _maps(predictor, validation)])
    if not np.isfinite(maps).all():
        raise ValueError("the model gives NaN or infinite maps on the validation images: no threshold")
    return validation_threshold(maps)


def tiff_float16(amap: np.ndarray) -> bytes:
    """A single-channel float16 TIFF, the server's format for anomaly maps."""
    import tifffile
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.clip(amap, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16))
    return buf.getvalue()


def category_splits(root: str | Path, category: str, size: int) -> dict[str, Dataset]:
    """The validation split and every private split of ``category``: raises ``DatasetError``
    naming the first missing one, before anything is written."""
    return {split: MVTecAD2Dataset(root, category, split, size) for split in ("validation", *AD2_PRIVATE_SPLITS)}


def write_category(predictor: Any, splits: dict[str, Dataset], category: str, out: str | Path,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Maps and binarised maps of one category's private splits (``category_splits``) under
    ``out``; returns what it wrote."""
    out = Path(out)
    thr = segmentation_threshold(predictor, splits["validation"])
    written: dict[str, int] = {}
    for split in AD2_PRIVATE_SPLITS:
        n = 0
        maps_dir = safe_io.make_dir(out / "anomaly_images" / category / split)
        binary_dir = safe_io.make_dir(out / "anomaly_images_thresholded" / category / split)
        for paths, maps in _maps(predictor, splits[split]):
            for path, small in zip(paths, maps):
                if not np.isfinite(small).all():
                    raise ValueError(f"the anomaly map of '{path}' is not finite: no submission can hold it")
                with open_image(path) as im:
                    w, h = im.size
                full = resize_map(small, (h, w))
                stem = Path(path).stem
                safe_io.write_bytes(maps_dir / f"{stem}.tiff", tiff_float16(full))
                binary = Image.fromarray(np.where(full > thr, 255, 0).astype(np.uint8), mode="L")
                safe_io.save_image(binary_dir / f"{stem}.png", binary)
                n += 1
        written[split] = n
    log(f"{category}: threshold {thr:.5f} (validation mean + 3 std); "
        + ", ".join(f"{k} {v} maps" for k, v in written.items()))
    return {"threshold": thr, "images": written}


def pack(out: str | Path) -> Path:
    """``<out>.tar.gz`` holding the folder as ``<out name>/anomaly_images...``."""
    out = Path(out)
    archive = out.parent / f"{out.name}.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for sub in ("anomaly_images", "anomaly_images_thresholded"):
            if (out / sub).is_dir():
                tar.add(out / sub, arcname=f"{out.name}/{sub}")
    safe_io.write_bytes(archive, buf.getvalue())
    return archive


def write_submission(predictors: dict[str, Any], root: str | Path, out: str | Path,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole submission for ``predictors`` (category -> predictor), then its archive.

    Every category's splits are found before the first map is computed, and the folder is built
    under a temporary name and renamed to ``out`` (absent or empty) only when it is complete: a
    missing split or a failure leaves nothing behind, and the same command can simply be run again.
    """
    try:
        import tifffile  # noqa: F401  (the server reads float16 TIFF, which Pillow cannot write)
    except ImportError as e:
        raise MissingDependency("the MVTec AD 2 submission writes float16 TIFF maps with tifffile: "
                           "pip install 'nferd[mvtec-ad2]'") from e
    out = Path(out)
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise ValueError(f"'{out}' is not an empty folder: the server refuses a submission with extra files")
    splits = {cat: category_splits(root, cat, int(p.size)) for cat, p in predictors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with torch.no_grad():
            summary = {cat: write_category(p, splits[cat], cat, partial, log) for cat, p in predictors.items()}
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    safe_io.write_json(out.parent / f"{out.name}.json", {"categories": summary})
    return {"categories": summary, "archive": str(pack(out))}
