"""Rescore trained checkpoints with other mixes of the student map and the bank distance.

Training is the same whatever the bank distance's weight and stages are (the student is RD4AD's
and the bank only scores), so one trained model answers for every mix: this loads checkpoints
that hold all three banks, computes each term once on the held-out normal images and the test
split (fp32), and scores every mix in MIXES with the benchmark's metrics. It is how the default
weight and stages were chosen; the chosen design was then trained and tested by
``nferd benchmark run`` like every other row of the results.

    python benchmarks/map_terms.py --out benchmarks/screens/map_terms.json \\
        RUN_DIR:DATA_ROOT:CATEGORY:SEED [...]

RUN_DIR is a benchmark work folder (``--work``) of a model with banks at stages 1, 2 and 3 and
``bank_distance_weight`` > 0; SEED picks the same held-out images as its training did.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nferd import load_checkpoint, make_dataset
from nferd.engine import safe_io
from nferd.engine.benchmark import HOLDOUT
from nferd.engine.provenance import provenance
from nferd.engine.train import held_out_normals
from nferd.metrics import compute_metrics
from nferd.models.anomaly_map import anomaly_map

# name -> (weight, bank stages); "student" is RD4AD's map alone
MIXES: dict[str, tuple[float, tuple[int, ...]]] = {
    "student": (0.0, ()),
    **{f"w{w}_stages{''.join(map(str, st))}": (w, st)
       for w in (0.1, 0.25, 0.5, 1.0) for st in ((1, 2, 3), (1, 2), (1,), (2, 3))},
}


@torch.no_grad()
def terms(model: Any, dataset: Any) -> dict[str, np.ndarray]:
    """Blurred student map and per-stage bank distances (each blurred, at the image size)."""
    size = (model.config.image_size,) * 2
    out: dict[str, list[np.ndarray]] = {}
    for batch in DataLoader(dataset, batch_size=16):
        t, s = model(batch["image"])
        found = {"student": model.blur(anomaly_map(t, s, size))}
        for i, bank in model.banks.items():
            d = F.interpolate(bank.nearest_distance(t[int(i)]), size=size, mode="bilinear", align_corners=True)
            found[f"stage{int(i) + 1}"] = model.blur(d)
        for k, v in found.items():
            out.setdefault(k, []).append(v[:, 0].numpy())
        out.setdefault("labels", []).append(np.asarray(batch["label"]))
        out.setdefault("masks", []).append((batch["mask"][:, 0] > 0.5).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def mix(normal: dict[str, np.ndarray], test: dict[str, np.ndarray], weight: float,
        stages: tuple[int, ...]) -> np.ndarray:
    """z(student) + weight * z(sum of the stages' distances), standardised on the normal images."""
    def z(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (b - a.mean()) / a.std()
    out = z(normal["student"], test["student"])
    if stages:
        dn = sum(normal[f"stage{i}"] for i in stages)
        dt = sum(test[f"stage{i}"] for i in stages)
        out = out + weight * z(dn, dt)
    return out


def score_run(run: str) -> dict[str, Any]:
    run_dir, root, category, seed = run.split(":")
    model, _ = load_checkpoint(run_dir)
    model.eval()
    if sorted(model.banks) != ["0", "1", "2"]:
        raise SystemExit(f"{run_dir}: needs banks at stages 1, 2 and 3")
    size = model.config.image_size
    normal_set = held_out_normals(root, category, size, int(seed), HOLDOUT)
    normal, test = terms(model, normal_set), terms(model, make_dataset("auto", root, category, "test", size))
    rows = {}
    for name, (weight, stages) in MIXES.items():
        maps = mix(normal, test, weight, stages)
        m = compute_metrics(maps.reshape(len(maps), -1).max(1), test["labels"], maps, test["masks"])
        rows[name] = {k: float(m[k]) for k in ("image_auroc", "pixel_auroc", "aupro")}
        print(category, seed, name, " ".join(f"{v:.4f}" for v in rows[name].values()), flush=True)
    return {"run": run_dir, "dataset": Path(root).resolve().name, "category": category, "seed": int(seed),
            "n_normal": len(normal_set), "n_test": int(len(test["labels"])), "mixes": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR:DATA_ROOT:CATEGORY:SEED")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)  # before the hour of scoring, not after
    results = [score_run(r) for r in args.runs]
    safe_io.write_json(args.out, {"mixes": {k: {"weight": w, "stages": list(s)} for k, (w, s) in MIXES.items()},
                                  "runs": results,
                                  "provenance": {**provenance(args.threads, "cpu"), "precision": "fp32",
                                                 "command": shlex.join(["python", *sys.argv])}})


if __name__ == "__main__":
    main()
