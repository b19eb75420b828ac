"""The verbs that fit a model: ``train``, ``test``, ``calibrate`` and the ``demo``.

Imports of heavy modules sit inside the functions: a verb loads torch (and what else it needs)
when it runs, so ``--help``, ``--version`` and option errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..engine.safe_io import write_json
from .common import (
    categories,
    datasets_for,
    model_config,
    print_metrics,
    recorded_data,
    result_name,
    tiling_for,
    tracking,
    validation_set,
)
from .options import CLIError
from .wording import count, plural


def cmd_train(args: argparse.Namespace) -> int:
    from ..engine import distributed as ddp
    from ..engine.train import TrainConfig, train
    if args.tile:  # the model's input is a tile
        args.image_size = args.tile
    mcfg = model_config(args)
    cats = categories(args)
    # torchrun: several categories are trained whole, one process each (round robin, no gradient
    # traffic); one category is trained by all processes together (DistributedDataParallel).
    round_robin = ddp.launched() and len(cats) > 1
    if round_robin:
        cats = cats[ddp.env_rank()::ddp.env_world_size()]
        names = ", ".join(map(str, cats)) or "none (more processes than categories)"
        print(f"[rank {ddp.env_rank()}] categories: {names}")
    lead = round_robin or not ddp.launched() or ddp.env_rank() == 0  # prints and writes the summary
    for cat in cats:
        out = Path(args.out) / cat if (args.category == "all" and cat) else Path(args.out)
        if args.resume and _report_finished(out, args, lead):
            continue
        native = None if args.tile else mcfg.image_size  # tiles are cut from the full-resolution images
        train_set = datasets_for(args, cat, "train", native)
        cal_set = validation_set(args, cat, native)
        tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           lr_schedule=args.lr_schedule, precision=args.precision, device=args.device,
                           checkpoint_every=args.checkpoint_every,
                           holdout=0.0 if cal_set is not None else args.holdout,
                           false_alarm_rate=args.false_alarm_rate, feature_cache_dir=args.feature_cache_dir,
                           compile=args.compile, tile=args.tile, cross_fit=args.cross_fit,
                           strict_images=args.strict_images,
                           tile_overlap=0.25 if args.tile_overlap is None else args.tile_overlap)
        if lead:
            print(f"training {mcfg.describe()} ({mcfg.teacher} teacher) on {cat or args.data}: "
                  f"{count(len(train_set), 'image')}, {count(args.epochs, 'epoch')}"
                  + (f", {ddp.env_world_size()} processes" if ddp.launched() and not round_robin else ""))
        data_meta = {"data": {"root": str(args.data), "category": cat, "format": args.data_format}}
        with tracking(args, f"train {result_name(args, cat)}", lead) as run:
            if run is not None:
                run.params({"model": mcfg.to_dict(), "train": vars(tcfg), **data_meta, "out": str(out)})
            model, summary = train(train_set, mcfg, tcfg, out, teacher_weights=args.teacher_weights,
                                   calibration_set=cal_set, resume=args.resume, extra_meta=data_meta,
                                   distributed=False if round_robin else None,
                                   sync_bn=getattr(args, "sync_bn", False),
                                   on_epoch=run.epoch if run is not None else None)
            if not lead:  # DDP: rank 0 reports, writes and tests
                continue
            write_json(out / "train_summary.json", summary, default=str)
            loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
            skipped = len(summary.get("skipped_images", []))
            print(f"done in {summary['train_seconds']:.0f} s (+{summary['feature_seconds']:.0f} s teacher features); "
                  f"final loss {loss}; {summary['n_train']} {plural(summary['n_train'], 'image')} trained on"
                  + (f", {skipped} unreadable {plural(skipped, 'image')} skipped" if skipped else "")
                  + f"; checkpoint {summary['checkpoint']}")
            if run is not None:
                run.tag("checkpoint", summary["checkpoint"])
                run.metrics({k: summary.get(k) for k in ("final_loss", "train_seconds", "feature_seconds")})
            if args.test:
                metrics = test_one(model, args, cat, out / "test", {"checkpoint": str(out), **summary})
                if run is not None:
                    run.metrics(metrics, prefix="test_")
    return 0


def _report_finished(out: Path, args: argparse.Namespace, lead: bool) -> bool:
    """``--resume`` on a run that already finished: say so and touch nothing (True), else False."""
    from ..engine.train import finished_run
    meta = finished_run(out, args.epochs)
    if meta is None:
        return False
    if lead:
        epochs = meta.get("epoch")
        longer = (f"; it was trained for {count(epochs, 'epoch')}, more than --epochs {args.epochs}: "
                  "train into another --out for a shorter run") if epochs != args.epochs else ""
        test = f"; test it with `nferd test --checkpoint {out}`" if args.test else ""
        print(f"{out}: training finished earlier ({count(epochs, 'epoch')}, {out / 'model.safetensors'}): "
              f"nothing to resume, nothing changed{longer}{test}")
    return True


def test_one(model, args: argparse.Namespace, cat: str | None, out: Path, info: dict[str, Any]) -> dict:  # type: ignore[no-untyped-def]
    from ..engine.evaluate import write_results
    tiling = tiling_for(args, None, model.config.image_size)
    test_set = datasets_for(args, cat, "test", None if tiling else model.config.image_size)
    t0 = time.perf_counter()
    from ..engine.distributed import local_device  # this process's GPU under torchrun
    kw = {"batch_size": getattr(args, "batch_size", 16), "device": str(local_device(getattr(args, "device", "auto"))),
          "precision": getattr(args, "precision", "auto"), "tiling": tiling}
    metrics, raw = evaluate_category(model, args, cat, test_set, kw)
    run = {"teacher": model.config.teacher, "model": model.config.to_dict(), "eval_seconds": time.perf_counter() - t0,
           **info}
    path = write_results(out, {result_name(args, cat): metrics}, run)
    print_metrics(result_name(args, cat), metrics)
    print(f"results: {path}")
    return metrics


def evaluate_category(model, args: argparse.Namespace, cat: str | None, test_set,  # type: ignore[no-untyped-def]
              kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``evaluate``, plus MVTec AD 2's SegF1 and AU-PRO@0.05 for a test on its test_public split."""
    from ..data.datasets import MVTecAD2Dataset
    from ..engine.evaluate import evaluate, mvtec_ad2_metrics
    metrics, raw = evaluate(model, test_set, **kw)
    if isinstance(test_set, MVTecAD2Dataset):
        size = None if kw.get("tiling") else model.config.image_size
        metrics.update(mvtec_ad2_metrics(model, raw, datasets_for(args, cat, "validation", size), **kw))
    return metrics, raw


