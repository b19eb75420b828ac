"""Shared fixtures. Tests that need ../shared (licensed data and weights) skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available (../shared is only on the developers' machines)")
    return p


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic MVTec-layout dataset (generated once per session)."""
    from nferd.data.synth import generate_synthetic_dataset
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(root, seed=0, n_train=12, n_test_good=3, n_test_per_defect=2, image_size=64)
    return root
