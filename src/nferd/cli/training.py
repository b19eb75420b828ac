"""The verbs that fit a model: ``train``, ``test``, ``calibrate`` and the ``demo``.

Imports of heavy modules sit inside the functions: a verb loads torch (and what else it needs)
when it runs, so ``--help``, ``--version`` and option errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..text import count
from .common import data_spec, recorded_data, tiling_for, tracking
from .options import CLIError, model_config_from

if TYPE_CHECKING:
    from ..engine.calibration import Calibration


def cmd_train(args: argparse.Namespace) -> int:
    from ..engine.runs import Tracking, train_categories
    from ..engine.train import TrainConfig
    if args.tile:  # the model's input is a tile
        args.image_size = args.tile
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if given["tile_overlap"] is None:  # not given (scoring reads None as the model's own): the config's default
        del given["tile_overlap"]
    tcfg = TrainConfig(**given)
    train_categories(data_spec(args), model_config_from(args), tcfg, args.out, teacher_weights=args.teacher_weights,
                     resume=args.resume, test=args.test, sync_bn=args.sync_bn,
                     tracking=Tracking(args.mlflow_uri, args.mlflow_dir) if args.mlflow else None)
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from ..engine.calibration import as_calibration
    from ..engine.checkpoint import load_checkpoint
    from ..engine.evaluate import write_results
    from ..engine.runs import evaluate_category, print_metrics
    report = getattr(args, "report", False)
    if report:
        from ..deploy.report import add_explanations, prepare_category, require_matplotlib
        require_matplotlib()  # before the evaluation, not after it
        if args.report_gallery < 0:
            raise CLIError(f"--report-gallery must be >= 0, got {args.report_gallery}")
    rows: dict[str, dict[str, Any]] = {}
    sections: dict[str, dict[str, Any]] = {}
    run: dict[str, Any] = {}
    t0, report_seconds = time.perf_counter(), 0.0
    recorded_data(args)
    data = data_spec(args)
    for cat in data.categories():
        ckpt = Path(args.checkpoint) / cat if (args.category == "all" and cat) else Path(args.checkpoint)
        model, meta = load_checkpoint(ckpt)
        cal = as_calibration(meta.get("calibration"))
        tiling = tiling_for(args, meta.get("tiling"), model.config.image_size)
        test_set = data.dataset(cat, "test", None if tiling else model.config.image_size)
        metrics, raw = evaluate_category(model, data, cat, test_set, batch_size=args.batch_size, device=args.device,
                                         precision=args.precision, tiling=tiling)
        name = data.name(cat)
        rows[name] = metrics
        if cal is not None:
            metrics["at_threshold"] = at_threshold(raw, cal)
        if report:  # reduced now, so only one category's maps are held at a time
            t1 = time.perf_counter()
            sections[name] = prepare_category({**raw, "metrics": metrics}, cal,
                                                         gallery_size=args.report_gallery)
            if tiling is None:
                add_explanations(sections[name], model, meta.get("memory_images"), raw["maps"])
            report_seconds += time.perf_counter() - t1
        del raw
        print_metrics(name, metrics)
        if "at_threshold" in metrics:
            a = metrics["at_threshold"]
            print(f"at the calibrated threshold: {a['false_alarms']} of {a['good']} good images flagged "
                  f"({a['false_alarm_rate']:.1%}), {a['misses']} of {a['defective']} defective missed"
                  + (f"; calibration bound {a['false_alarm_bound']:.1%} at {a['confidence']:.0%} confidence from "
                     f"{a['n_images']} normal images" if a.get("false_alarm_bound") is not None else ""))
        run = {"checkpoint": str(args.checkpoint), "teacher": meta["teacher"]["name"], "model": meta["model"],
               "epochs": meta.get("epoch"), "train_seconds": meta.get("train_seconds"), "train": meta.get("train")}
    run["eval_seconds"] = time.perf_counter() - t0 - report_seconds
    import torch

    from ..engine.device import resolve_device
    from ..engine.provenance import provenance
    run["provenance"] = provenance(torch.get_num_threads(), str(resolve_device(args.device)))
    path = write_results(args.out, rows, run)
    print(f"results: {path}")
    with tracking(args, f"test {data.name(args.category)}") as tracked:
        if tracked is not None:
            tracked.params({"checkpoint": str(args.checkpoint), "data": str(args.data), "category": args.category,
                            "model": run.get("model"), "epochs": run.get("epochs")})
            for name, m in rows.items():
                tracked.metrics(m, prefix=f"{name}." if len(rows) > 1 else "")
                if "at_threshold" in m:
                    tracked.metrics({k: m["at_threshold"][k] for k in ("false_alarms", "misses")},
                                    prefix=f"{name}.at_threshold." if len(rows) > 1 else "at_threshold.")
            tracked.tag("results", path)
    if report:
        from ..deploy.report import write_report
        t1 = time.perf_counter()
        path = write_report(args.out, sections, run)
        print(f"report: {path} ({report_seconds + time.perf_counter() - t1:.1f} s)")
    return 0


def at_threshold(raw: dict[str, Any], cal: Calibration) -> dict[str, Any]:
    """Decisions on the test split at the checkpoint's calibrated threshold, next to the
    false-alarm bound the calibration promised (when it was fitted on normal images only)."""
    c = cal.counts(raw["scores"], raw["labels"])
    return {**c, "false_alarm_rate": c["false_alarms"] / c["good"] if c["good"] else None,
            "miss_rate": c["misses"] / c["defective"] if c["defective"] else None,
            "method": cal.method, "false_alarm_target": cal.false_alarm_rate, "confidence": cal.confidence,
            "false_alarm_bound": cal.false_alarm_bound, "n_images": cal.n_images}


def cmd_calibrate(args: argparse.Namespace) -> int:
    import warnings

    from ..data.datasets import FolderDataset, MVTecDataset
    from ..data.tiles import Tiling
    from ..engine.calibration import CalibrationWarning, calibrate
    from ..engine.checkpoint import load_checkpoint, update_metadata
    folders = [d for d in (args.normal_dir, args.abnormal_dir) if d]
    if bool(folders) == bool(args.data):
        raise CLIError("give the validation images either as --normal-dir [--abnormal-dir --mask-dir] or as "
                       "--data ROOT --category C (ROOT/C/validation)")
    if args.data and not args.category:
        raise CLIError("--data needs --category: the validation images are read from ROOT/CATEGORY/validation")
    model, meta = load_checkpoint(args.checkpoint, check_calibration=False)  # refitting repairs a broken one
    tiling = Tiling.from_dict(meta.get("tiling"))  # thresholds fitted as the model scores: tile by tile
    size = None if tiling else model.config.image_size
    if args.data:
        ds = MVTecDataset(args.data, args.category, "validation", size)
        ds.calibration_source = f"{args.category}/validation"
    else:
        if any("test" in Path(d).resolve().parts for d in folders):
            print("nferd: warning: a validation folder lies under a 'test' folder; thresholds fitted on the test "
                  "split make its metrics optimistic", file=sys.stderr)
        ds = FolderDataset(None, "test", size, test_normal_dir=args.normal_dir, test_abnormal_dir=args.abnormal_dir,
                           mask_dir=args.mask_dir, image_metrics_only=args.image_metrics_only)
        ds.calibration_source = "validation folders: " + ", ".join(str(d) for d in folders)
    with warnings.catch_warnings():  # a too-small set is reported below, in the calibration's own words
        warnings.simplefilter("ignore", CalibrationWarning)
        cal = calibrate(model, ds, args.false_alarm_rate, args.device, args.precision, args.batch_size, tiling=tiling)
    counts = cal.fitted_set or {}
    previous = meta.get("calibration")  # as the file holds it: perhaps the broken calibration this replaces
    update_metadata(args.checkpoint, calibration=cal.to_dict())
    print(f"calibration ({cal.method}, {count(cal.n_images or 0, 'image')} from {cal.source}): image threshold "
          f"{cal.image_threshold:.5f}, pixel threshold {cal.pixel_threshold:.5f}"
          + (f" (was {previous['image_threshold']:.5f} / {previous['pixel_threshold']:.5f})"
             if previous and all(isinstance(previous.get(k), (int, float))
                                 for k in ("image_threshold", "pixel_threshold")) else ""))
    if cal.method == "normal_bound":
        print(cal.guarantee())
        if cal.warning is not None:
            print(f"nferd: warning: {cal.warning}", file=sys.stderr)
    if cal.method == "validation_f1":
        print(f"on this set: {counts['false_alarms']} of {counts['good']} good images flagged, {counts['misses']} of "
              f"{counts['defective']} defective images missed (image F1 {cal.image_f1:.4f})")
    print(f"written to {args.checkpoint}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Fresh-machine default: synthetic data, NFERD with the EfficientNet-Lite0 teacher, test, overlays."""
    from ..data.datasets import MVTecDataset
    from ..data.synth import ensure_synthetic_dataset
    from ..deploy.predict import Predictor, predict_to_folder
    from ..engine.evaluate import evaluate, write_results
    from ..engine.runs import print_metrics
    from ..engine.train import TrainConfig, train
    from ..models.nferd import ModelConfig
    t0 = time.perf_counter()
    out = Path(args.out)
    cat_dir = ensure_synthetic_dataset(out / "data", seed=args.seed)
    train_set = MVTecDataset(cat_dir.parent, cat_dir.name, "train")
    test_set = MVTecDataset(cat_dir.parent, cat_dir.name, "test")
    print(f"[1/3] synthetic dataset: {cat_dir} ({len(train_set)} train, {len(test_set)} test images)")
    mcfg = ModelConfig()
    tcfg = TrainConfig(epochs=args.epochs, seed=args.seed, holdout=0.15, cross_fit=False)  # the demo stays quick
    ckpt = out / "model"
    if (ckpt / "last.safetensors").is_file() and not (ckpt / "model.safetensors").is_file():
        resume = True
    else:
        resume = False
        for f in ("last.safetensors", "model.safetensors", "train_log.jsonl"):
            (ckpt / f).unlink(missing_ok=True)
    print(f"[2/3] training {mcfg.describe()} ({mcfg.teacher} teacher) for {count(args.epochs, 'epoch')}")
    import warnings

    from ..engine.calibration import CalibrationWarning, as_calibration
    with warnings.catch_warnings():  # said below in words a newcomer can act on
        warnings.simplefilter("ignore", CalibrationWarning)
        model, summary = train(train_set, mcfg, tcfg, ckpt, resume=resume)
    cal = as_calibration(summary.get("calibration"))
    if cal is not None and cal.warning:
        print(f"      note: the demo keeps {count(cal.n_images or 0, 'good image')} out to set its OK/NOK threshold, "
              f"which bounds false alarms only loosely (under {100 * (cal.false_alarm_bound or 0):.0f} %); with your "
              f"own product keep {cal.images_needed} or more good images out (--holdout or a validation folder) "
              "for a 1 % bound")
    metrics, _ = evaluate(model, test_set)
    write_results(out / "test", {cat_dir.name: metrics}, {"teacher": mcfg.teacher, "epochs": args.epochs,
                                                          "train_seconds": summary["train_seconds"]})
    print_metrics(cat_dir.name, metrics)
    predictor = Predictor(model, cal)
    rows = predict_to_folder(predictor, [str(cat_dir / "test" / "*" / "*.png")], out / "predictions",
                             progress=False)
    print(f"[3/3] {len(rows)} test images scored; overlays in {out / 'predictions' / 'overlays'}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; checkpoint {ckpt}, results {out / 'test'}")
    return 0
