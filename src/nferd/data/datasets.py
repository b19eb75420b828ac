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

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image, load_mask

__all__ = [
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
]

DATASET_KINDS: tuple[str, ...] = ("mvtec", "mvtec_ad2", "visa", "folder")
GOOD = "good"
VISA_ANOMALY = "anomaly"
_EXT_TEXT = ", ".join(IMAGE_EXTENSIONS)

ImageSize = int | tuple[int, int] | None


class DatasetError(ValueError):
    """The data on disk does not have the expected layout or content."""


@dataclass(frozen=True)
class Sample:
    """One image on disk; ``mask_paths`` are unioned (LOCO has several per image)."""

    path: Path
    label: int
    defect_type: str
    mask_paths: tuple[Path, ...] = ()


def _images_in(folder: Path) -> list[Path]:
    """Images in a folder that must exist and must not be empty."""
    if not folder.is_dir():
        raise DatasetError(f"folder '{folder}' does not exist")
    images = list_images(folder)
    if not images:
        raise DatasetError(f"no images found in '{folder}' (looked for {_EXT_TEXT})")
    return images


class AnomalyDataset(Dataset):
    """A list of :class:`Sample` loaded lazily into the common item dict."""

    labelled = True  # False for a split whose images have no OK / NOK label (MVTec AD 2's private tests)

    def __init__(self, samples: Sequence[Sample], split: str, image_size: ImageSize = 256,
                 image_metrics_only: bool = False, where_masks: str = "") -> None:
        if not samples:
            raise DatasetError(f"the {split!r} split has no images")
        anomalous = [s for s in samples if s.label == 1]
        missing = [s.path for s in anomalous if not s.mask_paths]
        self.no_masks_reason: str | None = None
        if image_metrics_only and anomalous:
            samples = [Sample(s.path, s.label, s.defect_type) for s in samples]
            self.no_masks_reason = "image metrics only were asked for (--image-metrics-only): masks ignored"
        elif missing and len(missing) == len(anomalous):
            self.no_masks_reason = (f"the {len(anomalous)} anomalous images have image labels but no "
                                    f"ground-truth masks{where_masks}: pixel metrics need masks")
        elif missing:
            shown = "\n  ".join(map(str, missing[:20])) + (f"\n  ... and {len(missing) - 20} more"
                                                          if len(missing) > 20 else "")
            raise DatasetError(f"{len(missing)} of {len(anomalous)} anomalous images have no ground-truth mask"
                               f"{where_masks}:\n  {shown}\nadd their masks, or evaluate on image labels alone with "
                               f"--image-metrics-only")
        self.samples: list[Sample] = list(samples)
        self.split = split
        self.image_size = image_size
        self.has_masks: bool = self.no_masks_reason is None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """Image labels in dataset order (no file I/O), for metrics and sanity checks."""
        return [s.label for s in self.samples]

    @property
    def defect_types(self) -> list[str]:
        """Defect type of each sample in dataset order (no file I/O)."""
        return [s.defect_type for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        sample = self.samples[index]
        image = load_image(sample.path, self.image_size)
        hw = tuple(image.shape[-2:])  # masks always match the image, whatever their file size
        mask = torch.zeros(1, *hw, dtype=torch.float32)
        for mask_path in sample.mask_paths:
            mask = torch.maximum(mask, load_mask(mask_path, hw))
        return {
            "image": image,
            "mask": mask,
            "label": sample.label,
            "path": str(sample.path),
            "defect_type": sample.defect_type,
            "index": index,
        }

    def __repr__(self) -> str:
        n_bad = sum(self.labels)
        return (
            f"{type(self).__name__}(split={self.split!r}, images={len(self)}, "
            f"normal={len(self) - n_bad}, anomalous={n_bad}, has_masks={self.has_masks})"
        )


# --------------------------------------------------------------------------- MVTec family


def _mvtec_categories(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and (d / "train" / GOOD).is_dir()
    )


def _type_image_folder(type_dir: Path) -> Path:
    """MVTec 3D-AD keeps the colour images in an ``rgb/`` subfolder."""
    rgb = type_dir / "rgb"
    return rgb if rgb.is_dir() else type_dir


def _stem_index(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in list_images(folder)} if folder.is_dir() else {}


class MVTecDataset(AnomalyDataset):
    """MVTec AD layout; also MVTec 3D-AD (RGB only) and MVTec LOCO.

    Images: ``root/category/{train,validation}/good`` and ``root/category/test/<type>``,
    each optionally with an ``rgb/`` subfolder (3D-AD).  The mask of an anomalous
    image ``<stem>`` is the first of:

    1. ``ground_truth/<type>/<stem>_mask.*`` (MVTec AD)
    2. ``ground_truth/<type>/<stem>.*``
    3. ``ground_truth/<type>/<stem>/*`` union of all images in it (LOCO)
    4. ``test/<type>/gt/<stem>.*`` or ``<stem>_mask.*`` (3D-AD)
    """

    SPLITS = ("train", "validation", "test")

    def __init__(
        self,
        root: str | Path,
        category: str,
        split: str = "train",
        image_size: ImageSize = 256,
        image_metrics_only: bool = False,
    ) -> None:
        if split not in self.SPLITS:
            raise DatasetError(f"split must be one of {self.SPLITS}, got {split!r}")
        self.root = Path(root)
        self.category = category
        self.category_dir = self.root / category
        self._check_category()
        if split == "test":
            samples = self._test_samples()
        else:
            good_dir = self.category_dir / split / GOOD
            if not good_dir.is_dir():
                note = " (only MVTec 3D-AD and LOCO ship one)" if split == "validation" else ""
                raise DatasetError(
                    f"'{good_dir}' not found: the {split!r} split of an MVTec-style "
                    f"category needs normal images in {split}/{GOOD}/{note}"
                )
            samples = [Sample(p, 0, GOOD) for p in _images_in(_type_image_folder(good_dir))]
        gt = self.category_dir / "ground_truth"
        super().__init__(samples, split, image_size, image_metrics_only,
                         f" (looked for '{gt}/<defect_type>/<stem>_mask.*', '<stem>.*' or '<stem>/', and "
                         f"'test/<defect_type>/gt/<stem>.*')")

    def _check_category(self) -> None:
        if self.category_dir.is_dir() and any(
            (self.category_dir / s).is_dir() for s in self.SPLITS
        ):
            return
        expected = (
            f"expected '{self.category_dir}/train/{GOOD}/*.png' and "
            f"'{self.category_dir}/test/<defect_type>/*.png'"
        )
        if not self.root.is_dir():
            raise DatasetError(f"dataset root '{self.root}' does not exist ({expected})")
        found = _mvtec_categories(self.root)
        what = "not found" if not self.category_dir.exists() else "has no train/ or test/ folder"
        available = (
            f"categories found under '{self.root}': {', '.join(found)}"
            if found
            else f"no MVTec-style categories (folders with train/{GOOD}/) found under '{self.root}'"
        )
        raise DatasetError(f"category folder '{self.category_dir}' {what}; {expected}; {available}")

    def _test_samples(self) -> list[Sample]:
        test_dir = self.category_dir / "test"
        if not test_dir.is_dir():
            raise DatasetError(f"'{test_dir}' not found: expected test/<defect_type>/ folders")
        type_dirs = sorted(
            (d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
            key=lambda d: (d.name != GOOD, d.name),  # normal images first
        )
        samples: list[Sample] = []
        for type_dir in type_dirs:
            images = list_images(_type_image_folder(type_dir))
            if type_dir.name == GOOD:
                samples += [Sample(p, 0, GOOD) for p in images]
                continue
            gt_index = _stem_index(self.category_dir / "ground_truth" / type_dir.name)
            local_index = _stem_index(type_dir / "gt")
            for p in images:
                masks = self._masks_for(p, type_dir, gt_index, local_index)
                samples.append(Sample(p, 1, type_dir.name, masks))
        if not samples:
            raise DatasetError(
                f"no images found under '{test_dir}' (looked for {_EXT_TEXT} in "
                f"test/<defect_type>/ and test/<defect_type>/rgb/)"
            )
        return samples

    @staticmethod
    def _masks_for(
        image: Path, type_dir: Path, gt_index: dict[str, Path], local_index: dict[str, Path]
    ) -> tuple[Path, ...]:
        stem = image.stem
        for key in (f"{stem}_mask", stem):
            if key in gt_index:
                return (gt_index[key],)
        loco_dir = type_dir.parent.parent / "ground_truth" / type_dir.name / stem
        if loco_dir.is_dir() and (masks := list_images(loco_dir)):
            return tuple(masks)
        for key in (stem, f"{stem}_mask"):
            if key in local_index:
                return (local_index[key],)
        return ()  # no mask: the whole split is judged by AnomalyDataset


MVTEC_AD2_CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
AD2_PRIVATE_SPLITS = ("test_private", "test_private_mixed")
AD2_SPLITS = ("train", "validation", "test_public", *AD2_PRIVATE_SPLITS)
UNLABELLED = -1  # label of the images of a split without labels


def is_mvtec_ad2(root: str | Path, category: str | None) -> bool:
    """A category folder with a ``test_public`` split is MVTec AD 2."""
    return bool(category) and (Path(root) / str(category) / "test_public").is_dir()


class MVTecAD2Dataset(AnomalyDataset):
    """MVTec AD 2 (Heckler-Kram et al., 2025), as MVTec's public evaluation utilities and anomalib's
    ``MVTecAD2Dataset`` lay it out::

        ROOT/<category>/{train,validation}/good/*.png
        ROOT/<category>/test_public/{good,bad}/*.png
        ROOT/<category>/test_public/ground_truth/bad/<stem>_mask.png
        ROOT/<category>/{test_private,test_private_mixed}/*.png   (no labels)

    ``split="test"`` is ``test_public``, the only split with labels and masks. The private splits
    load with ``labelled`` False: they are scored for the evaluation server
    (:mod:`nferd.deploy.mvtec_ad2`), never evaluated here.
    """

    def __init__(self, root: str | Path, category: str, split: str = "train", image_size: ImageSize = 256,
                 image_metrics_only: bool = False) -> None:
        split = "test_public" if split == "test" else split
        if split not in AD2_SPLITS:
            raise DatasetError(f"MVTec AD 2 split must be one of {', '.join(AD2_SPLITS)} (or test), got {split!r}")
        self.root, self.category = Path(root), category
        self.category_dir = self.root / category
        if not self.category_dir.is_dir():
            raise DatasetError(f"category folder '{self.category_dir}' not found (MVTec AD 2 categories: "
                               f"{', '.join(MVTEC_AD2_CATEGORIES)})")
        folder = self.category_dir / split
        if not folder.is_dir():
            raise DatasetError(f"'{folder}' not found: an MVTec AD 2 category has {', '.join(AD2_SPLITS)}")
        self.labelled = split not in AD2_PRIVATE_SPLITS
        if split in ("train", "validation"):
            samples = [Sample(p, 0, GOOD) for p in _images_in(folder / GOOD)]
        elif split == "test_public":
            gt = folder / "ground_truth" / "bad"
            samples = [Sample(p, 0, GOOD) for p in list_images(folder / GOOD)] if (folder / GOOD).is_dir() else []
            for p in list_images(folder / "bad") if (folder / "bad").is_dir() else []:
                mask = gt / f"{p.stem}_mask{p.suffix}"
                samples.append(Sample(p, 1, "bad", (mask,) if mask.is_file() else ()))
            if not samples:
                raise DatasetError(f"no images in '{folder}/good' or '{folder}/bad'")
        else:
            samples = [Sample(p, UNLABELLED, "unknown") for p in _images_in(folder)]
        self.split_name = split
        super().__init__(samples, split, image_size, image_metrics_only,
                         f" (looked for '{folder / 'ground_truth' / 'bad'}/<stem>_mask.png')")


# --------------------------------------------------------------------------- VisA


class VisADataset(AnomalyDataset):
    """VisA via its split CSV (``object,split,label,image,mask``, paths relative to root).

    Defect types are not in the CSV, so anomalous images get ``defect_type="anomaly"``.
    """

    COLUMNS = ("object", "split", "label", "image", "mask")

    def __init__(
        self,
        root: str | Path,
        category: str,
        split: str = "train",
        image_size: ImageSize = 256,
        split_csv: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.category = category
        default_csv = self.root / "split_csv" / "1cls.csv"
        self.split_csv = Path(split_csv) if split_csv is not None else default_csv
        rows = self._read_rows()
        objects = sorted({r["object"] for _, r in rows})
        if category not in objects:
            raise DatasetError(
                f"category {category!r} not in '{self.split_csv}'; objects listed there: "
                f"{', '.join(objects) or '(none)'}"
            )
        rows = [(line, r) for line, r in rows if r["object"] == category]
        splits = sorted({r["split"] for _, r in rows})
        rows = [(line, r) for line, r in rows if r["split"] == split]
        if not rows:
            raise DatasetError(
                f"no rows with object={category!r}, split={split!r} in '{self.split_csv}'; "
                f"splits listed for this object: {', '.join(splits)}"
            )
        samples = [self._sample(line, r) for line, r in rows]
        missing = [str(p) for s in samples for p in (s.path, *s.mask_paths) if not p.is_file()]
        if missing:
            shown = ", ".join(f"'{m}'" for m in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DatasetError(
                f"{len(missing)} file(s) listed in '{self.split_csv}' do not exist: {shown}{more} "
                f"(paths are resolved relative to root '{self.root}')"
            )
        super().__init__(samples, split, image_size)

    def _read_rows(self) -> list[tuple[int, dict[str, str]]]:
        if not self.split_csv.is_file():
            raise DatasetError(
                f"VisA split file '{self.split_csv}' not found; expected a CSV with columns "
                f"{','.join(self.COLUMNS)} (VisA ships split_csv/1cls.csv), or pass split_csv="
            )
        with self.split_csv.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in self.COLUMNS if c not in header]
            if missing:
                raise DatasetError(
                    f"'{self.split_csv}' lacks column(s) {', '.join(missing)}; "
                    f"found {', '.join(header) or '(no header)'}"
                )
            return [
                (reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k})
                for row in reader
            ]

    def _sample(self, line: int, row: dict[str, str]) -> Sample:
        label = {"normal": 0, "anomaly": 1}.get(row["label"].lower())
        where = f"'{self.split_csv}' line {line}"
        if label is None:
            raise DatasetError(
                f"{where}: label must be 'normal' or 'anomaly', got {row['label']!r}"
            )
        if not row["image"]:
            raise DatasetError(f"{where}: empty image path")
        masks: tuple[Path, ...] = ()
        if label == 1:
            if not row["mask"]:
                raise DatasetError(f"{where}: anomalous image '{row['image']}' has no mask path")
            masks = (self.root / row["mask"],)
        return Sample(self.root / row["image"], label, VISA_ANOMALY if label else GOOD, masks)


# --------------------------------------------------------------------------- plain folders


class FolderDataset(AnomalyDataset):
    """Plain folders of images: your own data without any particular layout.

    ``train``: every image in ``normal_dir``.  ``test``: ``test_normal_dir`` (label 0)
    then ``test_abnormal_dir`` (label 1, ``defect_type`` = that folder's name).
    Masks are matched by stem in ``mask_dir`` (``<stem>.*`` or ``<stem>_mask.*``);
    without ``mask_dir`` masks are all zeros and ``has_masks`` is False when
    there are anomalous images.
    """

    SPLITS = ("train", "test")

    def __init__(
        self,
        normal_dir: str | Path | None,
        split: str = "train",
        image_size: ImageSize = 256,
        test_normal_dir: str | Path | None = None,
        test_abnormal_dir: str | Path | None = None,
        mask_dir: str | Path | None = None,
        image_metrics_only: bool = False,
    ) -> None:
        if split not in self.SPLITS:
            raise DatasetError(f"split must be one of {self.SPLITS}, got {split!r}")
        self.normal_dir = Path(normal_dir) if normal_dir is not None else None
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        if split == "train":
            if self.normal_dir is None:
                raise DatasetError("the train split of a folder dataset needs normal_dir")
            samples = [Sample(p, 0, GOOD) for p in _images_in(self.normal_dir)]
        else:
            if test_normal_dir is None and test_abnormal_dir is None:
                raise DatasetError(
                    "the test split of a folder dataset needs test_normal_dir "
                    "and/or test_abnormal_dir"
                )
            if self.mask_dir is not None and not self.mask_dir.is_dir():
                raise DatasetError(f"mask folder '{self.mask_dir}' does not exist")
            samples = []
            if test_normal_dir is not None:
                samples += [Sample(p, 0, GOOD) for p in _images_in(Path(test_normal_dir))]
            if test_abnormal_dir is not None:
                abnormal_dir = Path(test_abnormal_dir)
                index = _stem_index(self.mask_dir) if self.mask_dir is not None else {}
                samples += [
                    Sample(p, 1, abnormal_dir.name, self._masks_for(p, index))
                    for p in _images_in(abnormal_dir)
                ]
        where = f" (looked in '{self.mask_dir}')" if self.mask_dir is not None else " (no mask folder given)"
        super().__init__(samples, split, image_size, image_metrics_only, where)

    def _masks_for(self, image: Path, index: dict[str, Path]) -> tuple[Path, ...]:
        if self.mask_dir is None:
            return ()
        for key in (image.stem, f"{image.stem}_mask"):
            if key in index:
                return (index[key],)
        return ()  # no mask: the whole split is judged by AnomalyDataset


# --------------------------------------------------------------------------- helpers


def _visa_objects(split_csv: Path) -> list[str]:
    with split_csv.open(newline="", encoding="utf-8-sig") as f:
        return sorted({(row.get("object") or "").strip() for row in csv.DictReader(f)} - {""})


def discover_categories(root: str | Path) -> list[str]:
    """Category names under ``root`` for ``--category all``, sorted.

    MVTec-like: subfolders containing ``train/good``.  If there are none and
    ``root/split_csv/1cls.csv`` exists, the VisA objects listed there.
    Raises DatasetError if nothing is found, rather than silently doing nothing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root '{root}' does not exist")
    found = _mvtec_categories(root)
    visa_csv = root / "split_csv" / "1cls.csv"
    if not found and visa_csv.is_file():
        found = _visa_objects(visa_csv)
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
