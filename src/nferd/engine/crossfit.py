"""Scores of the training images themselves from models that never saw them, for small data sets.

With 20 good images a 10 % hold-out is 2 images: a threshold (and a standardisation) fitted on
them is a lottery. Cross-fitting gives every training image a score that is as honest as a new
good part's: the images are split into K seeded folds, and K extra students (each with its own
memory) are trained without one fold and score that fold. A model without a student needs no
extra training: its memory scores each training image with that image's own rows left out.
The deployed model is still the one trained on every image; the fold models are a little weaker
(trained on (K - 1) / K of the images), so their scores err towards a higher threshold.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import safe_io, scoring
from .device import autocast_dtype, place

CROSS_FIT_BELOW = 20  # fewer held-out good images than this: cross-fit (when the training set allows K folds)
FOLDS = 5
FOLD_DIR = "folds"


def fold_indices(n: int, k: int, seed: int) -> list[list[int]]:
    """``k`` seeded, disjoint, nearly equal folds of ``range(n)``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1299709)).tolist()
    return [sorted(perm[i::k]) for i in range(k)]


def fold_file(out: Path, k: int) -> Path:
    return Path(out) / FOLD_DIR / f"fold{k}.safetensors"


def train_folds(model: Any, train_set: Dataset, config: Any, out: Path, trainer: Any,
                take_from: Path | None = None) -> list[tuple[Any, list[int]]]:
    """K fold models of ``model``'s design (sharing its frozen teacher), each trained on the training
    images outside its fold by ``trainer`` (``engine.train.Trainer``), with the fold's indices. Fold
    students are saved under ``out/folds`` (and taken from ``take_from/folds`` when a run with the
    same student saved them)."""
    from safetensors.torch import load_file, save_file

    from ..models.nferd import NFERD
    folds = fold_indices(len(train_set), FOLDS, config.seed)
    quiet = dataclasses.replace(config, checkpoint_every=10**9)
    found = []
    for k, fold in enumerate(folds):
        torch.manual_seed(config.seed * 1009 + k)  # each fold's student starts from its own seeded weights
        fm = NFERD(model.config, teacher=model.teacher)
        keep = sorted(set(range(len(train_set))) - set(fold))
        with tempfile.TemporaryDirectory() as tmp:
            run = trainer(fm, Subset(train_set, keep), quiet, tmp, progress=False, distributed=False)
            saved = fold_file(take_from, k) if take_from is not None else None
            if fm.ocbe is not None and saved is not None and saved.is_file():
                fm.load_state_dict(load_file(str(saved)), strict=False)
                run.student_from = saved
            run.prepare()  # the fold's own bank and memory
            if fm.ocbe is not None and run.student_from is None:
                for epoch in range(config.epochs):
                    run.train_epoch(epoch)
                target = fold_file(out, k)
                target.parent.mkdir(parents=True, exist_ok=True)
                with safe_io.staged(target) as tmp_file:
                    save_file({n: t.detach().contiguous().cpu() for n, t in fm.state_dict().items()
                               if n.split(".")[0] in ("ocbe", "decoder")}, str(tmp_file))
        found.append((fm.eval(), fold))
    return found


@torch.no_grad()
def left_out_results(model: Any, dataset: Dataset, device: torch.device, precision: str = "auto",
                     batch_size: int = 16) -> dict[str, Any]:
    """Scores and maps of the training images ``dataset`` (in the memory's order), each scored with its
    own memory rows left out: what :func:`nferd.engine.evaluate.infer` returns for unseen images."""
    amp = autocast_dtype(device, precision)
    model = place(model.eval(), device)
    scores, maps, paths, start = [], [], [], 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        ids = torch.arange(start, start + len(batch["image"]), device=device)
        start += len(ids)
        m, sc = scoring.score_batch(model, batch["image"], device, amp, exclude=ids)
        maps.append(m)
        scores.append(sc)
        paths += list(batch["path"])
    n = len(paths)
    return {"scores": np.concatenate(scores), "maps": np.concatenate(maps), "labels": np.zeros(n, dtype=np.int64),
            "masks": np.zeros((n, 1, 1), dtype=np.uint8), "paths": paths}


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Inference results of several image sets as one (scores, maps, labels, paths)."""
    return {"scores": np.concatenate([p["scores"] for p in parts]), "maps": np.concatenate([p["maps"] for p in parts]),
            "labels": np.concatenate([p["labels"] for p in parts]), "paths": [q for p in parts for q in p["paths"]],
            "masks": None}
