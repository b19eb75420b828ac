"""What each ``nferd`` sub-command does (argument parsing lives in parser.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..engine import jsonio
from ..engine.safe_io import write_json
from .options import CLIError, model_config_from
from .wording import count, plural


def _datasets(args: argparse.Namespace, category: str | None, split: str, image_size: int):  # type: ignore[no-untyped-def]
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


def _categories(args: argparse.Namespace) -> list[str | None]:
    if args.data_format == "folder":
        return [None]
    if args.category is None:
        raise CLIError(f"--category is required: a category folder under '{args.data}', or 'all'. (--data "
                       "holds no images itself; for a folder of good images give that folder, or --format folder)")
    if args.category == "all":
        from ..data.datasets import discover_categories
        return list(discover_categories(args.data))
    return [args.category]


def _label(args: argparse.Namespace, category: str | None) -> str:
    """The name results are filed under: the category, or for a plain folder the folder's name."""
    if category:
        return category
    folder = args.data or args.test_normal_dir or args.test_abnormal_dir
    name = Path(folder).resolve().name if folder else ""
    return (Path(folder).resolve().parent.name if name in ("good", "train", "ok") else name) or "images"


def _recorded_data(args: argparse.Namespace) -> None:
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


def _tiling(args: argparse.Namespace, recorded: dict[str, Any] | None, image_size: int):  # type: ignore[no-untyped-def]
    """The tiling to score with: the model's own (``recorded``), or --tile / --tile-overlap."""
    from ..data.tiles import resolve_tiling
    try:
        return resolve_tiling(recorded, getattr(args, "tile", None), getattr(args, "tile_overlap", None), image_size)
    except ValueError as e:
        raise CLIError(str(e)) from e


def _validation_set(args: argparse.Namespace, category: str | None, image_size: int | None):  # type: ignore[no-untyped-def]
    """A validation/good folder (MVTec 3D-AD, LOCO) calibrates instead of held-out training images."""
    if args.data_format == "folder" or category is None:
        return None
    if not (Path(args.data) / category / "validation" / "good").is_dir():
        return None
    ds = _datasets(args, category, "validation", image_size)
    ds.calibration_source = "validation/good"
    return ds