def cmd_test(args: argparse.Namespace) -> int:
    from ..engine.checkpoint import load_checkpoint
    from ..engine.evaluate import write_results
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
    for cat in categories(args):
        ckpt = Path(args.checkpoint) / cat if (args.category == "all" and cat) else Path(args.checkpoint)
        model, meta = load_checkpoint(ckpt)
        tiling = tiling_for(args, meta.get("tiling"), model.config.image_size)
        test_set = datasets_for(args, cat, "test", None if tiling else model.config.image_size)
        kw = {"batch_size": args.batch_size, "device": args.device, "precision": args.precision, "tiling": tiling}
        metrics, raw = evaluate_category(model, args, cat, test_set, kw)
        rows[result_name(args, cat)] = metrics
        if meta.get("calibration"):
            metrics["at_threshold"] = at_threshold(raw, meta["calibration"])
        if report:  # reduced now, so only one category's maps are held at a time
            t1 = time.perf_counter()
            sections[result_name(args, cat)] = prepare_category({**raw, "metrics": metrics}, meta.get("calibration"),
                                                         gallery_size=args.report_gallery)
            if tiling is None:
                add_explanations(sections[result_name(args, cat)], model, meta.get("memory_images"), raw["maps"])
            report_seconds += time.perf_counter() - t1
        del raw
        print_metrics(result_name(args, cat), metrics)
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
    with tracking(args, f"test {result_name(args, args.category)}") as tracked:
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


