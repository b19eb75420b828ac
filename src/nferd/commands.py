"""What each ``nferd`` sub-command does (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .cli import CLIError


def _datasets(args: argparse.Namespace, category: str | None, split: str, image_size: int):  # type: ignore[no-untyped-def]
    from .datasets import make_dataset
    kw: dict[str, Any] = {}
    if args.data_format == "folder":
        if split == "test":
            kw = {"test_normal_dir": args.test_normal_dir, "test_abnormal_dir": args.test_abnormal_dir,
                  "mask_dir": args.mask_dir}
            if not (args.test_normal_dir or args.test_abnormal_dir):
                raise CLIError("--format folder needs --test-normal-dir and/or --test-abnormal-dir to test")
            return make_dataset("folder", None, None, split, image_size, **kw)
    return make_dataset(args.data_format, args.data, category, split, image_size, **kw)


def _categories(args: argparse.Namespace) -> list[str | None]:
    if args.data_format == "folder":
        return [None]
    if args.category is None:
        raise CLIError("--category is required (a category name under --data, or 'all')")
    if args.category == "all":
        from .datasets import discover_categories
        return list(discover_categories(args.data))
    return [args.category]


def _validation_set(args: argparse.Namespace, category: str | None, image_size: int):  # type: ignore[no-untyped-def]
    """A validation/good folder (MVTec 3D-AD, LOCO) calibrates instead of held-out training images."""
    if args.data_format == "folder" or category is None:
        return None
    if not (Path(args.data) / category / "validation" / "good").is_dir():
        return None
    ds = _datasets(args, category, "validation", image_size)
    ds.calibration_source = "validation/good"
    return ds


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import ensure_synthetic_dataset
    path = ensure_synthetic_dataset(args.out, seed=args.seed, n_train=args.n_train)
    print(f"synthetic dataset written to {path} (category '{path.name}', MVTec layout)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import model_info
    info = model_info(_model_config(args), args.teacher_weights or "random")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info["params"].items():
            print(f"{k:>14}: {v / 1e6:8.3f} M")
        print(f"{'forward':>14}: {info['gflops']:8.2f} GFLOPs per image at {args.image_size} px")
    return 0


def _model_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .cli import model_config_from
    try:
        return model_config_from(args)
    except ValueError as e:
        raise CLIError(str(e)) from e


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train
    mcfg = _model_config(args)
    cats = _categories(args)
    for cat in cats:
        out = Path(args.out) / cat if (args.category == "all" and cat) else Path(args.out)
        train_set = _datasets(args, cat, "train", mcfg.image_size)
        cal_set = _validation_set(args, cat, mcfg.image_size)
        tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           precision=args.precision, device=args.device, checkpoint_every=args.checkpoint_every,
                           holdout=0.0 if cal_set is not None else args.holdout,
                           false_alarm_rate=args.false_alarm_rate, feature_cache_dir=args.feature_cache_dir)
        print(f"training {'NFERD' if mcfg.bank else 'RD4AD'} ({mcfg.teacher}, reading {mcfg.reading}, "
              f"fusion {mcfg.fusion}) on {cat or args.data}: {len(train_set)} images, {args.epochs} epochs")
        data_meta = {"data": {"root": str(args.data), "category": cat, "format": args.data_format}}
        model, summary = train(train_set, mcfg, tcfg, out, teacher_weights=args.teacher_weights,
                               calibration_set=cal_set, resume=args.resume, extra_meta=data_meta)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"done in {summary['train_seconds']:.0f} s (+{summary['feature_seconds']:.0f} s teacher features); "
              f"final loss {summary['final_loss']:.4f}; checkpoint {summary['checkpoint']}")
        if args.test:
            _test_one(model, args, cat, out / "test", {"checkpoint": str(out), **summary})
    return 0


def _test_one(model, args: argparse.Namespace, cat: str | None, out: Path, info: dict[str, Any]) -> dict:  # type: ignore[no-untyped-def]
    from .evaluate import evaluate, write_results
    test_set = _datasets(args, cat, "test", model.config.image_size)
    t0 = time.perf_counter()
    metrics, _ = evaluate(model, test_set, batch_size=getattr(args, "batch_size", 16),
                          device=getattr(args, "device", "auto"), precision=getattr(args, "precision", "auto"))
    run = {"teacher": model.config.teacher, "model": model.config.to_dict(), "eval_seconds": time.perf_counter() - t0,
           **info}
    path = write_results(out, {cat or "folder": metrics}, run)
    _print_metrics(cat or "folder", metrics)
    print(f"results: {path}")
    return metrics


def _print_metrics(name: str, m: dict[str, Any]) -> None:
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_ap")
    print(f"{name}: " + "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m))


def cmd_test(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .evaluate import evaluate, write_results
    rows: dict[str, dict[str, Any]] = {}
    run: dict[str, Any] = {}
    t0 = time.perf_counter()
    for cat in _categories(args):
        ckpt = Path(args.checkpoint) / cat if (args.category == "all" and cat) else Path(args.checkpoint)
        model, meta = load_checkpoint(ckpt)
        test_set = _datasets(args, cat, "test", model.config.image_size)
        metrics, _ = evaluate(model, test_set, batch_size=args.batch_size, device=args.device,
                              precision=args.precision)
        rows[cat or "folder"] = metrics
        _print_metrics(cat or "folder", metrics)
        run = {"checkpoint": str(args.checkpoint), "teacher": meta["teacher"]["name"], "model": meta["model"],
               "epochs": meta.get("epoch"), "train_seconds": meta.get("train_seconds"), "train": meta.get("train")}
    run["eval_seconds"] = time.perf_counter() - t0
    path = write_results(args.out, rows, run)
    print(f"results: {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import Predictor, predict_to_folder
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision)
    rows = predict_to_folder(predictor, args.inputs, args.out, args.batch_size, args.map_format)
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"skipped {r['path']}: {r['error']}")
    nok = sum(r.get("decision") == "NOK" for r in rows)
    print(f"{len(rows) - len(failed)} images scored ({nok} NOK), {len(failed)} failed; "
          f"summary: {Path(args.out) / 'summary.csv'}")
    return 0 if not failed else 3


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .diagnose import diagnose
    model, _ = load_checkpoint(args.checkpoint)
    cats = _categories(args)
    test_set = _datasets(args, cats[0], "test", model.config.image_size)
    report = diagnose(model, test_set, device=args.device)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("bank     spread  top-K gap  entropy  top-1 distinct  most common top-1")
    for r in report["retrieval"]:
        print(f"{r['bank']:<8} {r['similarity_spread_per_image']:.4f}  {r['topk_gap']:.4f}     "
              f"{r['weight_entropy']:.3f}    {r['top1_distinct']:>3}/{r['n_bank']:<3}        "
              f"{r['top1_most_common_share']:.0%}")
    print("\nbank replaced by   image AUROC  pixel AUROC  AUPRO")
    for name, m in report["metrics"].items():
        print(f"{name:<18} {m['image_auroc']:.4f}       {m.get('pixel_auroc', float('nan')):.4f}       "
              f"{m.get('aupro', float('nan')):.4f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Fresh-machine default: synthetic data, NFERD with the EfficientNet-Lite0 teacher, test, overlays."""
    from .evaluate import evaluate, write_results
    from .model import ModelConfig
    from .predict import Predictor, predict_to_folder
    from .synth import ensure_synthetic_dataset
    from .train import TrainConfig, train
    from .datasets import MVTecDataset
    t0 = time.perf_counter()
    out = Path(args.out)
    cat_dir = ensure_synthetic_dataset(out / "data", seed=args.seed)
    train_set = MVTecDataset(cat_dir.parent, cat_dir.name, "train")
    test_set = MVTecDataset(cat_dir.parent, cat_dir.name, "test")
    print(f"[1/3] synthetic dataset: {cat_dir} ({len(train_set)} train, {len(test_set)} test images)")
    mcfg = ModelConfig(teacher="efficientnet_lite0")
    tcfg = TrainConfig(epochs=args.epochs, seed=args.seed, holdout=0.15)
    ckpt = out / "model"
    if (ckpt / "last.safetensors").is_file() and not (ckpt / "model.safetensors").is_file():
        resume = True
    else:
        resume = False
        for f in ("last.safetensors", "model.safetensors", "train_log.jsonl"):
            (ckpt / f).unlink(missing_ok=True)
    print(f"[2/3] training NFERD (efficientnet_lite0 teacher, reading {mcfg.reading}) for {args.epochs} epochs")
    model, summary = train(train_set, mcfg, tcfg, ckpt, resume=resume)
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


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    res = run_bench(args.teacher, args.image_size, args.batch_size, args.device, args.reference,
                    args.train_steps, args.infer_iters, bank=args.bank)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0
