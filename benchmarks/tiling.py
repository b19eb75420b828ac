"""Tiled against downscaled scoring on a generated high-resolution set with small defects.

The set: the synthetic surface at ``--image-size`` pixels (1024 by default) with the weave and
one defect drawn at the scale of a ``--feature-size`` image (128: spots of about 10 pixels,
scratches and cracks 1.5 pixels wide), anywhere in the image. Two default models are trained
with the product's ``nferd train`` for the same epochs: one on the images resized to the model
input (256 px), one on 256-px tiles at full resolution (``--tile 256``). Both are scored at full
resolution against the full-resolution masks: the downscaled model's maps are resized up, the
tiled model's maps are stitched. The result file records image AUROC, pixel AUROC and AUPRO per
seed (each seed its own generated set and training).

    python benchmarks/tiling.py --work runs/tiling --out benchmarks/screens/tiling.json --seeds 0,1
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
import torch.nn.functional as F

from nferd import load_checkpoint, make_dataset
from nferd.cli.main import main as nferd
from nferd.data.synth import generate_synthetic_dataset
from nferd.data.tiles import Tiling
from nferd.engine import safe_io
from nferd.engine.evaluate import infer
from nferd.engine.provenance import provenance
from nferd.metrics import aupro, auroc, pixel_auroc

CATEGORY = "synthetic_tiles_hires"


def full_resolution_metrics(run_dir: Path, root: Path, tiling: Tiling | None) -> dict[str, Any]:
    model, _ = load_checkpoint(run_dir)
    native = make_dataset("auto", root, CATEGORY, "test", None)
    t0 = time.perf_counter()
    if tiling is not None:
        res = infer(model, native, device="cpu", tiling=tiling)
        maps = res["maps"]
    else:
        small = make_dataset("auto", root, CATEGORY, "test", model.config.image_size)
        res = infer(model, small, device="cpu")
        h, w = native[0]["image"].shape[-2:]
        maps = F.interpolate(torch.from_numpy(res["maps"])[:, None], size=(h, w), mode="bilinear",
                             align_corners=False)[:, 0].numpy()
    seconds = time.perf_counter() - t0
    masks = np.stack([native[i]["mask"][0].numpy() > 0.5 for i in range(len(native))])
    return {"image_auroc": auroc(maps.reshape(len(maps), -1).max(axis=1), res["labels"]),
            "pixel_auroc": pixel_auroc(maps, masks), "aupro": aupro(maps, masks),
            "inference_ms_per_image": 1000 * seconds / len(maps), "n_test": len(maps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path, help="folder for the generated set and the two runs")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--feature-size", type=int, default=128)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs: dict[str, Any] = {}
    for seed in [int(v) for v in args.seeds.split(",")]:
        work = args.work / f"seed{seed}"
        root = work / "data"
        generate_synthetic_dataset(root, seed=seed, category=CATEGORY, n_train=30, n_test_good=10,
                                   n_test_per_defect=6, image_size=args.image_size, feature_size=args.feature_size)
        common = ["train", "--data", str(root), "--category", CATEGORY, "--epochs", str(args.epochs), "--seed",
                  str(seed), "--device", "cpu", "--precision", "fp32", "--image-size", str(args.tile)]
        results: dict[str, Any] = {}
        for name, (extra, tiling) in {"downscaled": ([], None), "tiled": (["--tile", str(args.tile)],
                                                                          Tiling(args.tile))}.items():
            out = work / name
            t0 = time.perf_counter()
            if not (out / "model.safetensors").is_file():
                assert nferd(common + ["--out", str(out)] + extra) == 0
            results[name] = {**full_resolution_metrics(out, root, tiling),
                             "train_wall_seconds": time.perf_counter() - t0}
            print(seed, name, {k: round(v, 4) for k, v in results[name].items()}, flush=True)
        runs[str(seed)] = results
    safe_io.write_json(args.out, {"set": {"image_size": args.image_size, "feature_size": args.feature_size,
                                          "n_train": 30, "n_test": 28}, "tile": args.tile, "epochs": args.epochs,
                                  "seeds": runs,
                                  "provenance": {**provenance(args.threads, "cpu"), "precision": "fp32",
                                                 "command": shlex.join(["python", *sys.argv])}})


if __name__ == "__main__":
    main()
