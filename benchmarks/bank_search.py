"""Screen the bank distance's two-stage search (``search_reduction``) against the exact search.

The search only changes the bank's term of the anomaly map (each position's distance to its
nearest normal bank position); the student does not depend on it. So the screen scores that term
alone, with the teacher whose stage channels it is meant for: a bottleneck ResNet (256 and 512
channels at stages 1 and 2, as WRN50-2). Per run, the banks are filled as training fills them
(the seed's hold-out and bank draw), and the test split is scored with every reduction: image
AUROC (map maximum), pixel AUROC and AUPRO of the blurred distance map, the distance's excess
over the exact one, and the search's milliseconds per image on one thread. The forward cost of
the whole default model with WRN50-2 (``nferd info``'s count) is recorded for each reduction.

    python benchmarks/bank_search.py --teacher resnet152 --weights FILE.safetensors \\
        --out benchmarks/screens/bank_search.json DATA_ROOT:CATEGORY:SEED [...]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nferd import make_dataset
from nferd.cli.info import model_info
from nferd.engine import safe_io
from nferd.engine.benchmark import HOLDOUT
from nferd.engine.provenance import provenance
from nferd.engine.train import bank_indices, split_holdout
from nferd.metrics import aupro, auroc, pixel_auroc
from nferd.models.nferd import NFERD, ModelConfig

REDUCTIONS = (1, 4, 8, 16)


def teacher_maps(model: NFERD, images: list[torch.Tensor], batch: int = 16) -> list[torch.Tensor]:
    out: list[list[torch.Tensor]] = [[], [], []]
    with torch.no_grad():
        for a in range(0, len(images), batch):
            for i, f in enumerate(model.teacher(torch.stack(images[a:a + batch]))):
                out[i].append(f)
    return [torch.cat(f) for f in out]


def score_run(run: str, teacher: str, weights: str, size: int) -> dict[str, Any]:
    root, category, seed = run.split(":")
    seed_i = int(seed)
    train = make_dataset("auto", root, category, "train", size)
    kept = split_holdout(len(train), HOLDOUT, seed_i)[0]
    test = make_dataset("auto", root, category, "test", size)
    base = NFERD(ModelConfig(teacher=teacher, image_size=size), teacher_weights=weights).eval()
    idx = bank_indices(len(kept), base.config.n_bank, seed_i)
    bank_feats = teacher_maps(base, [train[kept[int(i)]]["image"] for i in idx])
    items = [test[i] for i in range(len(test))]
    feats = teacher_maps(base, [it["image"] for it in items])
    masks = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
    labels = np.array([it["label"] for it in items])
    rows, exact = {}, None
    for r in REDUCTIONS:
        model = NFERD(ModelConfig(teacher=teacher, image_size=size, search_reduction=r), teacher=base.teacher).eval()
        model.fill_banks(bank_feats, idx)
        with torch.no_grad():
            dist = model.bank_distance(feats, (size, size))
            one = [f[:1] for f in feats]
            model.bank_distance(one, (size, size))
            t0 = time.perf_counter()
            for _ in range(3):
                model.bank_distance(one, (size, size))
            ms = (time.perf_counter() - t0) / 3 * 1000
            maps = model.blur(dist)[:, 0].numpy()
        exact = dist if exact is None else exact
        excess = (dist - exact).flatten()
        rows[str(r)] = {"image_auroc": auroc(maps.max(axis=(1, 2)), labels), "pixel_auroc": pixel_auroc(maps, masks),
                        "aupro": aupro(maps, masks), "distance_excess_mean": float(excess.mean()),
                        "distance_excess_p99": float(excess.quantile(0.99)), "search_ms_per_image": ms}
        print(category, seed, r, " ".join(f"{k} {v:.4f}" for k, v in rows[str(r)].items()), flush=True)
    return {"dataset": Path(root).resolve().name, "category": category, "seed": seed_i, "reductions": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="DATA_ROOT:CATEGORY:SEED")
    p.add_argument("--teacher", default="resnet152")
    p.add_argument("--weights", required=True, help="the teacher's ImageNet weights (a local file)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    cost = {str(r): model_info(ModelConfig(teacher="wide_resnet50_2", image_size=args.image_size,
                                           search_reduction=r))["gflops"] for r in REDUCTIONS}
    rd = model_info(ModelConfig.preset("rd4ad", teacher="wide_resnet50_2", image_size=args.image_size))["gflops"]
    results = [score_run(r, args.teacher, args.weights, args.image_size) for r in args.runs]
    safe_io.write_json(args.out, {"reductions": list(REDUCTIONS), "teacher": args.teacher,
                                  "wrn50_gflops": cost, "wrn50_rd4ad_gflops": rd, "runs": results,
                                  "provenance": {**provenance(args.threads, "cpu"), "precision": "fp32",
                                                 "command": shlex.join(["python", *sys.argv])}})


if __name__ == "__main__":
    main()
