"""What several verbs share: the images an invocation names, tiling and experiment tracking.

Imports of heavy modules sit inside the functions: a verb loads torch (and what else it needs)
when it runs, so ``--help``, ``--version`` and option errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from .options import CLIError


def data_spec(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The images an invocation names (``--data``, ``--category``, ``--format`` and the folder options)."""
    from ..engine.runs import DataSpec
    return DataSpec(args.data, args.category, args.data_format, getattr(args, "test_normal_dir", None),
                    getattr(args, "test_abnormal_dir", None), getattr(args, "mask_dir", None),
                    getattr(args, "image_metrics_only", False))


def recorded_data(args: argparse.Namespace) -> None:
    """No --data (and no folder test options): the data the checkpoint records it was trained on."""
    if args.data or args.data_format == "folder":
        return
    from ..engine.checkpoint import read_metadata
    ckpt = Path(args.checkpoint)
    recorded = (read_metadata(ckpt if (ckpt / "model.safetensors").is_file() or ckpt.is_file() else
                              next(ckpt.glob("*/model.safetensors"), ckpt)).get("data") or {})
    if not recorded.get("root") or not Path(recorded["root"]).exists():
        raise CLIError("--data is required: the test images (a dataset root with --category, or --test-normal-dir "
                       "and --test-abnormal-dir for a model trained on a plain folder)"
                       + (f"; the checkpoint's training data '{recorded['root']}' is not there any more"
                          if recorded.get("root") else ""))
    args.data, args.data_format = recorded["root"], recorded.get("format") or "auto"
    if args.category is None:
        args.category = recorded.get("category")
    if args.data_format == "folder":
        raise CLIError("this model was trained on a plain folder of good images: pass its labelled test images "
                       "with --test-normal-dir and --test-abnormal-dir (and --mask-dir)")


def tiling_for(args: argparse.Namespace, recorded: dict[str, Any] | None, image_size: int):  # type: ignore[no-untyped-def]
    """The tiling to score with: the model's own (``recorded``), or --tile / --tile-overlap."""
    from ..data.tiles import resolve_tiling
    return resolve_tiling(recorded, getattr(args, "tile", None), getattr(args, "tile_overlap", None), image_size)


@contextlib.contextmanager
def tracking(args: argparse.Namespace, name: str):  # type: ignore[no-untyped-def]
    """An MLflow run when --mlflow asks for one, else None."""
    if not getattr(args, "mlflow", False):
        yield None
        return
    from ..engine.runs import Tracking
    with Tracking(args.mlflow_uri, args.mlflow_dir).run(name) as run:
        yield run
