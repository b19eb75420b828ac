"""Tests for the embedded synthetic dataset (nferd.data.synth)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nferd.data.datasets import MVTecDataset, discover_categories
from nferd.data.synth import (
    DEFAULT_CATEGORY,
    DEFECT_TYPES,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    render_sample,
)

SMALL = dict(n_train=3, n_test_good=2, n_test_per_defect=2, image_size=64)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", seed=0, **SMALL)


def test_layout_and_counts(small: Path) -> None:
    assert small.name == DEFAULT_CATEGORY
    assert DEFECT_TYPES == ("scratch", "spot", "crack")
    assert len(list((small / "train" / "good").glob("*.png"))) == 3
    assert len(list((small / "test" / "good").glob("*.png"))) == 2
    for d in DEFECT_TYPES:
        images = sorted(p.stem for p in (small / "test" / d).glob("*.png"))
        masks = sorted(p.stem for p in (small / "ground_truth" / d).glob("*.png"))
        assert images == ["000", "001"] and masks == ["000_mask", "001_mask"]
    assert "CC0" in (small / "license.txt").read_text()
    assert "generated" in (small / "readme.txt").read_text()
    assert not any(p.name.startswith(".") for p in small.parent.iterdir())  # no temp leftovers


def test_same_seed_is_byte_identical_other_seed_differs(small: Path, tmp_path: Path) -> None:
    again = generate_synthetic_dataset(tmp_path / "again", seed=0, **SMALL)
    other = generate_synthetic_dataset(tmp_path / "other", seed=1, **SMALL)
    assert _hashes(again) == _hashes(small)
    h0, h1 = _hashes(small), _hashes(other)
    assert h0.keys() == h1.keys()
    images = [k for k in h0 if k.endswith(".png")]
    assert all(h0[k] != h1[k] for k in images)


def test_masks_are_binary_nonempty_and_match_the_drawn_defect(small: Path) -> None:
    for d in DEFECT_TYPES:
        for i in range(2):
            image = _read(small / "test" / d / f"{i:03d}.png")
            mask = _read(small / "ground_truth" / d / f"{i:03d}_mask.png")
            assert image.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) == {0, 255}
            area = (mask > 0).mean()
            assert 0.002 < area < 0.25, (d, i, area)  # visible but small
            ys, xs = np.nonzero(mask)
            assert 0 <= ys.min() and ys.max() < 64 and 0 <= xs.min() and xs.max() < 64


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_changes_pixels_only_around_the_mask(defect: str) -> None:
    stream = 2 + DEFECT_TYPES.index(defect)
    for index in range(3):
        clean, empty = render_sample(0, index, None, 128, stream)
        bad, mask = render_sample(0, index, defect, 128, stream)
        assert empty.sum() == 0
        diff = np.abs(bad.astype(np.int16) - clean.astype(np.int16)).max(axis=2)
        inside = mask > 0
        # Visible: a clear mean change inside the mask ...
        assert diff[inside].mean() > 25, (defect, index, diff[inside].mean())
        # ... and nothing changes far from it (only the antialiased rim).
        near = np.zeros_like(inside)
        ys, xs = np.nonzero(inside)
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                near[np.clip(ys + dy, 0, 127), np.clip(xs + dx, 0, 127)] = True
        assert diff[~near].max() == 0


def test_normal_images_vary(small: Path) -> None:
    a, b = (_read(small / "train" / "good" / f"{i:03d}.png").astype(float) for i in (0, 1))
    assert np.abs(a - b).mean() > 2


def test_loads_with_mvtec_dataset(small: Path) -> None:
    root = small.parent
    assert discover_categories(root) == [DEFAULT_CATEGORY]
    train = MVTecDataset(root, DEFAULT_CATEGORY, "train", image_size=32)
    test = MVTecDataset(root, DEFAULT_CATEGORY, "test", image_size=32)
    assert len(train) == 3 and len(test) == 2 + 3 * 2 and test.has_masks
    assert test.labels == [0, 0] + [1] * 6
    assert sorted(set(test.defect_types)) == sorted({"good", *DEFECT_TYPES})
    for i in range(len(test)):
        item = test[i]
        assert item["image"].shape == (3, 32, 32)
        assert (item["mask"].sum() > 0) == bool(item["label"])


def test_overwrite_rules_and_ensure(tmp_path: Path) -> None:
    target = generate_synthetic_dataset(tmp_path, seed=0, **{**SMALL, "n_train": 5})
    generate_synthetic_dataset(tmp_path, seed=0, **SMALL)  # replaces its own output: no stale files
    assert len(list((target / "train" / "good").iterdir())) == 3

    stamp = (target / "readme.txt").stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path, seed=0, **SMALL) == target
    assert (target / "readme.txt").stat().st_mtime_ns == stamp  # reused, not regenerated
    ensure_synthetic_dataset(tmp_path, seed=0, **{**SMALL, "n_test_good": 1})
    assert len(list((target / "test" / "good").iterdir())) == 1

    user = tmp_path / "mine"
    user.mkdir()
    (user / "important.png").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="mine"):
        generate_synthetic_dataset(tmp_path, category="mine", **SMALL)
    assert (user / "important.png").read_bytes() == b"user data"


def test_default_counts_and_size(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path)
    assert len(list((root / "train" / "good").glob("*.png"))) == 60
    assert len(list((root / "test" / "good").glob("*.png"))) == 12
    assert all(len(list((root / "test" / d).glob("*.png"))) == 8 for d in DEFECT_TYPES)
    assert _read(root / "train" / "good" / "000.png").shape == (256, 256, 3)
