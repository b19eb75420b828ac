"""What several verbs share: the datasets and categories an invocation names, tiling, the
model configuration, experiment tracking and the metrics line.

Imports of heavy modules sit inside the functions: a verb loads torch (and what else it needs)
when it runs, so ``--help``, ``--version`` and option errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from .options import CLIError, model_config_from


def datasets_for(args: argparse.Namespace, category: str | None, split: str, image_size: int):  # type: ignore[no-untyped-def]
    from ..data.datasets import make_dataset
    kw: dict[str, Any] = {}
    if split == "test" and getattr(args, "image_metrics_only", False):
        kw["image_metrics_only"] = True
    if args.data_format == "folder":
        if split == "test":
            kw.update({"test_normal_dir": args.test_normal_dir, "test_abnormal_dir": args.test_abnormal_dir,
                       "mask_dir": args.mask_dir})
            if not (args.test_normal_dir or args.test_abnormal_dir):
                raise CLIError("--format folder needs --test-normal-dir and/or --test-abnormal-dir to test")
            return make_dataset("folder", None, None, split, image_size, **kw)
    return make_dataset(args.data_format, args.data, category, split, image_size, **kw)


def categories(args: argparse.Namespace) -> list[str | None]:
    if args.data_format == "folder":
        return [None]
    if args.category is None:
        raise CLIError(f"--category is required: a category folder under '{args.data}', or 'all'. (--data "
                       "holds no images itself; for a folder of good images give that folder, or --format folder)")
    if args.category == "all":
        from ..data.datasets import discover_categories
        return list(discover_categories(args.data))
    return [args.category]


def result_name(args: argparse.Namespace, category: str | None) -> str:
    """The name results are filed under: the category, or for a plain folder the folder's name."""
    if category:
        return category
    folder = args.data or args.test_normal_dir or args.test_abnormal_dir
    name = Path(folder).resolve().name if folder else ""
    return (Path(folder).resolve().parent.name if name in ("good", "train", "ok") else name) or "images"


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
    try:
        return resolve_tiling(recorded, getattr(args, "tile", None), getattr(args, "tile_overlap", None), image_size)
    except ValueError as e:
        raise CLIError(str(e)) from e


def validation_set(args: argparse.Namespace, category: str | None, image_size: int | None):  # type: ignore[no-untyped-def]
    """A validation/good folder (MVTec 3D-AD, LOCO) calibrates instead of held-out training images."""
    if args.data_format == "folder" or category is None:
        return None
    if not (Path(args.data) / category / "validation" / "good").is_dir():
        return None
    ds = datasets_for(args, category, "validation", image_size)
    ds.calibration_source = "validation/good"
    return ds


def model_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    try:
        return model_config_from(args)
    except ValueError as e:
        raise CLIError(str(e)) from e


@contextlib.contextmanager
def tracking(args: argparse.Namespace, name: str, lead: bool = True):  # type: ignore[no-untyped-def]
    """An MLflow run when --mlflow asks for one (on the process that reports), else None."""
    if not getattr(args, "mlflow", False) or not lead:
        yield None
        return
    from ..engine.tracking import MLflowRun, TrackingUnavailable
    try:
        run = MLflowRun(name, uri=args.mlflow_uri, directory=args.mlflow_dir)
    except TrackingUnavailable as e:
        raise CLIError(str(e)) from e
    with run:
        print(f"MLflow run {run.run_id} in {run.uri}")
        yield run


def print_metrics(name: str, m: dict[str, Any]) -> None:
    keys = ("image_auroc", "image_ap", "image_f1max", "miss_at_1pct_fa") + (() if m.get("pixel_metrics_absent") else
                                                         ("pixel_auroc", "aupro", "pixel_ap", "segf1", "aupro_0.05"))
    print(f"{name}: " + "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m))
    if m.get("pixel_metrics_absent"):
        print(f"{name}: pixel metrics absent: {m['pixel_metrics_absent']}")
