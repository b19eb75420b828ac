"""Training peak memory with the teacher feature cache, for a category of N images (issue 4).

Generates N synthetic 256 px images, builds the WRN50-sized model (random teacher weights: memory
does not depend on their values), caches the teacher features and trains one epoch, then prints
the peak resident memory (RSS) and the cache size as JSON.

    python scripts/memory_check.py --images 400 --teacher wide_resnet50_2
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nferd.data.datasets import FolderDataset
from nferd.models.nferd import NFERD, ModelConfig
from nferd.engine.train import TrainConfig, Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--teacher", default="wide_resnet50_2")
    ap.add_argument("--reading", default=None)
    ap.add_argument("--image-size", type=int, default=256)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.images):
            arr = rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(Path(tmp) / f"{i:04d}.png")
        data = FolderDataset(tmp, image_size=args.image_size)
        kw = {"reading": args.reading} if args.reading else {}
        model = NFERD(ModelConfig(teacher=args.teacher, image_size=args.image_size, **kw), teacher_weights="random")
        trainer = Trainer(model, data, TrainConfig(epochs=1, holdout=0.0, checkpoint_every=10**6),
                          Path(tmp) / "run", progress=False)
        t0 = time.perf_counter()
        trainer.prepare()
        cache_s = time.perf_counter() - t0
        cache_bytes = sum(s.numel() * s.element_size() for s in trainer.cache.stages)
        t0 = time.perf_counter()
        epoch = trainer.train_epoch(0)  # the real training step, one full epoch
        train_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": args.images, "teacher": args.teacher, "reading": model.config.reading,
                      "cache_mib": round(cache_bytes / 2**20, 1), "cache_build_s": round(cache_s, 1),
                      "epoch_s": round(train_s, 1),
                      "images_per_s": round(epoch["images_per_s"], 2), "peak_rss_mib": round(peak, 1)}, indent=2))


if __name__ == "__main__":
    main()
