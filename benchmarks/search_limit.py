"""Rescore trained checkpoints of the default model with fewer bank positions searched.

The default model's student does not depend on the bank (it only scores through the map), so a
cheaper search can be judged on the same trained checkpoints: each is rebuilt with a smaller
``patch_limit`` (the seeded random subset of bank positions its nearest-neighbour search visits;
the map's standardisation is refitted on the same held-out good images) and scored on the test
split with the benchmark's metrics, next to the exact search it was trained with.

    python benchmarks/search_limit.py --out benchmarks/screens/search_limit.json \\
        RUN_DIR:DATA_ROOT:CATEGORY:SEED [...]
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from nferd import evaluate, load_checkpoint, make_dataset
from nferd.engine import safe_io
from nferd.engine.benchmark import HOLDOUT
from nferd.engine.evaluate import fit_map_norm
from nferd.engine.provenance import provenance
from nferd.engine.train import held_out_normals
from nferd.models.nferd import NFERD

LIMITS = (16384, 8192, 4096, 2048)


def with_limit(model: NFERD, limit: int) -> NFERD:
    """The same weights and banks, searching ``limit`` bank positions."""
    cfg = dataclasses.replace(model.config, patch_limit=limit)
    out = NFERD(cfg, teacher=model.teacher)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("patch_index")}
    missing, unexpected = out.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("patch_index") for k in missing), (missing, unexpected)
    return out.eval()


def score_run(run: str) -> dict[str, Any]:
    run_dir, root, category, seed = run.split(":")
    model, _ = load_checkpoint(run_dir)
    size = model.config.image_size
    normal = held_out_normals(root, category, size, int(seed), HOLDOUT)
    test = make_dataset("auto", root, category, "test", size)
    rows = {}
    for limit in LIMITS:
        m = with_limit(model, limit)
        fit_map_norm(m, normal, device="cpu", precision="fp32")
        met, _ = evaluate(m, test, device="cpu", precision="fp32")
        rows[str(limit)] = {k: float(met[k]) for k in ("image_auroc", "pixel_auroc", "aupro")}
        print(category, seed, limit, " ".join(f"{v:.4f}" for v in rows[str(limit)].values()), flush=True)
    return {"run": run_dir, "dataset": Path(root).resolve().name, "category": category, "seed": int(seed),
            "limits": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR:DATA_ROOT:CATEGORY:SEED")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    results = [score_run(r) for r in args.runs]
    safe_io.write_json(args.out, {"limits": list(LIMITS), "runs": results,
                                  "provenance": {**provenance(args.threads, "cpu"), "precision": "fp32",
                                                 "command": shlex.join(["python", *sys.argv])}})


if __name__ == "__main__":
    main()
