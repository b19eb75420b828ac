"""A plain folder of good images for training, and folders of good / defective images (with
optional masks matched by file stem) for testing."""

from __future__ import annotations

from pathlib import Path

from .base import GOOD, AnomalyDataset, DatasetError, ImageSize, Sample, images_in, stem_index


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
            samples = [Sample(p, 0, GOOD) for p in images_in(self.normal_dir)]
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
                samples += [Sample(p, 0, GOOD) for p in images_in(Path(test_normal_dir))]
            if test_abnormal_dir is not None:
                abnormal_dir = Path(test_abnormal_dir)
                index = stem_index(self.mask_dir) if self.mask_dir is not None else {}
                samples += [
                    Sample(p, 1, abnormal_dir.name, self._masks_for(p, index))
                    for p in images_in(abnormal_dir)
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