def at_threshold(raw: dict[str, Any], cal: dict[str, Any]) -> dict[str, Any]:
    """Decisions on the test split at the checkpoint's calibrated threshold, next to the
    false-alarm bound the calibration promised (when it was fitted on normal images only)."""
    from ..engine.calibration import decision_counts
    c = decision_counts(raw["scores"], raw["labels"], cal)
    return {**c, "false_alarm_rate": c["false_alarms"] / c["good"] if c["good"] else None,
            "miss_rate": c["misses"] / c["defective"] if c["defective"] else None,
            "method": cal.get("method"), "false_alarm_target": cal.get("false_alarm_rate"),
            "confidence": cal.get("confidence"), "false_alarm_bound": cal.get("false_alarm_bound"),
            "n_images": cal.get("n_images")}


def cmd_calibrate(args: argparse.Namespace) -> int:
    import warnings

    from ..data.datasets import FolderDataset, MVTecDataset
    from ..data.tiles import Tiling
    from ..engine.calibration import CalibrationWarning, calibrate, describe_guarantee
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
    counts = cal["fitted_set"]
    previous = meta.get("calibration")
    update_metadata(args.checkpoint, calibration=cal)
    print(f"calibration ({cal['method']}, {count(cal['n_images'], 'image')} from {cal['source']}): image threshold "
          f"{cal['image_threshold']:.5f}, pixel threshold {cal['pixel_threshold']:.5f}"
          + (f" (was {previous['image_threshold']:.5f} / {previous['pixel_threshold']:.5f})"
             if previous and all(isinstance(previous.get(k), (int, float))
                                 for k in ("image_threshold", "pixel_threshold")) else ""))
    if cal["method"] == "normal_bound":
        print(describe_guarantee(cal))
        if "warning" in cal:
            print(f"nferd: warning: {cal['warning']}", file=sys.stderr)
    if cal["method"] == "validation_f1":
        print(f"on this set: {counts['false_alarms']} of {counts['good']} good images flagged, {counts['misses']} of "
              f"{counts['defective']} defective images missed (image F1 {cal['image_f1']:.4f})")
    print(f"written to {args.checkpoint}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Fresh-machine default: synthetic data, NFERD with the EfficientNet-Lite0 teacher, test, overlays."""
    from ..data.datasets import MVTecDataset
    from ..data.synth import ensure_synthetic_dataset
    from ..deploy.predict import Predictor, predict_to_folder
    from ..engine.evaluate import evaluate, write_results
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

    from ..engine.calibration import CalibrationWarning
    with warnings.catch_warnings():  # said below in words a newcomer can act on
        warnings.simplefilter("ignore", CalibrationWarning)
        model, summary = train(train_set, mcfg, tcfg, ckpt, resume=resume)
    cal = summary.get("calibration") or {}
    if cal.get("warning"):
        print(f"      note: the demo keeps {count(cal['n_images'], 'good image')} out to set its OK/NOK threshold, "
              f"which bounds false alarms only loosely (under {100 * cal['false_alarm_bound']:.0f} %); with your own "
              f"product keep {cal['images_needed']} or more good images out (--holdout or a validation folder) "
              "for a 1 % bound")
    metrics, _ = evaluate(model, test_set)
    write_results(out / "test", {cat_dir.name: metrics}, {"teacher": mcfg.teacher, "epochs": args.epochs,
                                                          "train_seconds": summary["train_seconds"]})
    print_metrics(cat_dir.name, metrics)
    predictor = Predictor(model, summary.get("calibration"))
    rows = predict_to_folder(predictor, [str(cat_dir / "test" / "*" / "*.png")], out / "predictions",
                             progress=False)
    print(f"[3/3] {len(rows)} test images scored; overlays in {out / 'predictions' / 'overlays'}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; checkpoint {ckpt}, results {out / 'test'}")
    return 0
