"""Retrieval health of the normal feature banks: does the bank recall per image, or act as a template?

A fused bank is doing its job only if (1) the similarities it ranks are spread out, (2) its weights
are not uniform, (3) different images recall different maps, and (4) replacing the bank by
random maps, or zeroing it, costs accuracy. This module measures all four, and two things that
say where a bank helps or hurts localisation: each stage's map scored alone, and how many
positions inside ground-truth defects find a bank match as close as a normal position's (those
get nearly their own features back, so the student can rebuild the defect). A bank that only
scores (the default, ``fusion="none"``) has no recall to rank: its report is the top-1 similarity
and the defect-matched share (positions where it finds no evidence), and the stage report adds
the student's map and the bank's distance map, each alone.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..engine.device import autocast, autocast_dtype, resolve_device
from ..engine.evaluate import evaluate
from ..metrics import aupro, auroc
from ..models.anomaly_map import anomaly_map
from ..models.nferd import NFERD

STAGES = ("layer1", "layer2", "layer3")


def _has_masks(dataset: Dataset) -> bool:
    return getattr(dataset, "has_masks", True)


def _require_bank(model: NFERD) -> None:
    if not model.config.bank:
        raise ValueError("this model has no bank (trained with --bank off): nothing to diagnose")


@dataclass
class _TestPass:
    """What one forward pass over a test set leaves for the reports below."""

    normal_image: np.ndarray  # B: label 0
    recalls: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)  # per bank
    defect: dict[int, np.ndarray] = field(default_factory=dict)  # patch banks: positions touching a defect
    stage_maps: dict[str, np.ndarray] = field(default_factory=dict)  # layer1..3 alone, the model's map, ...
    masks: np.ndarray | None = None


@torch.no_grad()
def _test_pass(model: NFERD, dataset: Dataset, recalls: bool, stages: bool, batch_size: int = 16,
               device: str = "auto", precision: str = "auto") -> _TestPass:
    """One pass of ``model`` over ``dataset``, keeping the recalls and / or each stage's map:
    ``diagnose`` reads both from a single pass."""
    dev = resolve_device(device)
    amp = autocast_dtype(dev, precision)
    model.eval().to(dev)
    sims: dict[int, list[np.ndarray]] = {int(i): [] for i in model.banks}
    idxs: dict[int, list[np.ndarray]] = {int(i): [] for i in model.banks}
    ws: dict[int, list[np.ndarray]] = {int(i): [] for i in model.banks}
    defect: dict[int, list[np.ndarray]] = {int(i): [] for i in model.banks}
    scoring = model.config.fusion == "none"  # the banks are searched for the map, never recalled
    terms = ("student", "bank distance") if model.config.bank_distance_weight > 0 else ()
    maps: dict[str, list[np.ndarray]] = {name: [] for name in (*STAGES, "model", *terms)}
    masks, normal_img = [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        images = batch["image"].to(dev)
        with autocast(dev, amp):
            t, s = model(images)
        normal_img.append(np.asarray(batch["label"]) == 0)
        if stages:
            size = tuple(images.shape[-2:])
            found = {name: anomaly_map([t[i]], [s[i]], size) for i, name in enumerate(STAGES)}
            if terms:
                found.update({"student": anomaly_map(t, s, size), "bank distance": model.bank_distance(t, size)})
            for name, m in found.items():  # each alone, blurred like the model's own map
                maps[name].append(model.blur(m)[:, 0].float().cpu().numpy())
            maps["model"].append(model.anomaly_maps(t, s, size)[0][:, 0].float().cpu().numpy())
            masks.append((batch["mask"][:, 0] > 0.5).numpy())
        if not recalls:
            continue
        for i, r in enumerate(model.last_recalls):
            if scoring and str(i) in model.banks:  # the top-1 similarity the map's distance came from
                top1 = 1 - model.banks[str(i)].nearest_distance(t[i]).flatten(1)
                sims[i].append(top1.unsqueeze(-1).cpu().numpy())
            elif r is None:  # a stage without a bank (--bank-stages)
                continue
            else:
                sims[i].append(r.similarity.float().cpu().numpy())
                idxs[i].append(r.indices.cpu().numpy())
                ws[i].append(r.weights.float().cpu().numpy())
            if (scoring or r.similarity.ndim == 3) and _has_masks(dataset):  # per-position banks
                grid = model.banks[str(i)].out_size
                defect[i].append((F.adaptive_max_pool2d(batch["mask"].float(), grid) > 0.5).flatten(1).numpy())
    out = _TestPass(np.concatenate(normal_img))
    if recalls:
        out.recalls = {i: (np.concatenate(sims[i]), np.concatenate(idxs[i]) if idxs[i] else None,
                           np.concatenate(ws[i]) if ws[i] else None) for i in sims}
        out.defect = {i: np.concatenate(d) for i, d in defect.items() if d}
    if stages:
        out.stage_maps = {name: np.concatenate(m) for name, m in maps.items()}
        out.masks = np.concatenate(masks)
    return out


def _retrieval_report(model: NFERD, run: _TestPass) -> list[dict[str, Any]]:
    out = []
    for key, bank in model.banks.items():
        i = int(key)
        s, ix, w = run.recalls[i]
        if ix is None:  # a bank that only scores: its nearest match, no recall
            out.append({"top1_similarity_mean": float(s.mean()), "top1_similarity_std": float(s.std())})
        else:
            out.append(_patch_stats(s, ix, w) if s.ndim == 3 else _image_stats(s, ix, w))
        if i in run.defect:
            out[-1]["defect_matched_share"] = defect_matched_share(s[..., 0], run.defect[i], run.normal_image)
        out[-1] = {"bank": STAGES[i], "n_bank": int(bank.size),
                   "recall": bank.recall if ix is not None else "none (scores the map)", **out[-1]}
    return out


def _stage_report(run: _TestPass) -> dict[str, dict[str, float]]:
    gt = run.masks
    return {name: {"pixel_auroc": float(auroc(m.ravel(), gt.ravel())), "aupro": float(aupro(m, gt))}
            for name, m in run.stage_maps.items()}


def retrieval_stats(model: NFERD, dataset: Dataset, **kw: Any) -> list[dict[str, Any]]:
    """Per bank: similarity spread, top-K gap, normalised weight entropy, top-1 diversity, and
    (patch banks, with masks) the share of defect positions matched as closely as normal ones."""
    _require_bank(model)
    return _retrieval_report(model, _test_pass(model, dataset, recalls=True, stages=False, **kw))


def defect_matched_share(top1: np.ndarray, in_defect: np.ndarray, normal_image: np.ndarray,
                         quantile: float = 0.01) -> float:
    """Share of defect positions whose best bank match is at least as close as 99 % of the
    positions of normal test images are (top-1 cosine >= their 1st percentile): there the
    recall hands the student nearly the defect's own features. NaN without defects or normals."""
    d, n = top1[in_defect], top1[normal_image]
    if d.size == 0 or n.size == 0:
        return float("nan")
    return float((d >= np.quantile(n, quantile)).mean())


