"""Benchmark: RD4AD vs NFERD bank readings on one category, same teacher, data, epochs and seed.

For each variant: train, evaluate the last epoch on the test split, and (for banked variants)
measure retrieval health and the metrics with the bank replaced by random / mean / zero maps.

    python scripts/compare_readings.py --data ../shared/data/mvtec_3d_rgb_256 --category tire \
        --teacher efficientnet_lite0 --epochs 40 --variants rd A B C D --out runs/readings-tire

Variants: ``rd`` (bank off, fusion none) or a reading letter, optionally with options after a
colon, e.g. ``D:n_bank=32,top_k=8,temperature=0.02`` or ``D:fusion=add``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nferd.data.datasets import make_dataset
from nferd.cli.diagnose import diagnose
from nferd.engine.evaluate import evaluate
from nferd.models.nferd import ModelConfig
from nferd.engine.train import LR_SCHEDULES, TrainConfig, train


def parse_variant(spec: str, teacher: str, size: int) -> ModelConfig:
    name, _, opts = spec.partition(":")
    kw: dict = {"teacher": teacher, "image_size": size}
    if name == "rd":
        kw.update(bank=False, fusion="none")
    else:
        kw.update(bank=True, reading=name)
    for item in filter(None, opts.split(",")):
        k, v = item.split("=")
        field = ModelConfig.__dataclass_fields__[k]
        if "tuple" in str(field.type):  # bank_stages=2+3
            kw[k] = tuple(int(x) for x in v.split("+"))
        else:
            kw[k] = v if field.type in ("str", str) else (float(v) if "float" in str(field.type) else int(v))
    return ModelConfig(**kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--teacher", default="efficientnet_lite0")
    ap.add_argument("--teacher-weights", default=None)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", type=float, default=0.0)
    ap.add_argument("--variants", nargs="+", default=["rd", "A", "B", "C", "D"])
    ap.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (two runs side by side: 1 each)")
    ap.add_argument("--no-diagnose", action="store_true")
    ap.add_argument("--out", default="runs/compare")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # evaluation and diagnose too, not only training

    train_set = make_dataset("auto", args.data, args.category, "train", args.image_size)
    test_set = make_dataset("auto", args.data, args.category, "test", args.image_size)
    out = Path(args.out)
    results = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    for spec in args.variants:
        if spec in results:
            continue
        cfg = parse_variant(spec, args.teacher, args.image_size)
        tcfg = TrainConfig(epochs=args.epochs, seed=args.seed, holdout=args.holdout, checkpoint_every=10**6,
                           threads=args.threads, lr_schedule=args.lr_schedule)
        t0 = time.perf_counter()
        model, summary = train(train_set, cfg, tcfg, out / spec.replace(":", "_").replace(",", "_"),
                               teacher_weights=args.teacher_weights, progress=False)
        wall = time.perf_counter() - t0
        metrics, _ = evaluate(model, test_set)
        row = {"config": cfg.to_dict(), "train_wall_s": wall, "final_loss": summary["final_loss"],
               **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_ap")}}
        if cfg.bank and not args.no_diagnose:
            row["diagnose"] = diagnose(model, test_set)
        results[spec] = row
        print(json.dumps({spec: {k: v for k, v in row.items() if k not in ("config", "diagnose")}}), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(results, indent=2))
    print("| variant | image AUROC | pixel AUROC | AUPRO | loss | train s |")
    print("|---|---|---|---|---|---|")
    for spec, r in results.items():
        print(f"| {spec} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | "
              f"{r['final_loss']:.4f} | {r['train_wall_s']:.0f} |")


if __name__ == "__main__":
    main()
