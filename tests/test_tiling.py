"""Tiling: the grid covers the image, the stitch is a weighted average that reproduces a map the
tiles agree on, tiles carry their masks, and a model trained on tiles scores full-resolution
images through every backend with the same maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nferd.data.tiles import TiledDataset, Tiling


def predict(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and scores through the one scoring path, as tensors."""
    from nferd.engine.scoring import score_batch
    return tuple(torch.from_numpy(a) for a in score_batch(model, images))  # type: ignore[return-value]



def test_the_grid_covers_every_pixel_with_the_asked_overlap() -> None:
    t = Tiling(64, 0.25)
    assert t.starts(64) == [0] and t.starts(40) == [0]
    assert t.starts(200) == [0, 48, 96, 136]  # step 48, the last tile flush with the edge
    cover = torch.zeros(150, 200)
    for y, x in t.grid(150, 200):
        cover[y:y + 64, x:x + 64] += 1
    assert bool((cover >= 1).all())
    with pytest.raises(ValueError, match="multiple of 32"):
        Tiling(100)
    with pytest.raises(ValueError, match="overlap"):
        Tiling(64, 0.9)


def test_stitching_tiles_of_one_map_gives_that_map_back() -> None:
    """Cut a smooth 'map' into tiles, stitch them: every position is a weighted mean of the same
    value, so the map comes back exactly; a tile that differs only moves the pixels it covers."""
    t = Tiling(64, 0.5)
    h, w = 100, 170
    truth = torch.linspace(0, 1, h)[:, None] * torch.linspace(1, 2, w)[None, :]
    tiles = t.cut(truth[None])[:, 0]
    assert torch.allclose(t.stitch(tiles, h, w), truth, atol=1e-6)
    changed = tiles.clone()
    changed[0] += 10.0  # the top-left tile only
    out = t.stitch(changed, h, w)
    assert bool((out[:64, :64] > truth[:64, :64] + 1e-3).all())  # it counts wherever it covers
    assert float((out[:16, :16] - truth[:16, :16]).min()) == pytest.approx(10.0, abs=1e-4)  # alone there
    assert torch.allclose(out[64:, :], truth[64:, :]) and torch.allclose(out[:, 64:], truth[:, 64:])


def test_an_image_smaller_than_a_tile_is_padded_and_cropped_back() -> None:
    t = Tiling(64)
    image = torch.rand(3, 40, 50)
    tiles = t.cut(image)
    assert tiles.shape == (1, 3, 64, 64) and torch.equal(tiles[0, :, :40, :50], image)
    stitched, score = t.score(image, lambda x: x[:, 0] * 2)
    assert stitched.shape == (40, 50) and torch.allclose(stitched, image[0] * 2) and score == float(stitched.max())