def cmd_synth(args: argparse.Namespace) -> int:
    from ..data.synth import ensure_synthetic_dataset
    path = ensure_synthetic_dataset(args.out, seed=args.seed, n_train=args.n_train)
    print(f"synthetic dataset written to {path} (category '{path.name}', MVTec layout)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import model_info
    info = model_info(_model_config(args), args.teacher_weights or "random")
    if args.json:
        print(jsonio.dumps(info, indent=2))
    else:
        for k, v in info["params"].items():
            print(f"{k:>14}: {v / 1e6:8.3f} M")
        print(f"{'forward':>14}: {info['gflops']:8.2f} GFLOPs per image at {args.image_size} px")
    return 0


def _model_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    try:
        return model_config_from(args)
    except ValueError as e:
        raise CLIError(str(e)) from e


def cmd_train(args: argparse.Namespace) -> int:
    from ..engine import distributed as ddp
    from ..engine.train import TrainConfig, train
    if args.tile:  # the model's input is a tile
        args.image_size = args.tile
    mcfg = _model_config(args)
    cats = _categories(args)
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
        train_set = _datasets(args, cat, "train", native)
        cal_set = _validation_set(args, cat, native)
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
        with _tracking(args, f"train {_label(args, cat)}", lead) as run:
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
                metrics = _test_one(model, args, cat, out / "test", {"checkpoint": str(out), **summary})
                if run is not None:
                    run.metrics(metrics, prefix="test_")
    return 0


@contextlib.contextmanager
def _tracking(args: argparse.Namespace, name: str, lead: bool = True):  # type: ignore[no-untyped-def]
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


def _report_finished(out: Path, args: argparse.Namespace, lead: bool) -> bool:
    """``--resume`` on a run that already finished: say so and touch nothing (True), else False."""
    from ..engine.train import finished_run
    meta = finished_run(out, args.epochs)
    if meta is None:
        return False
    if lead:
        epochs = meta.get("epoch")
        longer = (f"; it was trained for {count(epochs, 'epoch')}, more than --epochs {args.epochs}: train into another "
                  "--out for a shorter run") if epochs != args.epochs else ""
        test = f"; test it with `nferd test --checkpoint {out}`" if args.test else ""
        print(f"{out}: training finished earlier ({count(epochs, 'epoch')}, {out / 'model.safetensors'}): nothing to resume, "
              f"nothing changed{longer}{test}")
    return True


def _test_one(model, args: argparse.Namespace, cat: str | None, out: Path, info: dict[str, Any]) -> dict:  # type: ignore[no-untyped-def]
    from ..engine.evaluate import write_results
    tiling = _tiling(args, None, model.config.image_size)
    test_set = _datasets(args, cat, "test", None if tiling else model.config.image_size)
    t0 = time.perf_counter()
    from ..engine.distributed import local_device  # this process's GPU under torchrun
    kw = {"batch_size": getattr(args, "batch_size", 16), "device": str(local_device(getattr(args, "device", "auto"))),
          "precision": getattr(args, "precision", "auto"), "tiling": tiling}
    metrics, raw = _evaluate(model, args, cat, test_set, kw)
    run = {"teacher": model.config.teacher, "model": model.config.to_dict(), "eval_seconds": time.perf_counter() - t0,
           **info}
    path = write_results(out, {_label(args, cat): metrics}, run)
    _print_metrics(_label(args, cat), metrics)
    print(f"results: {path}")
    return metrics


def _evaluate(model, args: argparse.Namespace, cat: str | None, test_set,  # type: ignore[no-untyped-def]
              kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``evaluate``, plus MVTec AD 2's SegF1 and AU-PRO@0.05 for a test on its test_public split."""
    from ..data.datasets import MVTecAD2Dataset
    from ..engine.evaluate import evaluate, mvtec_ad2_metrics
    metrics, raw = evaluate(model, test_set, **kw)
    if isinstance(test_set, MVTecAD2Dataset):
        size = None if kw.get("tiling") else model.config.image_size
        metrics.update(mvtec_ad2_metrics(model, raw, _datasets(args, cat, "validation", size), **kw))
    return metrics, raw


def _print_metrics(name: str, m: dict[str, Any]) -> None:
    keys = ("image_auroc", "image_ap", "image_f1max", "miss_at_1pct_fa") + (() if m.get("pixel_metrics_absent") else
                                                         ("pixel_auroc", "aupro", "pixel_ap", "segf1", "aupro_0.05"))
    print(f"{name}: " + "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m))
    if m.get("pixel_metrics_absent"):
        print(f"{name}: pixel metrics absent: {m['pixel_metrics_absent']}")


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
    _recorded_data(args)
    for cat in _categories(args):
        ckpt = Path(args.checkpoint) / cat if (args.category == "all" and cat) else Path(args.checkpoint)
        model, meta = load_checkpoint(ckpt)
        tiling = _tiling(args, meta.get("tiling"), model.config.image_size)
        test_set = _datasets(args, cat, "test", None if tiling else model.config.image_size)
        kw = {"batch_size": args.batch_size, "device": args.device, "precision": args.precision, "tiling": tiling}
        metrics, raw = _evaluate(model, args, cat, test_set, kw)
        rows[_label(args, cat)] = metrics
        if meta.get("calibration"):
            metrics["at_threshold"] = _at_threshold(raw, meta["calibration"])
        if report:  # reduced now, so only one category's maps are held at a time
            t1 = time.perf_counter()
            sections[_label(args, cat)] = prepare_category({**raw, "metrics": metrics}, meta.get("calibration"),
                                                         gallery_size=args.report_gallery)
            if tiling is None:
                add_explanations(sections[_label(args, cat)], model, meta.get("memory_images"), raw["maps"])
            report_seconds += time.perf_counter() - t1
        del raw
        _print_metrics(_label(args, cat), metrics)
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
    from ..engine.benchmark import provenance
    from ..engine.device import resolve_device
    run["provenance"] = provenance(torch.get_num_threads(), str(resolve_device(args.device)))
    path = write_results(args.out, rows, run)
    print(f"results: {path}")
    with _tracking(args, f"test {_label(args, args.category)}") as tracked:
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


def _at_threshold(raw: dict[str, Any], cal: dict[str, Any]) -> dict[str, Any]:
    """Decisions on the test split at the checkpoint's calibrated threshold, next to the
    false-alarm bound the calibration promised (when it was fitted on normal images only)."""
    from ..engine.calibration import decision_counts
    c = decision_counts(raw["scores"], raw["labels"], cal)
    return {**c, "false_alarm_rate": c["false_alarms"] / c["good"] if c["good"] else None,
            "miss_rate": c["misses"] / c["defective"] if c["defective"] else None,
            "method": cal.get("method"), "false_alarm_target": cal.get("false_alarm_rate"),
            "confidence": cal.get("confidence"), "false_alarm_bound": cal.get("false_alarm_bound"),
            "n_images": cal.get("n_images")}


def _file_predictor(backend: str, model: str | None):  # type: ignore[no-untyped-def]
    """The predictor of an exported file: ONNX Runtime over FILE.onnx, OpenVINO over FILE.xml."""
    suffix = ".onnx" if backend == "onnx" else ".xml"
    if not model:
        raise CLIError(f"--backend {backend} needs --model FILE{suffix} (make one with `nferd export --checkpoint CKPT "
                       f"--format {backend} --out FILE{suffix}`)")
    try:
        if backend == "onnx":
            from ..deploy.onnx_runtime import OnnxPredictor
            return OnnxPredictor.from_file(model)
        from ..deploy.openvino_runtime import OpenVinoPredictor
        return OpenVinoPredictor.from_file(model)
    except ImportError as e:
        raise CLIError(str(e)) from e


def cmd_predict(args: argparse.Namespace) -> int:
    from ..deploy.predict import Predictor, predict_to_folder
    if getattr(args, "backend", "torch") != "torch":
        predictor = _file_predictor(args.backend, args.model)  # calibration comes from the exported file
    elif args.model:
        raise CLIError("--model is the exported file for --backend onnx or openvino: add --backend, or drop --model "
                       "and pass --checkpoint")
    elif not args.checkpoint:
        raise CLIError("--checkpoint is required (or --backend onnx|openvino --model FILE)")
    else:
        from ..engine.distributed import local_device  # under torchrun: this process's GPU
        predictor = Predictor.from_checkpoint(args.checkpoint, device=str(local_device(args.device)),
                                              precision=args.precision)
    recorded = predictor.tiling.to_dict() if predictor.tiling else None
    predictor.tiling = _tiling(args, recorded, predictor.size)
    rows = predict_to_folder(predictor, args.inputs, args.out, args.batch_size, args.map_format,
                             resume=not getattr(args, "fresh", False))
    from ..engine.distributed import is_main
    if not is_main():  # torchrun: rank 0 reports for all
        return 0
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"skipped {r['path']}: {r['error']}")
    nok = sum(r.get("decision") == "NOK" for r in rows)
    print(f"{count(len(rows) - len(failed), 'image')} scored ({nok} NOK), {len(failed)} failed; "
          f"summary: {Path(args.out) / 'summary.csv'}")
    return 0 if not failed else 3


def cmd_export(args: argparse.Namespace) -> int:
    """Checkpoint -> one self-contained .onnx file (or an OpenVINO IR), then (unless --no-check) run it
    against PyTorch."""
    from ..engine.checkpoint import load_checkpoint
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise CLIError(f"exporting needs the onnx and onnxruntime packages ({e.name} is missing): "
                       "pip install nferd[onnx]") from e
    from ..deploy.export import DEFAULT_OPSET, check_export, export_onnx
    openvino = args.export_format == "openvino"
    if openvino:
        if args.preprocess:
            raise CLIError("--preprocess is for ONNX files; the OpenVINO IR takes float images at the model size")
        if Path(args.out).suffix != ".xml":
            raise CLIError(f"--out for --format openvino is FILE.xml (FILE.bin is written beside it), got '{args.out}'")
        try:
            from ..deploy.openvino_runtime import export_openvino, require_openvino
            require_openvino()
        except ImportError as e:
            raise CLIError(str(e)) from e
    if args.int8 and not openvino:
        raise CLIError("--int8 quantises the OpenVINO IR: add --format openvino (ONNX Runtime's static "
                       "quantisation lost accuracy where NNCF's did not; see docs/deploy.md)")
    model, meta = load_checkpoint(args.checkpoint)
    t0 = time.perf_counter()
    source = {"checkpoint": str(args.checkpoint), "epoch": meta.get("epoch"), "data": meta.get("data")}
    tiling = _tiling(args, meta.get("tiling"), model.config.image_size)
    if tiling is not None:
        if args.preprocess:
            raise CLIError("--preprocess resizes whole images in the graph; a tiled model cuts them into tiles instead: "
                           "drop --preprocess")
    extra = {"source": source, **({"tiling": tiling.to_dict()} if tiling else {})}
    if args.int8:
        return _export_int8(args, model, meta, extra, tiling)
    if openvino:
        path = export_openvino(model, args.out, calibration=meta.get("calibration"), extra_meta=extra)
        size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    else:
        path = export_onnx(model, args.out, opset=args.opset or DEFAULT_OPSET, include_preprocess=args.preprocess,
                           calibration=meta.get("calibration"), extra_meta=extra)
        size = path.stat().st_size
    kind = "uint8 N x H x W x 3, resized in the graph" if args.preprocess else \
        f"float N x 3 x {model.config.image_size} x {model.config.image_size} in [0, 1]"
    print(f"exported {model.config.describe()} ({model.config.teacher}) to {path} "
          f"({size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s); input 'images': {kind}; "
          f"outputs 'anomaly_map', 'score'; calibration {'included' if meta.get('calibration') else 'absent'}")
    if args.no_check:
        return 0
    predictor = None
    if openvino:
        from ..deploy.openvino_runtime import OpenVinoPredictor
        predictor = OpenVinoPredictor.from_file(path)
    rep = check_export(model, path, predictor=predictor)
    print(f"check on {rep['batch']} random images: max |{args.export_format} - torch| {rep['max_abs_diff_map']:.2e} "
          f"on the map (range {rep['map_range']:.3g}), {rep['max_abs_diff_score']:.2e} on the score")
    if not rep["ok"]:
        print(f"warning: the exported model differs from the PyTorch model by more than 1e-3 of the map range; "
              f"do not deploy {path} before finding out why")
        return 3
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from ..engine.checkpoint import load_checkpoint
    from .diagnose import diagnose
    model, _ = load_checkpoint(args.checkpoint)
    cats = _categories(args)
    test_set = _datasets(args, cats[0], "test", model.config.image_size)
    report = diagnose(model, test_set, device=args.device)
    if args.json:
        print(jsonio.dumps(report, indent=2))
        return 0
    recalled = [r for r in report["retrieval"] if "top1_similarity_mean" not in r]
    if recalled:
        print("bank     spread  top-K gap  entropy  top-1 distinct  most common top-1")
    else:
        print("bank     top-1 similarity (mean, std): the bank only scores the map, nothing is recalled")
    for r in report["retrieval"]:
        if "top1_similarity_mean" in r:
            print(f"{r['bank']:<8} {r['top1_similarity_mean']:.4f}  {r['top1_similarity_std']:.4f}")
            continue
        print(f"{r['bank']:<8} {r['similarity_spread_per_image']:.4f}  {r['topk_gap']:.4f}     "
              f"{r['weight_entropy']:.3f}    {r['top1_distinct']:>3}/{r['n_bank']:<3}        "
              f"{r['top1_most_common_share']:.0%}"
              + (f"   ({r['sources_per_image']:.1f} bank images per test image)" if "sources_per_image" in r else ""))
    if any("defect_matched_share" in r for r in report["retrieval"]):
        print("\nshare of defect positions whose best bank match is as close as a normal position's: "
              + ", ".join(f"{r['bank']} {r['defect_matched_share']:.0%}" for r in report["retrieval"]
                          if "defect_matched_share" in r))
    if "stages" in report:
        print("\nmap of         pixel AUROC  AUPRO")
        for name, m in report["stages"].items():
            print(f"{name:<14} {m['pixel_auroc']:.4f}       {m['aupro']:.4f}")
    print("\nbank replaced by   image AUROC  pixel AUROC  AUPRO")
    for name, m in report["metrics"].items():
        print(f"{name:<18} {m['image_auroc']:.4f}       {m.get('pixel_auroc', float('nan')):.4f}       "
              f"{m.get('aupro', float('nan')):.4f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Fresh-machine default: synthetic data, NFERD with the EfficientNet-Lite0 teacher, test, overlays."""
    from ..engine.evaluate import evaluate, write_results
    from ..models.nferd import ModelConfig
    from ..deploy.predict import Predictor, predict_to_folder
    from ..data.synth import ensure_synthetic_dataset
    from ..engine.train import TrainConfig, train
    from ..data.datasets import MVTecDataset
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
              f"which bounds false alarms only loosely (under {cal['false_alarm_bound']:.0%}); with your own "
              f"product keep {cal['images_needed']} or more good images out (--holdout or a validation folder) "
              "for a 1 % bound")
    metrics, _ = evaluate(model, test_set)
    write_results(out / "test", {cat_dir.name: metrics}, {"teacher": mcfg.teacher, "epochs": args.epochs,
                                                          "train_seconds": summary["train_seconds"]})
    _print_metrics(cat_dir.name, metrics)
    predictor = Predictor(model, summary.get("calibration"))
    rows = predict_to_folder(predictor, [str(cat_dir / "test" / "*" / "*.png")], out / "predictions",
                             progress=False)
    print(f"[3/3] {len(rows)} test images scored; overlays in {out / 'predictions' / 'overlays'}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; checkpoint {ckpt}, results {out / 'test'}")
    return 0


def _int8_sets(args: argparse.Namespace, model: Any, meta: dict[str, Any], tiling: Any) -> tuple[Any, Any, Any]:
    """Normal training images (statistics; their tiles for a tiled model), calibration images and
    the test split (gate) of the data the checkpoint was trained on, split as its training split
    them."""
    from ..data.tiles import TiledDataset
    from ..data.datasets import make_dataset
    from ..engine.train import training_split
    recorded = meta.get("data") or {}
    root = args.data or recorded.get("root")
    category = args.category if args.data else recorded.get("category")
    fmt = "auto" if args.data else recorded.get("format", "auto")
    if not root:
        raise CLIError("--int8 needs the training images for its statistics and the test split for its gate, and "
                       "this checkpoint does not record them: pass --data ROOT --category C")
    size, train_cfg = None if tiling else model.config.image_size, meta.get("train") or {}
    try:
        train_set, validation = make_dataset(fmt, root, category, "train", size), None
        if category and (Path(root) / category / "validation" / "good").is_dir():
            validation = make_dataset(fmt, root, category, "validation", size)
            validation.calibration_source = "validation/good"
        normal_set, cal_set = training_split(train_set, float(train_cfg.get("holdout", 0.1)),
                                             int(train_cfg.get("seed", 0)), validation)
        if fmt == "folder":
            if not args.test_abnormal_dir:
                raise CLIError("--int8 is gated on labelled test images, and this model was trained on a plain "
                               "folder: pass --test-normal-dir and --test-abnormal-dir (and --mask-dir), as for "
                               "`nferd test`")
            test_set = make_dataset("folder", None, None, "test", size, test_normal_dir=args.test_normal_dir,
                                    test_abnormal_dir=args.test_abnormal_dir, mask_dir=args.mask_dir)
        else:
            test_set = make_dataset(fmt, root, category, "test", size)
    except (OSError, ValueError) as e:
        raise CLIError(f"--int8 cannot read the data at '{root}' (category {category}): {e}; pass --data ROOT "
                       "--category C") from e
    labels = set(getattr(test_set, "labels", ()))
    if labels != {0, 1} and not args.allow_accuracy_loss:  # found now, not after the quantisation
        raise CLIError(f"--int8 is gated on a test split with good and defective images; the one at '{root}' has "
                       f"{'only good' if labels == {0} else 'only defective'} images (--allow-accuracy-loss writes "
                       "the INT8 model without a gate)")
    return TiledDataset(normal_set, tiling) if tiling else normal_set, cal_set, test_set


def _export_int8(args: argparse.Namespace, model: Any, meta: dict[str, Any], extra: dict[str, Any],
                 tiling: Any) -> int:
    try:
        from ..deploy.quantize import GATE_BOUNDS, export_int8, require_nncf
        require_nncf()
    except ImportError as e:
        raise CLIError(str(e)) from e
    normal_set, cal_set, test_set = _int8_sets(args, model, meta, tiling)
    t0 = time.perf_counter()
    path, report = export_int8(model, args.out, normal_set, cal_set, test_set, meta.get("calibration"),
                               extra_meta=extra, allow_accuracy_loss=args.allow_accuracy_loss)
    gate = report["gate"]
    if "change" in gate:
        for k, d in gate["change"].items():
            print(f"{k}: fp32 {gate['fp32'][k]:.4f}, int8 {gate['int8'][k]:.4f} ({d:+.4f}; bound "
                  f"{GATE_BOUNDS[k]:.3f})")
    if path is None:
        print(f"INT8 model refused: {gate['reason']}; nothing written (--allow-accuracy-loss writes it anyway)")
        return 3
    size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    print(f"exported {model.config.describe()} ({model.config.teacher}) as INT8 to {path} ({size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t0:.1f} s; statistics from {count(report['statistics_images'], 'normal training image')}); "
          f"calibration {report['calibration']}")
    if not gate["ok"]:
        print(f"warning: the accuracy gate failed ({gate['reason']}); written because of --allow-accuracy-loss")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    try:
        res = run_bench(args.teacher, args.image_size, args.batch_size, args.device, args.reference,
                        args.train_steps, args.infer_iters, bank=args.bank, compile=args.compile,
                        recall=args.recall, fusion=args.fusion, backend=args.backend, int8=args.int8,
                        precision=args.precision, peer=args.peer, preset=args.preset)
    except (ImportError, ValueError) as e:
        raise CLIError(str(e)) from e
    if args.save:
        from ..engine.benchmark import save_speed_result
        print(f"result file: {save_speed_result(res, Path(args.save))}", file=sys.stderr)
    if args.json:
        print(jsonio.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..engine.checkpoint import read_metadata
    from ..deploy.serve import require_serve_dependencies, run
    require_serve_dependencies()  # before the checkpoint is loaded
    if args.max_upload_mb <= 0 or args.max_queue < 0 or args.max_batch_files <= 0:
        raise CLIError("--max-upload-mb and --max-batch-files must be > 0 and --max-queue >= 0")
    predictor, tiling = None, None
    if args.backend != "torch":
        if args.checkpoint:
            raise CLIError(f"--backend {args.backend} serves --model FILE; drop --checkpoint")
        predictor = _file_predictor(args.backend, args.model)
        predictor.tiling = _tiling(args, predictor.tiling.to_dict() if predictor.tiling else None, predictor.size)
        what = args.model
    elif not args.checkpoint:
        raise CLIError("--checkpoint is required (or --backend onnx|openvino --model FILE)")
    else:
        recorded = read_metadata(args.checkpoint)  # a wrong path fails here, before the banner
        tiling = _tiling(args, recorded.get("tiling"), int(recorded["model"]["image_size"]))
        what = args.checkpoint
    print(f"nferd serve: {what} ({args.backend}) on http://{args.host}:{args.port}/ (POST /predict, GET /health, "
          "/metadata, /metrics)" + ("; no authentication, expose only on a trusted network" if args.host not in
                                     ("127.0.0.1", "localhost", "::1") else ""))
    run(args.checkpoint, args.host, args.port, device=args.device, precision=args.precision,
        log_level=args.log_level, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_queue=args.max_queue, max_batch_files=args.max_batch_files,
        max_image_memory_bytes=int(args.max_image_memory_mb * 1024 * 1024), predictor=predictor, tiling=tiling)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import warnings
    from ..engine.calibration import CalibrationWarning, calibrate, describe_guarantee
    from ..engine.checkpoint import load_checkpoint, update_metadata
    from ..data.datasets import FolderDataset, MVTecDataset
    from ..data.tiles import Tiling
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


def cmd_mvtec_ad2_submission(args: argparse.Namespace) -> int:
    from ..data.datasets import detect_format, discover_categories
    from ..deploy.mvtec_ad2 import write_submission
    from ..deploy.predict import Predictor
    cats = list(discover_categories(args.data)) if args.category == "all" else [args.category]
    not_ad2 = [c for c in cats if detect_format(args.data, c) != "mvtec_ad2"]
    if not_ad2:
        raise CLIError(f"not MVTec AD 2 categories (no test_public folder) under '{args.data}': {', '.join(not_ad2)}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"--out '{out}' is not empty: the server refuses a submission with extra files; "
                       "choose a new folder")
    predictors = {c: Predictor.from_checkpoint(Path(args.checkpoint) / c if args.category == "all" else args.checkpoint,
                                               device=args.device, precision=args.precision) for c in cats}
    res = write_submission(predictors, args.data, out)
    print(f"submission: {out} (archive {res['archive']}); thresholds and counts in {out.parent / (out.name + '.json')}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from ..engine.benchmark import (Run, load_calibration_results, load_results, load_speed_results, model_presets,
                                    render_method_doc, render_readme, render_results_doc, run_grid)
    results = Path(args.results)
    if args.action == "render":
        rows = load_results(results)
        if not rows:
            raise CLIError(f"no result files under '{results}': run `nferd benchmark run` first")
        docs, readme = Path(args.docs), Path(args.readme)
        outputs = {docs: render_results_doc(rows, load_calibration_results(Path(args.calibration)),
                                            load_speed_results(Path(args.speed)))}
        speed = load_speed_results(Path(args.speed))
        if readme.is_file():
            outputs[readme] = render_readme(readme.read_text(), rows, speed)
        method, screen = Path(args.method), Path(args.screen)
        if method.is_file():
            outputs[method] = render_method_doc(method.read_text(), rows,
                                                json.loads(screen.read_text()) if screen.is_file() else None)
        if args.check:
            stale = [str(p) for p, text in outputs.items() if not p.is_file() or p.read_text() != text]
            if stale:
                print(f"out of date with {len(rows)} result files: {', '.join(stale)} (run `nferd benchmark render`)")
                return 1
            print(f"{', '.join(map(str, outputs))} match {len(rows)} result files")
            return 0
        for p, text in outputs.items():
            p.write_text(text)
        print(f"rendered {len(rows)} result files into {', '.join(map(str, outputs))}")
        return 0
    if not args.data or not args.categories:
        raise CLIError("benchmark run needs --data ROOT and --categories C1,C2")
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(model_presets(args.teacher, args.image_size)))
    if unknown:
        raise CLIError(f"unknown model preset(s) {', '.join(unknown)}; choose from "
                       f"{', '.join(model_presets(args.teacher, args.image_size))}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError as e:
        raise CLIError(f"--seeds takes integers separated by commas, got '{args.seeds}'") from e
    import os
    threads = args.threads or os.cpu_count() or 1
    runs = [Run(root, cat, model, args.teacher, args.image_size, args.epochs, seed, args.train_images)
            for root in args.data for cat in args.categories.split(",") if cat
            for model in models for seed in seeds]
    for root in args.data:
        for cat in {r.category for r in runs}:
            if not (Path(root) / cat).is_dir():
                raise CLIError(f"no category '{cat}' under --data '{root}'")
    run_grid(runs, results, Path(args.work), threads, args.device, image_metrics_only=args.image_metrics_only)
    return 0
