"""The verbs that use a trained model: ``predict``, ``serve``, ``export`` (INT8 included) and
the MVTec AD 2 submission.

Imports of heavy modules sit inside the functions: a verb loads torch (and what else it needs)
when it runs, so ``--help``, ``--version`` and option errors answer at once.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..text import count
from .common import (
    tiling_for,
)
from .options import CLIError
from .wording import message


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
        raise CLIError(message(e)) from e


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
    predictor.tiling = tiling_for(args, recorded, predictor.size)
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


def cmd_serve(args: argparse.Namespace) -> int:
    from ..deploy.serve import require_serve_dependencies, run
    from ..engine.checkpoint import read_metadata
    require_serve_dependencies()  # before the checkpoint is loaded
    if args.max_upload_mb <= 0 or args.max_queue < 0 or args.max_batch_files <= 0:
        raise CLIError("--max-upload-mb and --max-batch-files must be > 0 and --max-queue >= 0")
    predictor, tiling = None, None
    if args.backend != "torch":
        if args.checkpoint:
            raise CLIError(f"--backend {args.backend} serves --model FILE; drop --checkpoint")
        predictor = _file_predictor(args.backend, args.model)
        predictor.tiling = tiling_for(args, predictor.tiling.to_dict() if predictor.tiling else None, predictor.size)
        what = args.model
    elif not args.checkpoint:
        raise CLIError("--checkpoint is required (or --backend onnx|openvino --model FILE)")
    else:
        recorded = read_metadata(args.checkpoint)  # a wrong path fails here, before the banner
        tiling = tiling_for(args, recorded.get("tiling"), int(recorded["model"]["image_size"]))
        what = args.checkpoint
    print(f"nferd serve: {what} ({args.backend}) on http://{args.host}:{args.port}/ (POST /predict, GET /health, "
          "/metadata, /metrics)" + ("; no authentication, expose only on a trusted network" if args.host not in
                                     ("127.0.0.1", "localhost", "::1") else ""))
    run(args.checkpoint, args.host, args.port, device=args.device, precision=args.precision,
        log_level=args.log_level, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_queue=args.max_queue, max_batch_files=args.max_batch_files,
        max_image_memory_bytes=int(args.max_image_memory_mb * 1024 * 1024), predictor=predictor, tiling=tiling)
    return 0


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
            raise CLIError(message(e)) from e
    if args.int8 and not openvino:
        raise CLIError("--int8 quantises the OpenVINO IR: add --format openvino (ONNX Runtime's static "
                       "quantisation lost accuracy where NNCF's did not; see docs/deploy.md)")
    if args.precision != "fp32" and (not openvino or args.int8):
        raise CLIError("--precision bf16 or auto is for the OpenVINO IR (without --int8): add --format openvino")
    model, meta = load_checkpoint(args.checkpoint)
    t0 = time.perf_counter()
    source = {"checkpoint": str(args.checkpoint), "epoch": meta.get("epoch"), "data": meta.get("data")}
    tiling = tiling_for(args, meta.get("tiling"), model.config.image_size)
    if tiling is not None:
        if args.preprocess:
            raise CLIError("--preprocess resizes whole images in the graph; a tiled model cuts them into tiles "
                           "instead: drop --preprocess")
    extra = {"source": source, **({"tiling": tiling.to_dict()} if tiling else {})}
    if args.int8:
        return _export_int8(args, model, meta, extra, tiling)
    if args.precision != "fp32":
        done = _export_bf16(args, model, meta, extra, tiling)
        if done is not None:
            return done
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


def _gate_sets(args: argparse.Namespace, model: Any, meta: dict[str, Any], tiling: Any) -> tuple[Any, Any, Any]:
    """Normal training images (statistics; their tiles for a tiled model), calibration images and
    the test split (gate) of the data the checkpoint was trained on, split as its training split
    them."""
    from ..data.datasets import make_dataset
    from ..data.tiles import TiledDataset
    from ..engine.train import training_split
    recorded = meta.get("data") or {}
    root = args.data or recorded.get("root")
    category = args.category if args.data else recorded.get("category")
    fmt = "auto" if args.data else recorded.get("format", "auto")
    if not root:
        raise CLIError("--int8 and --precision bf16 need the training images (statistics, thresholds) and the "
                       "test split (the accuracy gate), and "
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
                raise CLIError("the accuracy gate needs labelled test images, and this model was trained on a plain "
                               "folder: pass --test-normal-dir and --test-abnormal-dir (and --mask-dir), as for "
                               "`nferd test`")
            test_set = make_dataset("folder", None, None, "test", size, test_normal_dir=args.test_normal_dir,
                                    test_abnormal_dir=args.test_abnormal_dir, mask_dir=args.mask_dir)
        else:
            test_set = make_dataset(fmt, root, category, "test", size)
    except (OSError, ValueError) as e:
        raise CLIError(f"the accuracy gate cannot read the data at '{root}' (category {category}): {message(e)}; "
                       "pass --data ROOT --category C") from e
    labels = set(getattr(test_set, "labels", ()))
    if labels != {0, 1} and not args.allow_accuracy_loss:  # found now, not after the quantisation
        raise CLIError(f"the accuracy gate needs a test split with good and defective images; the one at '{root}' has "
                       f"{'only good' if labels == {0} else 'only defective'} images (--allow-accuracy-loss writes "
                       "the model without a gate)")
    return TiledDataset(normal_set, tiling) if tiling else normal_set, cal_set, test_set


def _gated_export(exporter: Any, name: str, args: argparse.Namespace, model: Any, meta: dict[str, Any],
                  extra: dict[str, Any], tiling: Any) -> tuple[Any, dict[str, Any], float]:
    """Run a gated export (``export_int8`` or ``export_bf16``) and print its gate, one metric a line:
    fp32, the reduced model, change, bound. Returns the written path (None: refused), the report and
    the seconds it took."""
    from ..deploy.quantize import GATE_BOUNDS
    normal_set, cal_set, test_set = _gate_sets(args, model, meta, tiling)
    t0 = time.perf_counter()
    path, report = exporter(model, args.out, normal_set, cal_set, test_set, meta.get("calibration"),
                            extra_meta=extra, allow_accuracy_loss=args.allow_accuracy_loss)
    gate = report["gate"]
    for k, d in gate.get("change", {}).items():
        print(f"{k}: fp32 {gate['fp32'][k]:.4f}, {name} {gate[name][k]:.4f} ({d:+.4f}; bound {GATE_BOUNDS[k]:.3f})")
    return path, report, time.perf_counter() - t0


def _warn_if_forced(gate: dict[str, Any]) -> None:
    if not gate["ok"]:
        print(f"warning: the accuracy gate failed ({gate['reason']}); written because of --allow-accuracy-loss")


def _export_bf16(args: argparse.Namespace, model: Any, meta: dict[str, Any], extra: dict[str, Any],
                 tiling: Any) -> int | None:
    """``--precision bf16``: the gated bf16 IR, or exit 3 when refused. ``auto``: bf16 where the CPU
    runs it natively and the gate passes; None (write the fp32 IR) otherwise."""
    from ..deploy.openvino_runtime import cpu_has_bf16
    from ..deploy.quantize import export_bf16
    if args.precision == "auto" and not cpu_has_bf16():
        print("this CPU has no native bf16: exporting fp32")
        return None
    path, report, seconds = _gated_export(export_bf16, "bf16", args, model, meta, extra, tiling)
    if path is None:
        reason = report["gate"]["reason"]
        if args.precision == "auto":
            print(f"bf16 refused ({reason}): exporting fp32")
            return None
        print(f"bf16 model refused: {reason}; nothing written (--allow-accuracy-loss writes it anyway)")
        return 3
    print(f"exported {model.config.describe()} ({model.config.teacher}) for bf16 inference to {path} "
          f"({seconds:.1f} s); calibration {report['calibration']}")
    _warn_if_forced(report["gate"])
    return 0


def _export_int8(args: argparse.Namespace, model: Any, meta: dict[str, Any], extra: dict[str, Any],
                 tiling: Any) -> int:
    try:
        from ..deploy.quantize import export_int8, require_nncf
        require_nncf()
    except ImportError as e:
        raise CLIError(message(e)) from e
    path, report, seconds = _gated_export(export_int8, "int8", args, model, meta, extra, tiling)
    if path is None:
        print(f"INT8 model refused: {report['gate']['reason']}; nothing written (--allow-accuracy-loss writes it "
              "anyway)")
        return 3
    size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    print(f"exported {model.config.describe()} ({model.config.teacher}) as INT8 to {path} ({size / 2**20:.1f} MiB, "
          f"{seconds:.1f} s; statistics from {count(report['statistics_images'], 'normal training image')}); "
          f"calibration {report['calibration']}")
    _warn_if_forced(report["gate"])
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