def test_a_tiled_dataset_gives_each_tile_its_mask_and_label() -> None:
    image = torch.rand(3, 128, 192)
    mask = torch.zeros(1, 128, 192)
    mask[0, 10:20, 150:160] = 1  # a small defect in the top-right tile only

    class One(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> dict:
            return {"image": image, "mask": mask, "label": 1, "path": "a.png", "defect_type": "spot"}

    ds = TiledDataset(One(), Tiling(64, 0.0))
    assert len(ds) == 6
    labels = [ds[k]["label"] for k in range(len(ds))]
    assert labels == [0, 0, 1, 0, 0, 0]
    assert torch.equal(ds[2]["image"], image[:, :64, 128:192]) and ds[2]["mask"].sum() == 100


# ----------------------------------------------------------------- a model trained on tiles

HIRES = "synthetic_hires"


@pytest.fixture(scope="module")
def hires(tmp_path_factory) -> Path:
    """128-px images whose weave and defects are drawn at the scale of 64-px ones."""
    from nferd.data.synth import generate_synthetic_dataset
    root = tmp_path_factory.mktemp("hires")
    generate_synthetic_dataset(root, category=HIRES, n_train=10, n_test_good=3, n_test_per_defect=2,
                               image_size=128, feature_size=64)
    return root


@pytest.fixture(scope="module")
def tiled(hires, tmp_path_factory) -> Path:
    from nferd.cli.main import main
    out = tmp_path_factory.mktemp("tiled") / "ckpt"
    assert main(["train", "--data", str(hires), "--category", HIRES, "--tile", "64", "--tile-overlap", "0.25",
                 "--epochs", "1", "--n-bank", "8", "--top-k", "2", "--batch-size", "8", "--holdout", "0.2",
                 "--device", "cpu", "--out", str(out)]) == 0
    return out


def _by_hand(model, image: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """The stitched map computed here from the model's own map of each tile."""
    model.eval()
    with torch.no_grad():
        tiles = tiling.cut(image)
        maps = predict(model, tiles)[0]
    return tiling.stitch(maps, *image.shape[-2:])


def test_training_on_tiles_records_the_tiling_and_calibrates_on_whole_images(tiled) -> None:
    from nferd import load_checkpoint
    model, meta = load_checkpoint(tiled)
    assert model.config.image_size == 64 and meta["tiling"] == {"size": 64, "overlap": 0.25}
    assert meta["calibration"]["n_images"] == 2  # the 2 held-out images, not their 18 tiles


def test_a_tiled_model_predicts_full_resolution_maps_stitched_from_its_tiles(tiled, hires) -> None:
    from nferd import load_checkpoint
    from nferd.data.images import load_image
    from nferd.deploy.predict import Predictor
    pred = Predictor.from_checkpoint(tiled, device="cpu", precision="fp32")
    assert pred.tiling == Tiling(64, 0.25)
    paths = sorted((hires / HIRES / "test").rglob("*.png"))[:3]
    rows = list(pred.predict_paths(paths))
    model, _ = load_checkpoint(tiled)
    for path, row in zip(paths, rows):
        assert row["map"].shape == (128, 128) and row["decision"] in ("OK", "NOK")
        want = _by_hand(model, load_image(path), pred.tiling)
        assert np.abs(row["map"] - want.numpy()).max() < 1e-4 * float(want.max() - want.min())
        assert row["score"] == pytest.approx(float(want.max()), rel=1e-5)


def test_test_export_and_serve_use_the_recorded_tiling(tiled, hires, tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    import json

    from nferd.cli.main import main
    from nferd.deploy.onnx_runtime import OnnxPredictor
    from nferd.deploy.predict import Predictor
    assert main(["test", "--checkpoint", str(tiled), "--data", str(hires), "--category", HIRES,
                 "--out", str(tmp_path / "test"), "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "test" / "results.json").read_text())
    assert results["categories"][HIRES]["n_images"] == 9  # whole images, scored at 128 px
    onnx = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(tiled), "--out", str(onnx)]) == 0
    ort, torch_pred = OnnxPredictor.from_file(onnx), Predictor.from_checkpoint(tiled, device="cpu", precision="fp32")
    assert ort.tiling == torch_pred.tiling == Tiling(64, 0.25)
    path = sorted((hires / HIRES / "test").rglob("*.png"))[0]
    a, b = next(ort.predict_paths([path])), next(torch_pred.predict_paths([path]))
    assert a["map"].shape == (128, 128) and np.abs(a["map"] - b["map"]).max() <= 1e-3 * np.ptp(b["map"])
    assert main(["export", "--checkpoint", str(tiled), "--preprocess", "--out", str(tmp_path / "p.onnx")]) != 0
    assert "drop --preprocess" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tiled), "--tile", "96", str(path), "--out", str(tmp_path / "x")]) != 0
    assert "model's input, which is 64 px" in capsys.readouterr().err


def test_the_service_scores_a_full_resolution_upload_tile_by_tile(tiled, hires) -> None:
    pytest.importorskip("fastapi")
    import httpx

    from nferd.deploy.predict import Predictor
    from nferd.deploy.serve import create_app
    from nferd.engine.checkpoint import read_metadata
    from tests.test_serve import serve_in_thread
    pred = Predictor.from_checkpoint(tiled, device="cpu", precision="fp32")
    path = sorted((hires / HIRES / "test").rglob("*.png"))[-1]
    want = next(pred.predict_paths([path]))
    with serve_in_thread(create_app(pred, read_metadata(tiled), warmup=False)) as url:
        with path.open("rb") as f:
            r = httpx.post(f"{url}/predict", files={"file": (path.name, f, "image/png")}, timeout=60)
        meta = httpx.get(f"{url}/metadata", timeout=10).json()
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["image"]["width"] == 128 and res["score"] == pytest.approx(want["score"], rel=1e-5)
    assert res["decision"] == want["decision"] and meta["tiling"] == {"size": 64, "overlap": 0.25}
