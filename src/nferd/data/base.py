"""What every dataset shares: the item dict, the sample list, masks and their checks.

See :mod:`nferd.data.datasets` for the item contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import NferdError, option
from .images import IMAGE_EXTENSIONS, list_images, load_image, load_mask

GOOD = "good"


VISA_ANOMALY = "anomaly"


EXT_TEXT = ", ".join(IMAGE_EXTENSIONS)


ImageSize = int | tuple[int, int] | None


class DatasetError(NferdError, ValueError):
    """The data on disk does not have the expected layout or content."""


@dataclass(frozen=True)
class Sample:
    """One image on disk; ``mask_paths`` are unioned (LOCO has several per image)."""

    path: Path
    label: int
    defect_type: str
    mask_paths: tuple[Path, ...] = ()


def images_in(folder: Path) -> list[Path]:
    """Images in a folder that must exist and must not be empty."""
    if not folder.is_dir():
        raise DatasetError(f"folder '{folder}' does not exist")
    images = list_images(folder)
    if not images:
        raise DatasetError(f"no images found in '{folder}' (looked for {EXT_TEXT})")
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
            self.no_masks_reason = "image metrics only were asked for: masks ignored"
        elif missing and len(missing) == len(anomalous):
            self.no_masks_reason = (f"the {len(anomalous)} anomalous images have image labels but no "
                                    f"ground-truth masks{where_masks}: pixel metrics need masks")
        elif missing:
            shown = "\n  ".join(map(str, missing[:20])) + (f"\n  ... and {len(missing) - 20} more"
                                                          if len(missing) > 20 else "")
            raise DatasetError(f"{len(missing)} of {len(anomalous)} anomalous images have no ground-truth mask"
                               f"{where_masks}:\n  {shown}\nadd their masks, or evaluate on image labels alone with "
                               f"{option('image_metrics_only')}")
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


def stem_index(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in list_images(folder)} if folder.is_dir() else {}
