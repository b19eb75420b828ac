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


@pytest.fixture(scope="session")
def tiny_checkpoint(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model at 64 px, trained one epoch on ``synth_root`` by `nferd train` (with its
    calibration and recorded data); shared, so tests only read it."""
    from nferd.cli.main import main
    ckpt = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert main(["train", "--data", str(synth_root), "--category", "synthetic_tiles", "--image-size", "64",
                 "--epochs", "1", "--n-bank", "4", "--top-k", "2", "--batch-size", "4", "--holdout", "0.2",
                 "--out", str(ckpt)]) == 0
    return ckpt
