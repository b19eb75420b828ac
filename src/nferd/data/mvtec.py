"""MVTec AD, MVTec 3D-AD (RGB), MVTec LOCO and MVTec AD 2: one folder per category with
``train/good``, ``test/<defect>`` and ground-truth masks (AD 2: ``test_public`` and private splits)."""

from __future__ import annotations

from pathlib import Path

from .base import EXT_TEXT, GOOD, AnomalyDataset, DatasetError, ImageSize, Sample, images_in, stem_index
from .images import list_images


def mvtec_categories(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and (d / "train" / GOOD).is_dir()
    )


def type_image_folder(type_dir: Path) -> Path:
    """MVTec 3D-AD keeps the colour images in an ``rgb/`` subfolder."""
    rgb = type_dir / "rgb"
    return rgb if rgb.is_dir() else type_dir


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

    def __init__(self, root: str | Path, category: str, split: str = "train", image_size: ImageSize = 256,
                 image_metrics_only: bool = False) -> None:
        if split not in self.SPLITS:
            raise DatasetError(f"split must be one of {self.SPLITS}, got {split!r}")
        self.root, self.category = Path(root), category
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
            samples = [Sample(p, 0, GOOD) for p in images_in(type_image_folder(good_dir))]
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
        found = mvtec_categories(self.root)
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
            images = list_images(type_image_folder(type_dir))
            if type_dir.name == GOOD:
                samples += [Sample(p, 0, GOOD) for p in images]
                continue
            gt_index = stem_index(self.category_dir / "ground_truth" / type_dir.name)
            local_index = stem_index(type_dir / "gt")
            for p in images:
                masks = self._masks_for(p, type_dir, gt_index, local_index)
                samples.append(Sample(p, 1, type_dir.name, masks))
        if not samples:
            raise DatasetError(
                f"no images found under '{test_dir}' (looked for {EXT_TEXT} in "
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
            samples = [Sample(p, 0, GOOD) for p in images_in(folder / GOOD)]
        elif split == "test_public":
            gt = folder / "ground_truth" / "bad"
            samples = [Sample(p, 0, GOOD) for p in list_images(folder / GOOD)] if (folder / GOOD).is_dir() else []
            for p in list_images(folder / "bad") if (folder / "bad").is_dir() else []:
                mask = gt / f"{p.stem}_mask{p.suffix}"
                samples.append(Sample(p, 1, "bad", (mask,) if mask.is_file() else ()))
            if not samples:
                raise DatasetError(f"no images in '{folder}/good' or '{folder}/bad'")
        else:
            samples = [Sample(p, UNLABELLED, "unknown") for p in images_in(folder)]
        self.split_name = split
        super().__init__(samples, split, image_size, image_metrics_only,
                         f" (looked for '{folder / 'ground_truth' / 'bad'}/<stem>_mask.png')")
