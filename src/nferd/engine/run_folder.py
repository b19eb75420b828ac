"""A run folder's state: its training log (cut back to the last checkpoint on resume), its last
logged loss, and whether the run finished."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import (
    WEIGHTS_NAME,
    read_metadata,
)
from .safe_io import write_text


def truncate_log(path: Path, epochs: int) -> None:
    """Keep the records of epochs 1 to ``epochs`` of a training log, one per epoch (the latest), so
    that a resumed run appends each later epoch once; a half-written last line is dropped."""
    if path.is_symlink() or not path.is_file():
        return  # nothing to keep (a link is refused when the log is opened)
    text = path.read_text(errors="replace")
    records: dict[int, str] = {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            epoch = int(rec["epoch"])
        except (ValueError, TypeError, KeyError):
            continue
        if 1 <= epoch <= epochs:
            records[epoch] = line
    kept = "".join(records[e] + "\n" for e in sorted(records))
    if kept != text:
        write_text(path, kept)


def logged_loss(path: Path) -> float | None:
    """The loss of the last epoch in a training log (a run resumed after its last epoch trains none)."""
    try:
        return float(json.loads(path.read_text().splitlines()[-1])["loss"])
    except (OSError, IndexError, ValueError, TypeError, KeyError):
        return None


def finished_run(out_dir: str | Path, epochs: int | None = None) -> dict[str, Any] | None:
    """The metadata of ``out_dir/model.safetensors`` when a run in ``out_dir`` finished (its model is
    written only after the last epoch and calibration) with at least ``epochs`` epochs, else None:
    a finished run asked for more epochs is continued from its last checkpoint."""
    f = Path(out_dir) / WEIGHTS_NAME
    if not f.is_file():
        return None
    meta = read_metadata(f)
    return meta if epochs is None or int(meta.get("epoch") or 0) >= epochs else None