def stage_localisation(model: NFERD, dataset: Dataset, **kw: Any) -> dict[str, dict[str, float]]:
    """Pixel AUROC and AUPRO of each stage's map alone (upsampled and blurred like the model's
    map), and of the model's own map: which stage localises, and which one a bank changes. Works
    for any model, RD4AD too, so the two can be compared stage by stage."""
    if not _has_masks(dataset):
        raise ValueError("stage localisation needs ground-truth masks; this test set has none")
    return _stage_report(_test_pass(model, dataset, recalls=False, stages=True, **kw))


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
        bank.reset()
    return m


def diagnose(model: NFERD, test_set: Dataset, **kw: Any) -> dict[str, Any]:
    """Retrieval statistics plus metrics with the real, random, mean and zeroed bank."""
    _require_bank(model)
    run = _test_pass(model, test_set, recalls=True, stages=_has_masks(test_set), **kw)
    report: dict[str, Any] = {"retrieval": _retrieval_report(model, run)}
    if _has_masks(test_set):
        report["stages"] = _stage_report(run)
    metrics = {}
    for name in ("bank", "random", "mean", "zero"):
        m = model if name == "bank" else with_bank(model, name)
        met, _ = evaluate(m, test_set, **kw)
        metrics[name] = {k: met[k] for k in ("image_auroc", "pixel_auroc", "aupro") if k in met}
    report["metrics"] = metrics
    return report
