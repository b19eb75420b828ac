"""The verbs around the model: ``synth``, ``info``, ``diagnose``, ``speed`` and ``benchmark``.

Imports of heavy modules sit inside the functions: a verb loads torch (and what else it needs)
when it runs, so ``--help``, ``--version`` and option errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import data_spec
from .options import CLIError, model_config_from
from .wording import message


def _dumps(obj: object, **kw: object) -> str:
    from ..engine import jsonio  # numpy: loaded when a verb prints JSON, not for --help
    return jsonio.dumps(obj, **kw)


def cmd_synth(args: argparse.Namespace) -> int:
    from ..data.synth import ensure_synthetic_dataset
    path = ensure_synthetic_dataset(args.out, seed=args.seed, n_train=args.n_train)
    print(f"synthetic dataset written to {path} (category '{path.name}', MVTec layout)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import model_info
    info = model_info(model_config_from(args), args.teacher_weights or "random")
    if args.json:
        print(_dumps(info, indent=2))
    else:
        for k, v in info["params"].items():
            print(f"{k:>14}: {v / 1e6:8.3f} M")
        print(f"{'forward':>14}: {info['gflops']:8.2f} GFLOPs per image at {args.image_size} px")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from ..engine.checkpoint import load_checkpoint
    from .diagnose import diagnose
    model, _ = load_checkpoint(args.checkpoint)
    data = data_spec(args)
    test_set = data.dataset(data.categories()[0], "test", model.config.image_size)
    report = diagnose(model, test_set, device=args.device)
    if args.json:
        print(_dumps(report, indent=2))
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


def cmd_speed(args: argparse.Namespace) -> int:
    from .bench import run_bench
    try:
        res = run_bench(args.teacher, args.image_size, args.batch_size, args.device, args.reference,
                        args.train_steps, args.infer_iters, bank=args.bank, compile=args.compile,
                        recall=args.recall, fusion=args.fusion, backend=args.backend, int8=args.int8,
                        precision=args.precision, peer=args.peer, preset=args.preset,
                        stages=args.stages)
    except (ImportError, ValueError) as e:
        raise CLIError(message(e)) from e
    if args.save:
        from ..engine.benchmark import save_speed_result
        print(f"result file: {save_speed_result(res, Path(args.save))}", file=sys.stderr)
    if args.json:
        print(_dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from ..engine.benchmark import Run, load_results, model_presets, run_grid
    results = Path(args.results)
    if args.action == "table":
        from ..engine.tables import peers_table, summary_table
        rows = load_results(results)
        if not rows:
            raise CLIError(f"no result files under '{results}': run `nferd benchmark run` first")
        print(summary_table(rows))
        if {r["model"] for r in rows} & {"rd4ad", "patchcore"}:
            print()
            print(peers_table(rows))
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
