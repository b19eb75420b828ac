"""Which good images a run trains on, calibrates on, and puts in its banks: seeded, so a run
and every later command that rebuilds its split (INT8 statistics, benchmarks) agree."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from ..errors import OptionError, option


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of n training indices into (train, held-out normal for calibration)."""
    if fraction <= 0:
        return list(range(n)), []
    k = max(2, int(round(n * fraction)))
    if n - k < 2:
        raise OptionError(f"only {n} training images: too few to hold out {fraction:.0%} for calibration; "
                          f"use {option('holdout')} 0 and a validation folder")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def training_split(train_set: Dataset, holdout: float, seed: int,
                   calibration_set: Dataset | None = None) -> tuple[Dataset, Dataset | None]:
    """The images a run trains on and the ones it calibrates on: ``calibration_set`` (a validation
    split) when there is one, else ``holdout`` of ``train_set`` kept out (seeded, ``split_holdout``)."""
    if calibration_set is None and holdout > 0:
        keep, held = split_holdout(len(train_set), holdout, seed)
        return Subset(train_set, keep), Subset(train_set, held)
    return train_set, calibration_set


def held_out_normals(root: str | Path, category: str, image_size: int, seed: int, holdout: float) -> Dataset:
    """The good images a run of ``seed`` calibrated and standardised its map on: the dataset's
    ``validation/good``, or the ``holdout`` part of the training images its training kept out."""
    from ..data.datasets import make_dataset
    if (Path(root) / category / "validation" / "good").is_dir():
        return make_dataset("auto", root, category, "validation", image_size)
    train = make_dataset("auto", root, category, "train", image_size)
    return Subset(train, split_holdout(len(train), holdout, seed)[1])


def bank_indices(n_train: int, n_bank: int, seed: int) -> torch.Tensor:
    """The N normal images whose teacher maps fill the banks (seeded, as the paper draws them)."""
    if n_bank > n_train:
        raise OptionError(f"{option('n_bank')} {n_bank} is larger than the {n_train} training images; "
                          f"lower {option('n_bank')}")
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 104729))[:n_bank].sort().values
