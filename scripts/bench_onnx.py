"""Batch-1 latency of one model three ways, in one process: PyTorch fp32, PyTorch's fast path, ONNX Runtime.

* torch_fp32: the exported graph run eagerly in PyTorch, fp32, NCHW (what the .onnx file computes);
* torch_fast: ``Predictor.maps``, i.e. channels_last plus autocast to ``nferd.engine.device.autocast_dtype``
  (bf16 on CPUs with native bf16, otherwise fp32);
* onnxruntime: ``OnnxPredictor.maps`` on the exported file (CPUExecutionProvider, fp32).

The three are timed round-robin (one call of each per round), so load from other processes
falls on all of them alike; still, compare figures only from an idle machine. Prints JSON.

    python scripts/bench_onnx.py --teacher efficientnet_lite0 --image-size 256 --iters 30
    python scripts/bench_onnx.py --checkpoint runs/bottle --iters 30
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from nferd.engine.checkpoint import load_checkpoint
from nferd.engine.device import autocast_dtype, cpu_has_bf16, default_threads
from nferd.deploy.export import InferenceGraph, export_onnx
from nferd.models.nferd import NFERD, ModelConfig
from nferd.deploy.onnx_runtime import OnnxPredictor
from nferd.deploy.predict import Predictor


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_model(args: argparse.Namespace) -> NFERD:
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        return model.eval()
    cfg = ModelConfig(teacher=args.teacher, image_size=args.image_size, bank=args.bank,
                      fusion="hafm" if args.bank else "none")
    torch.manual_seed(0)
    model = NFERD(cfg, teacher_weights=args.teacher_weights).eval()  # random student, real teacher by default
    if cfg.bank:  # banks of teacher maps (of noise images), so the recall runs on real numbers
        with torch.no_grad():
            feats = model.teacher(torch.rand(cfg.n_bank, 3, cfg.image_size, cfg.image_size))
        model.fill_banks(feats, torch.arange(cfg.n_bank))
    return model


def summary(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    return {"median_ms": round(float(np.median(ms)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "min_ms": round(float(ms.min()), 2), "mean_ms": round(float(ms.mean()), 2),
            "stdev_ms": round(float(ms.std()), 2), "n": int(ms.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint (else a random student is built)")
    ap.add_argument("--teacher", default="efficientnet_lite0")
    ap.add_argument("--teacher-weights", default=None, help="PATH or 'random' (default: the official weights)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--bank", type=lambda v: v.lower() in ("on", "true", "1"), default=True, metavar="on|off")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: cores available)")
    ap.add_argument("--onnx-out", default=None, help="where to write the .onnx file (default: a temporary folder)")
    args = ap.parse_args()

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    model = build_model(args)
    size = model.config.image_size
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.onnx_out or Path(tmp) / "model.onnx")
        t0 = time.perf_counter()
        export_onnx(model, path)
        export_s = time.perf_counter() - t0
        onnx_pred = OnnxPredictor.from_file(path, threads=threads)
        file_mib = path.stat().st_size / 2**20

        fp32_graph = InferenceGraph(copy.deepcopy(model).float().eval())
        fast = Predictor(copy.deepcopy(model), device="cpu", precision="auto")

        def torch_fp32() -> np.ndarray:
            with torch.no_grad():
                return fp32_graph(x)[0].numpy()

        runs = {"torch_fp32": torch_fp32, "torch_fast": lambda: fast.maps(x)[0],
                "onnxruntime": lambda: onnx_pred.maps(x)[0]}
        outputs = {name: fn() for name, fn in runs.items()}  # also the first warm-up call
        for _ in range(max(args.warmup - 1, 0)):
            for fn in runs.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.iters):
            for name, fn in runs.items():  # round-robin: background load hits every backend alike
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)

    ref = outputs["torch_fp32"]
    rng = float(ref.max() - ref.min())
    results = {name: summary(t) for name, t in times.items()}
    results["torch_fast"]["dtype"] = str(fast.amp or torch.float32).replace("torch.", "")
    base = results["torch_fp32"]["median_ms"]
    for r in results.values():
        r["speedup_vs_torch_fp32"] = round(base / r["median_ms"], 3)
    print(json.dumps({
        "machine": {"cpu": cpu_name(), "threads": threads, "cpu_bf16": cpu_has_bf16(),
                    "autocast_dtype": str(autocast_dtype(torch.device("cpu"), "auto"))},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "model": {"teacher": model.config.teacher, "image_size": size, "bank": model.config.bank,
                  "reading": model.config.reading, "checkpoint": args.checkpoint},
        "batch": 1, "iters": args.iters, "warmup": args.warmup,
        "onnx": {"export_seconds": round(export_s, 2), "file_mib": round(file_mib, 1),
                 "max_abs_diff_vs_torch_fp32": float(np.abs(outputs["onnxruntime"] - ref).max()), "map_range": rng},
        "torch_fast_max_abs_diff_vs_fp32": float(np.abs(outputs["torch_fast"] - ref).max()),
        "latency": results,
    }, indent=2))


if __name__ == "__main__":
    main()
