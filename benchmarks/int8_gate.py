"""Measure ``nferd export --int8`` on trained checkpoints: the accuracy gate's figures (image and
pixel AUROC and AUPRO of the INT8 IR against the fp32 IR on the test split) and the batch-1
latency of both IRs on the same machine, one thread.

    python benchmarks/int8_gate.py --out benchmarks/screens/int8_gate.json \\
        RUN_DIR:DATA_ROOT:CATEGORY:SEED [...]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from nferd.cli.main import main as nferd
from nferd.deploy.openvino_runtime import OpenVinoPredictor
from nferd.engine import safe_io
from nferd.engine.provenance import provenance


def latency_ms(path: Path, size: int, iters: int = 20) -> float:
    pred = OpenVinoPredictor.from_file(path, threads=1)
    x = torch.rand(1, 3, size, size)
    pred.maps(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        pred.maps(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(run: str, folder: Path) -> dict[str, Any]:
    run_dir, root, category, seed = run.split(":")
    fp32, int8 = folder / f"{category}{seed}.xml", folder / f"{category}{seed}_int8.xml"
    assert nferd(["export", "--checkpoint", run_dir, "--format", "openvino", "--out", str(fp32), "--no-check"]) == 0
    t0 = time.perf_counter()
    code = nferd(["export", "--checkpoint", run_dir, "--format", "openvino", "--int8", "--data", root,
                  "--category", category, "--out", str(int8), "--allow-accuracy-loss"])
    seconds = time.perf_counter() - t0
    meta = OpenVinoPredictor.from_file(int8).metadata
    size = int(meta["image_size"])
    return {"run": run_dir, "dataset": Path(root).resolve().name, "category": category, "seed": int(seed),
            "exit_code": code, "export_seconds": seconds, "gate": meta["int8"]["gate"],
            "latency_ms_b1": {"fp32": latency_ms(fp32, size), "int8": latency_ms(int8, size)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR:DATA_ROOT:CATEGORY:SEED")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for run in args.runs:
            results.append(measure(run, Path(tmp)))
            r = results[-1]
            print(r["category"], r["seed"], r["gate"].get("change"), r["latency_ms_b1"], flush=True)
    safe_io.write_json(args.out, {"runs": results, "provenance": {**provenance(1, "cpu"), "precision": "int8 vs fp32",
                                                                  "command": shlex.join(["python", *sys.argv])}})


if __name__ == "__main__":
    main()
