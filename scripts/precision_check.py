"""Does the fast path keep the accuracy? bf16 (fast) vs fp32 (plain) training and testing (issue 4).

Trains the same model twice on one category, same seed and epochs: once with ``--precision fp32``
(training and testing in fp32, the plain path) and once with ``--precision auto`` (bf16 autocast
where the CPU has it, channels_last, cached fp16 teacher features: the fast path). Tests each
with its own precision and prints JSON: both runs' metrics and wall times, the metric gaps and
the Spearman rank correlation of the two runs' image scores (all images, good only, defective
only).

Two yardsticks say how much of a gap is precision and how much is training's own chaos:
``inference_only`` tests the fp32-trained weights once in fp32 and once on the fast path (same
weights, so only the arithmetic differs); ``--noise-floor`` trains fp32 a second time on one
thread instead of all, so only the order of floating-point sums differs, and reports the same
agreement between the two fp32 runs. ``--reuse`` loads runs already trained in ``--out``.

    python scripts/precision_check.py --data ../shared/data/mvtec_ad_256 --category bottle --epochs 50 --noise-floor
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from nferd.engine.checkpoint import load_checkpoint
from nferd.data.datasets import make_dataset
from nferd.engine.evaluate import evaluate
from nferd.models.nferd import ModelConfig
from nferd.engine.train import TrainConfig, train

KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")


def agreement(a: dict, b: dict) -> dict:
    """Rank agreement of two runs' image scores, and their metric gaps (b - a)."""
    labels = a["labels"]
    rho = {"all": spearmanr(a["scores"], b["scores"]).statistic}
    for name, sel in (("good", labels == 0), ("defective", labels == 1)):
        rho[name] = spearmanr(a["scores"][sel], b["scores"][sel]).statistic
    rng = float(a["maps"].max() - a["maps"].min())
    return {"image_score_spearman": {k: float(v) for k, v in rho.items()},
            "gap": {k: b["metrics"][k] - a["metrics"][k] for k in KEYS},
            "max_map_diff_of_range": float(np.abs(a["maps"] - b["maps"]).max() / rng)}


def run(model, test_set, precision: str) -> dict:
    t0 = time.perf_counter()
    metrics, raw = evaluate(model, test_set, precision=precision)
    return {"metrics": {k: metrics[k] for k in KEYS}, "test_wall_s": time.perf_counter() - t0,
            "scores": np.asarray(raw["scores"], dtype=np.float64), "labels": np.asarray(raw["labels"]),
            "maps": raw["maps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--teacher", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-floor", action="store_true", help="also train fp32 on one thread")
    ap.add_argument("--reuse", action="store_true", help="load runs already trained in --out")
    ap.add_argument("--out", default="runs/precision")
    args = ap.parse_args()

    train_set = make_dataset("auto", args.data, args.category, "train", args.image_size)
    test_set = make_dataset("auto", args.data, args.category, "test", args.image_size)
    cfg = ModelConfig(teacher=args.teacher, image_size=args.image_size)
    plan = [("fp32", "fp32", None), ("auto", "auto", None)]
    if args.noise_floor:
        plan.append(("fp32-1thread", "fp32", 1))
    threads = torch.get_num_threads()
    runs, models = {}, {}
    for name, precision, n_threads in plan:
        out = Path(args.out) / name
        wall = None
        if args.reuse and (out / "model.safetensors").is_file():
            model, _ = load_checkpoint(out)
        else:
            tcfg = TrainConfig(epochs=args.epochs, seed=args.seed, precision=precision, holdout=0.0,
                               checkpoint_every=10**6, threads=n_threads)
            t0 = time.perf_counter()
            model, _ = train(train_set, cfg, tcfg, out, progress=False)
            wall = time.perf_counter() - t0
        torch.set_num_threads(threads)  # training set its own thread count; test with the default
        runs[name] = {"train_wall_s": wall, **run(model, test_set, precision)}
        models[name] = model
        print(json.dumps({name: runs[name]["metrics"], "train_wall_s": wall}), flush=True)
    fp32_on_fast = run(models["fp32"], test_set, "auto")
    report = {"category": args.category, "teacher": args.teacher, "epochs": args.epochs, "seed": args.seed,
              "reading": cfg.reading, "threads": threads,
              "fp32": {k: runs["fp32"][k] for k in ("metrics", "train_wall_s")},
              "fast": {k: runs["auto"][k] for k in ("metrics", "train_wall_s")},
              "fast_vs_fp32": agreement(runs["fp32"], runs["auto"]),
              "inference_only": agreement(runs["fp32"], fp32_on_fast)}
    if runs["fp32"]["train_wall_s"] and runs["auto"]["train_wall_s"]:
        report["train_speedup"] = runs["fp32"]["train_wall_s"] / runs["auto"]["train_wall_s"]
    if args.noise_floor:
        report["fp32_1thread"] = {k: runs["fp32-1thread"][k] for k in ("metrics", "train_wall_s")}
        report["noise_floor_fp32_vs_fp32_1thread"] = agreement(runs["fp32"], runs["fp32-1thread"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
