"""How well does a checkpoint's calibrated threshold decide on a labelled test split?

The threshold was fitted at training time on held-out GOOD training images (or a validation
folder); this reports, on the test split, the false-alarm rate on good images and the miss rate
on defective ones, per defect type, as JSON.

    python scripts/calibration_check.py --checkpoint runs/bottle-cal --data ../shared/data/mvtec_ad_256 --category bottle
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from nferd.engine.checkpoint import load_checkpoint
from nferd.data.datasets import make_dataset
from nferd.engine.evaluate import infer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    args = ap.parse_args()
    model, meta = load_checkpoint(args.checkpoint)
    cal = meta.get("calibration")
    if not cal:
        raise SystemExit(f"{args.checkpoint} has no calibration: train with --holdout > 0 or a validation folder")
    test = make_dataset("auto", args.data, args.category, "test", model.config.image_size)
    out = infer(model, test)
    scores, labels = np.asarray(out["scores"]), np.asarray(out["labels"])
    nok = scores > cal["image_threshold"]
    types = np.asarray(out["defect_types"])
    per_type = {t: {"n": int((types == t).sum()), "miss_rate": float(1 - nok[types == t].mean())}
                for t in sorted(set(types[labels == 1].tolist()))}
    print(json.dumps({"checkpoint": args.checkpoint, "calibration": cal,
                      "good_images": int((labels == 0).sum()), "defective_images": int((labels == 1).sum()),
                      "false_alarm_rate": float(nok[labels == 0].mean()),
                      "miss_rate": float(1 - nok[labels == 1].mean()), "miss_rate_per_type": per_type}, indent=2))


if __name__ == "__main__":
    main()
