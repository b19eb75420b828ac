"""Exploration: add the bank's own nearest-neighbour distance to the anomaly map (patch readings).

A patch reading (E, F) already finds, for every position of the input's teacher map, the most
similar normal bank position; 1 - that cosine is a PatchCore-like anomaly map that costs nothing
more. This script tests a trained E/F checkpoint with ``map = st + lam * bank`` (the bank map
rescaled to the student-teacher map's mean) for several ``lam``, and the bank map alone. It
changes no model: the result decides whether the term is worth a model option (see
docs/banks.md, "The bank's own distance as a map term").

    python scripts/bank_distance_map.py runs/tire-e200/E_n_bank=64_temperature=0.01 \
        --data ../shared/data/mvtec_3d_rgb_256 --category tire
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nferd.models.anomaly_map import anomaly_map, image_score
from nferd.engine.checkpoint import load_checkpoint
from nferd.data.datasets import make_dataset
from nferd.engine.device import autocast, autocast_dtype
from nferd.metrics import compute_metrics

KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--lams", type=float, nargs="+", default=[0, 0.25, 0.5, 1, 2, 4])
    args = ap.parse_args()

    model, _ = load_checkpoint(args.checkpoint)
    if model.config.granularity != "patch":
        raise SystemExit(f"'{args.checkpoint}' uses reading {model.config.reading}; this needs a patch reading (E, F)")
    ds = make_dataset("auto", args.data, args.category, "test", model.config.image_size)
    cpu = torch.device("cpu")
    amp = autocast_dtype(cpu, "auto")
    st, bank, labels, masks = [], [], [], []
    with torch.no_grad():
        for b in DataLoader(ds, batch_size=16):
            x = b["image"]
            with autocast(cpu, amp):
                t, s = model(x)
            size = tuple(x.shape[-2:])
            st.append(anomaly_map(t, s, size))
            total = 0
            for recall in model.last_recalls:  # similarity: B x HW x K, best first
                d = 1 - recall.similarity[..., 0].float()
                h = int(round(d.shape[1] ** 0.5))
                total = total + F.interpolate(d.view(-1, 1, h, h), size=size, mode="bilinear", align_corners=True)
            bank.append(total)
            labels.append(np.asarray(b["label"]))
            masks.append((b["mask"][:, 0] > 0.5).numpy().astype(np.uint8))
    st_map, bank_map = torch.cat(st), torch.cat(bank)
    labels, masks = np.concatenate(labels), np.concatenate(masks)
    scale = st_map.mean() / bank_map.mean()
    out = {}
    for name, m in [*((f"st+{lam:g}*bank", st_map + lam * scale * bank_map) for lam in args.lams),
                    ("bank only", bank_map)]:
        m = model.blur(m)
        met = compute_metrics(image_score(m).numpy(), labels, m[:, 0].numpy(), masks)
        out[name] = {k: round(float(met[k]), 4) for k in KEYS}
        print(name, out[name], flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
