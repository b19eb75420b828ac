"""Analysis: would normalising each stage's distance map by normal statistics help localisation?

The model's map is the plain sum of the three stages' 1 - cosine maps (RD4AD). Two common
normalisations use only normal images: divide each stage by its mean over the training images
(equal stage weights), or subtract each position's mean over the training images (a position
prior: systematic rebuild errors at fixed places of an aligned part cancel out). This script
scores a trained checkpoint with each, on the test split, from the same forward pass:

    python scripts/map_normalisation.py --checkpoint runs/s13-bottle-rd/rd \
        --data ../shared/data/mvtec_ad_256 --category bottle

Training images are passed with their own image masked out of the banks, as in training. A
measurement script, not a feature: the statistics come from the training images the student fitted.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from nferd.models.anomaly_map import combine_stages, image_score, stage_distance
from nferd.engine.checkpoint import load_checkpoint
from nferd.data.datasets import make_dataset
from nferd.engine.device import autocast, autocast_dtype
from nferd.metrics import compute_metrics


@torch.no_grad()
def stage_maps(model, dataset, exclude_own: bool) -> tuple[list[Tensor], np.ndarray, np.ndarray]:
    """Each stage's distance map at its own resolution (N x h x w), labels and masks."""
    dev = torch.device("cpu")
    amp = autocast_dtype(dev, "auto")
    out: list[list[Tensor]] = [[], [], []]
    labels, masks = [], []
    for b in DataLoader(dataset, batch_size=16):
        with autocast(dev, amp):
            t, s = model(b["image"], exclude_ids=b["index"] if exclude_own else None)
        for i in range(3):
            out[i].append(stage_distance(t[i], s[i])[:, 0])
        labels.append(np.asarray(b["label"]))
        masks.append((b["mask"][:, 0] > 0.5).numpy().astype(np.uint8))
    return [torch.cat(o) for o in out], np.concatenate(labels), np.concatenate(masks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.checkpoint)
    size = model.config.image_size
    train = make_dataset("mvtec", args.data, args.category, "train", size)
    test = make_dataset("mvtec", args.data, args.category, "test", size)
    normal, _, _ = stage_maps(model, train, exclude_own=True)
    maps, labels, masks = stage_maps(model, test, exclude_own=False)

    def score(stages: list[Tensor], name: str) -> None:  # the model's own combine and blur
        m = model.blur(combine_stages([d.unsqueeze(1) for d in stages], (size, size), model.config.map_combine))
        r = compute_metrics(image_score(m).numpy(), labels, m[:, 0].numpy(), masks)
        print(f"| {name} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['pixel_ap']:.4f} |",
              flush=True)

    print("| map | image AUROC | pixel AUROC | AUPRO | pixel AP |\n| --- | --- | --- | --- | --- |")
    score(maps, "sum of stages (the model's map)")
    score([d / n.mean() for d, n in zip(maps, normal)], "each stage / its training mean")
    score([d - n.mean(0) for d, n in zip(maps, normal)], "each position - its training mean")


if __name__ == "__main__":
    main()
