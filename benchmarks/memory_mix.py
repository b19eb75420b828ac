"""Rescore trained RD4AD students with a memory of every training position beside them.

The student is trained the same whatever scores beside it, so one finished RD4AD run answers for
every memory and every mix: for each memory design in MEMORIES this fills the product's memory
from the run's own training images (same split and seed), computes the blurred student map and
the blurred memory distance once on the held-out normals, on the training images (memory rows of
each image left out) and on the test split, and scores every mix with the benchmark's metrics.
It is how the default's memory and weight were screened; the chosen design was then run by
``nferd benchmark run`` like every other row of the results.

    python benchmarks/memory_mix.py --out benchmarks/screens/memory_mix.json \\
        RUN_DIR:DATA_ROOT:CATEGORY:SEED[:TRAIN_IMAGES] [...]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from nferd import make_dataset
from nferd.data.defects import synthetic_defects
from nferd.engine import safe_io
from nferd.engine.benchmark import HOLDOUT, few_images
from nferd.engine.crossfit import train_folds
from nferd.engine.provenance import provenance
from nferd.engine.train import TrainConfig, Trainer, finished_run, training_split
from nferd.metrics import auroc, compute_metrics, pixel_auroc
from nferd.models.anomaly_map import anomaly_map
from nferd.models.nferd import NFERD, ModelConfig

MEMORIES: dict[str, dict[str, Any]] = {
    "stages23": {"memory_stages": (2, 3), "memory_grid": 2},
    "stages12": {"memory_stages": (1, 2), "memory_grid": 1},
    "stages12_grid2": {"memory_stages": (1, 2), "memory_grid": 2},
}
if "--all-memories" in sys.argv:  # also all three stages
    MEMORIES.update({"stages123_grid2": {"memory_stages": (1, 2, 3), "memory_grid": 2}})
WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)
if "--memories" in sys.argv:  # only the named designs, e.g. --memories stages12_grid2
    _names = sys.argv[sys.argv.index("--memories") + 1].split(",")
    MEMORIES = {k: v for k, v in MEMORIES.items() if k in _names}
CANDIDATES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0)  # weights the synthetic-defect selection chooses from


@torch.no_grad()
def image_terms(model: NFERD, images: torch.Tensor) -> dict[str, np.ndarray]:
    size = (model.config.image_size,) * 2
    t, s = model(images)
    return {"student": model.blur(anomaly_map(t, s, size))[:, 0].numpy(),
            "memory": model.blur(model.bank_distance(t, size))[:, 0].numpy()}


def synthetic_terms(scorers: list[tuple[NFERD, Any]], seed: int) -> dict[str, np.ndarray]:
    """Terms of good images no scorer trained on, clean and with one synthetic defect each."""
    clean, bad, masks = {"student": [], "memory": []}, {"student": [], "memory": []}, []
    for model, dataset in scorers:
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        defective, mask = synthetic_defects(images, seed=seed)
        for k, v in image_terms(model, images).items():
            clean[k].append(v)
        for k, v in image_terms(model, defective).items():
            bad[k].append(v)
        masks.append(mask[:, 0].numpy() > 0.5)
    return {**{f"clean_{k}": np.concatenate(v) for k, v in clean.items()},
            **{f"bad_{k}": np.concatenate(v) for k, v in bad.items()}, "masks": np.concatenate(masks)}


def choose_weight(syn: dict[str, np.ndarray], mu_s: float, sd_s: float, mu_m: float, sd_m: float) -> tuple[float, dict]:
    """The candidate weight whose map best separates the synthetic defects: mean of pixel AUROC on the
    defective images and image AUROC of defective against clean images."""
    marks = {}
    for w in CANDIDATES:
        clean = (syn["clean_student"] - mu_s) / sd_s + w * (syn["clean_memory"] - mu_m) / sd_m
        bad = (syn["bad_student"] - mu_s) / sd_s + w * (syn["bad_memory"] - mu_m) / sd_m
        scores = np.r_[clean.reshape(len(clean), -1).max(1), bad.reshape(len(bad), -1).max(1)]
        labels = np.r_[np.zeros(len(clean)), np.ones(len(bad))]
        marks[w] = 0.5 * (pixel_auroc(bad, syn["masks"]) + auroc(scores, labels))
    best = max(marks, key=lambda w: (round(marks[w], 4), -abs(np.log2(w + 1e-9) if w else 9)))
    return best, {str(k): float(v) for k, v in marks.items()}


@torch.no_grad()
def terms(model: NFERD, dataset: Any, leave_out: bool = False) -> dict[str, np.ndarray]:
    size = (model.config.image_size,) * 2
    out: dict[str, list[np.ndarray]] = {}
    start = 0
    for batch in DataLoader(dataset, batch_size=16):
        t, s = model(batch["image"])
        ids = torch.arange(start, start + len(batch["image"])) if leave_out else None
        start += len(batch["image"])
        found = {"student": model.blur(anomaly_map(t, s, size)),
                 "memory": model.blur(model.bank_distance(t, size, ids))}
        for k, v in found.items():
            out.setdefault(k, []).append(v[:, 0].numpy())
        out.setdefault("labels", []).append(np.asarray(batch["label"]))
        out.setdefault("masks", []).append((batch["mask"][:, 0] > 0.5).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def score_run(run: str) -> dict[str, Any]:
    parts = run.split(":")
    run_dir, root, category, seed = parts[:4]
    few = int(parts[4]) if len(parts) > 4 else None
    seed = int(seed)
    meta = finished_run(run_dir)
    size, epochs = int(meta["model"]["image_size"]), int(meta["epoch"])
    train_set = make_dataset("auto", root, category, "train", size)
    cal = None
    if few:
        train_set = Subset(train_set, few_images(len(train_set), few, seed))
    elif (Path(root) / category / "validation" / "good").is_dir():
        cal = make_dataset("auto", root, category, "validation", size)
    tcfg = TrainConfig(epochs=epochs, seed=seed, threads=1, holdout=0.0 if cal is not None else HOLDOUT)
    fit_set, cal_set = training_split(train_set, tcfg.holdout, seed, cal)
    test_set = make_dataset("auto", root, category, "test", size)
    rows: dict[str, dict[str, float]] = {}
    student_done = False
    for name, options in MEMORIES.items():
        t0 = time.perf_counter()
        model = NFERD(ModelConfig(image_size=size, **options))
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(model, fit_set, tcfg, tmp, cal_set, progress=False)
            trainer.take_student(run_dir)
            trainer.prepare()
        model.eval()
        fill_s = time.perf_counter() - t0
        normal, loo, test = terms(model, cal_set), terms(model, fit_set, leave_out=True), terms(model, test_set)
        mu_s, sd_s = normal["student"].mean(), normal["student"].std()
        mem_normal = np.concatenate([normal["memory"], loo["memory"]])
        mu_m, sd_m = mem_normal.mean(), mem_normal.std()
        zs, zm = (test["student"] - mu_s) / sd_s, (test["memory"] - mu_m) / sd_m
        scorers = [(model, cal_set)]
        if few:  # the fold students the run saved, each with its own memory, score the images they never saw
            with tempfile.TemporaryDirectory() as tmp:
                folds = train_folds(model, fit_set, tcfg, Path(tmp), Trainer, take_from=Path(run_dir))
            scorers += [(fm, Subset(fit_set, fold)) for fm, fold in folds]
        syn = synthetic_terms(scorers, seed)
        w_star, marks = choose_weight(syn, mu_s, sd_s, mu_m, sd_m)
        mixes = {f"{name}_alone": test["memory"], f"{name}_synthetic_choice": zs + w_star * zm}
        if not student_done:
            mixes["student"] = test["student"]
            student_done = True
        for w in WEIGHTS:
            mixes[f"{name}_sum_w{w}"] = zs + w * zm
        mixes[f"{name}_max"] = np.maximum(zs, zm)
        for key, maps in mixes.items():
            m = compute_metrics(maps.reshape(len(maps), -1).max(1), test["labels"], maps, test["masks"])
            rows[key] = {k: float(m[k]) for k in ("image_auroc", "pixel_auroc", "aupro", "miss_at_1pct_fa")}
            print(category, few or "all", seed, key, " ".join(f"{v:.4f}" for v in rows[key].values()), flush=True)
        rows[f"{name}_synthetic_choice"].update(weight=w_star, marks=marks)
        rows[f"{name}_alone"]["fill_seconds"] = fill_s
        rows[f"{name}_alone"]["rows"] = int(model.memory.size)
    return {"run": run_dir, "dataset": Path(root).resolve().name, "category": category, "seed": seed,
            "train_images": few, "n_normal": len(cal_set), "n_train": len(fit_set),
            "n_test": int(len(test["labels"])), "mixes": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR:DATA_ROOT:CATEGORY:SEED[:TRAIN_IMAGES]")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--all-memories", action="store_true", help="also screen the slower memory designs")
    p.add_argument("--memories", default=None, help="only these memory designs, comma-separated")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for r in args.runs:
        results.append(score_run(r))
        safe_io.write_json(args.out, {"memories": MEMORIES, "weights": WEIGHTS, "runs": results,
                                      "provenance": {**provenance(args.threads, "cpu"), "precision": "fp32",
                                                     "command": shlex.join(["python", *sys.argv])}}, default=str)


if __name__ == "__main__":
    main()
