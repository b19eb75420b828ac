"""Datasets for unsupervised anomaly detection (train on normal images only).

Every dataset yields the same item dict, so models and evaluation never care
where the data came from::

    {
        "image": float32 tensor 3 x H x W in [0, 1], NOT normalised (the teacher normalises),
        "mask": float32 tensor 1 x H x W in {0, 1}, all zeros for normal images
                (and for anomalous images when the dataset has no masks),
        "label": int, 0 normal / 1 anomalous,
        "path": str, the image file,
        "defect_type": str, "good" for normal images,
        "index": int, position in the dataset,
    }

The values are tensors, ints and strs, so torch's default collate batches them.
Every dataset has ``has_masks``: True when every anomalous sample has a pixel
mask (the all-zero masks of normal samples are ground truth too), i.e. when
pixel-level metrics are meaningful. A test split whose anomalous images have no
masks at all (people sorted parts OK / NOK, nobody painted masks) is valid: it
is evaluated on image metrics, and ``no_masks_reason`` says why pixel metrics
are absent. A split where only some anomalous images have a mask is refused
with the list of missing masks, unless ``image_metrics_only`` is given (then
every mask is ignored).

All problems with the data on disk raise :class:`DatasetError` (a ValueError)
with a message that names the file or folder and says what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .base import GOOD, AnomalyDataset, DatasetError, ImageSize, Sample
from .folder import FolderDataset
from .images import ImageLoadError
from .mvtec import AD2_PRIVATE_SPLITS, AD2_SPLITS, MVTecAD2Dataset, MVTecDataset, is_mvtec_ad2, mvtec_categories
from .visa import VisADataset, visa_objects

__all__ = [
    "AD2_PRIVATE_SPLITS",
    "AD2_SPLITS",
    "DATASET_KINDS",
    "AnomalyDataset",
    "DatasetError",
    "FolderDataset",
    "MVTecAD2Dataset",
    "MVTecDataset",
    "Sample",
    "VisADataset",
    "detect_format",
    "discover_categories",
    "make_dataset",
    "readable",
    "sample_path",
]


DATASET_KINDS: tuple[str, ...] = ("mvtec", "mvtec_ad2", "visa", "folder")


def discover_categories(root: str | Path) -> list[str]:
    """Category names under ``root`` for ``--category all``, sorted.

    MVTec-like: subfolders containing ``train/good``.  If there are none and
    ``root/split_csv/1cls.csv`` exists, the VisA objects listed there.
    Raises DatasetError if nothing is found, rather than silently doing nothing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root '{root}' does not exist")
    found = mvtec_categories(root)
    visa_csv = root / "split_csv" / "1cls.csv"
    if not found and visa_csv.is_file():
        found = visa_objects(visa_csv)
    if not found:
        raise DatasetError(
            f"no categories found under '{root}': expected subfolders with train/{GOOD}/ "
            f"(MVTec layout) or a VisA split_csv/1cls.csv"
        )
    return found


def sample_path(dataset: Dataset, index: int) -> str | None:
    """The file of item ``index`` (through ``Subset`` wrappers), or None for a dataset without files."""
    from torch.utils.data import Subset
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None)
    return str(samples[index].path) if samples is not None else None


def readable(dataset: Dataset, progress: bool = False) -> tuple[Dataset, list[dict[str, str]]]:
    """The images of ``dataset`` that decode (all of it, or a ``Subset``) and, for each one that
    does not, its path and the reason: one bad file among thousands should not stop a training run."""
    from torch.utils.data import Subset
    keep, bad = [], []
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="checking images", unit="img", leave=False)
    for i in indices:
        try:
            dataset[i]
            keep.append(i)
        except ImageLoadError as e:
            bad.append({"path": sample_path(dataset, i) or str(i), "error": str(e)})
    return (dataset if not bad else Subset(dataset, keep)), bad


def detect_format(root: str | Path, category: str | None = None) -> str:
    """Guess the dataset kind: "mvtec_ad2" if ``root/category/test_public`` exists, "mvtec" if
    ``root/category/train`` exists, else "visa" if
    ``root/split_csv`` exists, else "mvtec" (whose errors then explain the expected layout)."""
    root = Path(root)
    if is_mvtec_ad2(root, category):
        return "mvtec_ad2"
    if category and (root / category / "train").is_dir():
        return "mvtec"
    return "visa" if (root / "split_csv").is_dir() else "mvtec"


def make_dataset(
    kind: str,
    root: str | Path,
    category: str | None,
    split: str,
    image_size: ImageSize = 256,
    **kwargs: Any,
) -> AnomalyDataset:
    """Build a dataset by kind: "mvtec", "visa", "folder" or "auto" (see detect_format).

    For "folder", ``root`` is the normal-image folder, ``category`` is ignored and
    ``kwargs`` take ``test_normal_dir``, ``test_abnormal_dir`` and ``mask_dir``.
    For "visa", ``kwargs`` may give ``split_csv``.
    """
    kind = kind.lower()
    if kind == "auto":
        kind = detect_format(root, category)
    if kind == "folder":
        return FolderDataset(root, split, image_size, **kwargs)
    if kind not in DATASET_KINDS:
        choices = ", ".join((*DATASET_KINDS, "auto"))
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {choices}")
    if not category:
        raise DatasetError(f"a {kind} dataset needs a category")
    if kind == "visa":
        return VisADataset(root, category, split, image_size, **kwargs)
    if kind == "mvtec_ad2":
        return MVTecAD2Dataset(root, category, split, image_size, **kwargs)
    return MVTecDataset(root, category, split, image_size, **kwargs)
