"""The scores users see do not move by accident: a checkpoint trained from a fixed seed gives the
maps, scores, thresholds and OK/NOK decisions recorded in ``tests/data/golden_scores.json``,
through evaluation and through the predictor of the saved checkpoint alike.

A change meant to move them (a new default, a better map) updates the file on purpose:
``NFERD_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_scores.py``, and says so in the
change log. The tolerances absorb the arithmetic of other CPUs (AVX2 / AVX-512 kernels differ in
the last bits), not a change of the method.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nferd.data.datasets import MVTecDataset
from nferd.data.synth import DEFAULT_CATEGORY, generate_synthetic_dataset
from nferd.deploy.predict import Predictor
from nferd.engine.evaluate import infer
from nferd.engine.runs import DataSpec, train_categories
from nferd.engine.train import TrainConfig
from nferd.models.nferd import ModelConfig

GOLDEN = Path(__file__).parent / "data" / "golden_scores.json"
UPDATE = os.environ.get("NFERD_UPDATE_GOLDEN") == "1"
BLOCK = 8  # maps are compared as 8 x 8 block means (64 values an image)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The default design at 64 px, trained one epoch from seed 0 on one thread, saved."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("golden")
    generate_synthetic_dataset(root, seed=3, n_train=12, n_test_good=3, n_test_per_defect=2, image_size=64)
    torch.manual_seed(0)
    design = ModelConfig.preset("nferd", image_size=64, n_bank=4, top_k=2)
    recipe = TrainConfig(epochs=1, batch_size=4, holdout=0.25, device="cpu", precision="fp32", threads=1)
    (run,) = train_categories(DataSpec(str(root), DEFAULT_CATEGORY), design, recipe, root / "ckpt")
    return root, run.out


def _blocks(maps: np.ndarray) -> np.ndarray:
    n, h, w = maps.shape
    return maps.reshape(n, h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(2, 4)).reshape(n, -1)


def _observed(root: Path, ckpt: Path) -> dict:
    pred = Predictor.from_checkpoint(ckpt, device="cpu", precision="fp32")
    test = MVTecDataset(root, DEFAULT_CATEGORY, "test", 64)
    res = infer(pred.model, test, device="cpu", precision="fp32")
    rows = list(pred.predict_paths([s.path for s in test.samples]))
    maps, scores = pred.maps(torch.stack([torch.from_numpy(np.asarray(test[i]["image"])) for i in range(len(test))]))
    np.testing.assert_allclose(scores, res["scores"], rtol=1e-5)  # evaluation and the predictor agree
    np.testing.assert_allclose(maps, res["maps"], rtol=1e-4, atol=1e-6)
    cal = pred.calibration
    return {"images": [Path(s.path).relative_to(root).as_posix() for s in test.samples],
            "scores": [float(r["score"]) for r in rows], "decisions": [r["decision"] for r in rows],
            "image_threshold": cal.image_threshold, "pixel_threshold": cal.pixel_threshold,
            "map_blocks": _blocks(np.asarray(res["maps"], dtype=np.float64)).round(7).tolist()}


@pytest.mark.filterwarnings("ignore:.*too few to keep the false-alarm rate")
def test_a_saved_checkpoint_scores_as_recorded(saved: tuple[Path, Path]) -> None:
    got = _observed(*saved)
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"golden scores written to {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert got["images"] == want["images"]
    np.testing.assert_allclose(got["image_threshold"], want["image_threshold"], rtol=2e-3)
    np.testing.assert_allclose(got["pixel_threshold"], want["pixel_threshold"], rtol=2e-3)
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=2e-3)
    blocks, expected = np.asarray(got["map_blocks"]), np.asarray(want["map_blocks"])
    np.testing.assert_allclose(blocks, expected, rtol=2e-3, atol=1e-3 * float(np.abs(expected).max()))
    # a decision may only differ where the score sits on the threshold itself
    for score, ours, theirs in zip(got["scores"], got["decisions"], want["decisions"], strict=True):
        assert ours == theirs or abs(score - want["image_threshold"]) < 2e-3 * abs(want["image_threshold"])
    assert "NOK" in want["decisions"] and "OK" in want["decisions"]  # the record holds both outcomes
