"""Retrieval health of the normal feature banks: does the bank recall per image, or act as a template?

A bank is doing its job only if (1) the similarities it ranks are spread out, (2) its weights
are not uniform, (3) different images recall different maps, and (4) replacing the bank by
random maps, or zeroing it, costs accuracy. This module measures all four.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .device import autocast, autocast_dtype, resolve_device
from .evaluate import evaluate
from .model import NFERD


@torch.no_grad()
def retrieval_stats(model: NFERD, dataset: Dataset, batch_size: int = 16, device: str = "auto",
                    precision: str = "auto") -> list[dict[str, Any]]:
    """Per bank: similarity spread, top-K gap, normalised weight entropy, top-1 diversity."""
    if not model.config.bank:
        raise ValueError("this model has no bank (trained with --bank off): nothing to diagnose")
    dev = resolve_device(device)
    amp = autocast_dtype(dev, precision)
    model.eval().to(dev)
    sims: list[list[np.ndarray]] = [[], [], []]
    idxs: list[list[np.ndarray]] = [[], [], []]
    ws: list[list[np.ndarray]] = [[], [], []]
    for batch in DataLoader(dataset, batch_size=batch_size):
        with autocast(dev, amp):
            model(batch["image"].to(dev))
        for i, r in enumerate(model.last_recalls):
            if r is None:  # a stage without a bank (--bank-stages)
                continue
            sims[i].append(r.similarity.float().cpu().numpy())
            idxs[i].append(r.indices.cpu().numpy())
            ws[i].append(r.weights.float().cpu().numpy())
    stages = ["layer1", "layer2", "layer3"]
    out = []
    for key, bank in model.banks.items():
        i = int(key)
        s, ix, w = np.concatenate(sims[i]), np.concatenate(idxs[i]), np.concatenate(ws[i])
        out.append(_patch_stats(s, ix, w) if s.ndim == 3 else _image_stats(s, ix, w))
        out[-1] = {"bank": stages[i], "n_bank": int(bank.size), "granularity": bank.granularity, **out[-1]}
    return out


def _entropy(w: np.ndarray) -> np.ndarray:
    k = w.shape[-1]
    if k == 1:
        return np.zeros(w.shape[:-1])
    return -(w * np.log(np.clip(w, 1e-12, None))).sum(-1) / np.log(k)


def _image_stats(s: np.ndarray, ix: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    """Whole-map recall: S is B x N over the bank images."""
    k = w.shape[1]
    top1 = Counter(ix[:, 0].tolist())
    return {
        "top_k": int(k),
        "similarity_mean": float(s.mean()), "similarity_min": float(s.min()), "similarity_max": float(s.max()),
        "similarity_spread_per_image": float((s.max(1) - s.min(1)).mean()),
        "topk_gap": float((np.sort(s, 1)[:, -1] - np.sort(s, 1)[:, -k]).mean()),
        "weight_entropy": float(_entropy(w).mean()),
        "top1_max_weight": float(w[:, 0].mean()),
        "top1_distinct": len(top1), "top1_most_common_share": top1.most_common(1)[0][1] / len(ix),
    }


def _patch_stats(s: np.ndarray, ix: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    """Patch recall: B x HW x K kept similarities and the bank image of each recalled position.

    Spread is over the positions of one image (how much the best match varies across it);
    ``sources_per_image`` counts the bank images whose positions are top-1 somewhere in it.
    """
    k = w.shape[-1]
    top1 = Counter(ix[..., 0].ravel().tolist())
    return {
        "top_k": int(k),
        "similarity_mean": float(s[..., 0].mean()), "similarity_min": float(s[..., 0].min()),
        "similarity_max": float(s[..., 0].max()),
        "similarity_spread_per_image": float((s[..., 0].max(1) - s[..., 0].min(1)).mean()),
        "topk_gap": float((s[..., 0] - s[..., -1]).mean()),
        "weight_entropy": float(_entropy(w).mean()),
        "top1_max_weight": float(w[..., 0].mean()),
        "top1_distinct": len(top1), "top1_most_common_share": top1.most_common(1)[0][1] / ix[..., 0].size,
        "sources_per_image": float(np.mean([len(np.unique(row)) for row in ix[..., 0]])),
    }


def with_bank(model: NFERD, mode: str, seed: int = 0) -> NFERD:
    """A copy of ``model`` whose bank maps are replaced: 'random' (Gaussian with each channel's
    mean and std), 'zero', or 'mean' (every slot holds the bank's mean map)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for bank in m.banks.values():
        maps = bank.maps
        if mode == "zero":
            new = torch.zeros_like(maps)
        elif mode == "mean":
            new = maps.mean(0, keepdim=True).expand_as(maps).clone()
        elif mode == "random":
            mu = maps.mean(dim=(0, 2, 3), keepdim=True)
            sd = maps.std(dim=(0, 2, 3), keepdim=True)
            new = mu + sd * torch.randn(maps.shape, generator=g).to(maps.device)
        else:
            raise ValueError(f"unknown bank replacement '{mode}'")
        bank.maps.copy_(new)
        bank._cached_proj = None
    return m


def diagnose(model: NFERD, test_set: Dataset, **kw: Any) -> dict[str, Any]:
    """Retrieval statistics plus metrics with the real, random, mean and zeroed bank."""
    report: dict[str, Any] = {"retrieval": retrieval_stats(model, test_set, **kw)}
    metrics = {}
    for name in ("bank", "random", "mean", "zero"):
        m = model if name == "bank" else with_bank(model, name)
        met, _ = evaluate(m, test_set, **kw)
        metrics[name] = {k: met[k] for k in ("image_auroc", "pixel_auroc", "aupro") if k in met}
    report["metrics"] = metrics
    return report
