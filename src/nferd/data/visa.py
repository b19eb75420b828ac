"""VisA: images and masks listed by a split CSV (``split_csv/1cls.csv``)."""

from __future__ import annotations

import csv
from pathlib import Path

from .base import GOOD, VISA_ANOMALY, AnomalyDataset, DatasetError, ImageSize, Sample


class VisADataset(AnomalyDataset):
    """VisA via its split CSV (``object,split,label,image,mask``, paths relative to root).

    Defect types are not in the CSV, so anomalous images get ``defect_type="anomaly"``.
    """

    COLUMNS = ("object", "split", "label", "image", "mask")

    def __init__(self, root: str | Path, category: str, split: str = "train", image_size: ImageSize = 256,
                 split_csv: str | Path | None = None) -> None:
        self.root, self.category = Path(root), category
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


def visa_objects(split_csv: Path) -> list[str]:
    with split_csv.open(newline="", encoding="utf-8-sig") as f:
        return sorted({(row.get("object") or "").strip() for row in csv.DictReader(f)} - {""})
