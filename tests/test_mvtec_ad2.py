"""MVTec AD 2 end to end on a small generated set in its layout: the dataset, its metrics (SegF1 at
the validation threshold, AU-PRO up to FPR 0.05) against hand-computed cases, `nferd test`, and the
submission folder its evaluation server takes."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nferd.cli import main
from nferd.data.datasets import DatasetError, MVTecAD2Dataset, detect_format, make_dataset
from nferd.metrics import aupro, segmentation_f1, validation_threshold

CAT = "walnuts"


def ad2_layout(synth: Path, root: Path) -> Path:
    """The synthetic MVTec-layout set rearranged as MVTec AD 2: train/validation good, test_public
    good/bad with ground_truth/bad/<stem>_mask.png, and flat private splits of another image size."""
    src, cat = synth / "synthetic_tiles", root / CAT
    train = sorted((src / "train" / "good").glob("*.png"))
    for i, p in enumerate(train):
        split = "validation" if i % 4 == 0 else "train"
        (cat / split / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, cat / split / "good" / f"{i:03d}_regular.png")
    pub = cat / "test_public"
    (pub / "good").mkdir(parents=True)
    (pub / "bad").mkdir()
    (pub / "ground_truth" / "bad").mkdir(parents=True)
    for i, p in enumerate(sorted((src / "test" / "good").glob("*.png"))):
        shutil.copy(p, pub / "good" / f"{i:03d}_regular.png")
    bad = sorted(p for d in (src / "test").iterdir() if d.name != "good" for p in d.glob("*.png"))
    for i, p in enumerate(bad):
        shutil.copy(p, pub / "bad" / f"{i:03d}_regular.png")
        shutil.copy(src / "ground_truth" / p.parent.name / f"{p.stem}_mask.png",
                    pub / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png")
    for split, suffix in (("test_private", "regular"), ("test_private_mixed", "mixed")):
        (cat / split).mkdir()
        for i, p in enumerate([*bad[:2], *sorted((src / "test" / "good").glob("*.png"))[:1]]):
            with Image.open(p) as im:  # the private images at another size: maps come back at full size
                im.convert("RGB").resize((96, 80)).save(cat / split / f"{i:03d}_{suffix}.png")
    return root


@pytest.fixture(scope="module")
def ad2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ad2")
    assert main(["synth", "--out", str(tmp / "synth"), "--n-train", "12"]) == 0
    root = ad2_layout(tmp / "synth", tmp / "mvtec_ad_2")
    ckpt = tmp / "ckpt"
    assert main(["train", "--data", str(root), "--category", CAT, "--image-size", "64", "--epochs", "1",
                 "--n-bank", "4", "--top-k", "2", "--batch-size", "4", "--out", str(ckpt)]) == 0
    return root, ckpt


def test_the_layout_is_read_as_mvtec_ad2(ad2) -> None:
    root, _ = ad2
    assert detect_format(root, CAT) == "mvtec_ad2"
    test = make_dataset("auto", root, CAT, "test", 64)
    assert isinstance(test, MVTecAD2Dataset) and test.split == "test_public" and test.has_masks
    assert sorted(set(test.labels)) == [0, 1] and test.labelled
    assert all(s.mask_paths[0].name == f"{s.path.stem}_mask.png" for s in test.samples if s.label == 1)
    assert sum(float(test[i]["mask"].sum()) for i, lab in enumerate(test.labels) if lab == 1) > 0
    private = MVTecAD2Dataset(root, CAT, "test_private", 64)
    assert not private.labelled and set(private.labels) == {-1} and len(private) == 3
    assert len(MVTecAD2Dataset(root, CAT, "validation", 64)) == 3
    with pytest.raises(DatasetError, match="test_private_mixed"):
        MVTecAD2Dataset(root, CAT, "test_secret", 64)


def test_validation_threshold_and_segf1_by_hand() -> None:
    # mean 1.5, population std sqrt(1.25): 1.5 + 3 * 1.1180
    assert validation_threshold(np.array([[0.0, 1.0], [2.0, 3.0]])) == pytest.approx(1.5 + 3 * 1.25 ** 0.5)
    maps = np.array([[[0.9, 0.8], [0.2, 0.1]], [[0.7, 0.1], [0.1, 0.1]]])
    masks = np.array([[[1, 0], [1, 0]], [[1, 0], [0, 0]]])
    # at 0.5: predicted (0,0), (0,1), (1,0,0); TP 2 ((0,0,0), (1,0,0)), FP 1, FN 1 -> F1 = 4 / 6
    assert segmentation_f1(maps, masks, 0.5) == pytest.approx(4 / 6)
    assert segmentation_f1(maps, masks, 0.95) == 0.0  # nothing predicted: no credit


def test_aupro_up_to_fpr_005_by_hand() -> None:
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 2:4, 2:4] = 1
    perfect = masks.astype(np.float32)
    assert aupro(perfect, masks, fpr_limit=0.05) == pytest.approx(1.0)
    # a constant map: the PRO curve is the diagonal from (0, 0) to (1, 1); its area up to 0.05,
    # divided by 0.05, is 0.025
    assert aupro(np.ones_like(perfect), masks, fpr_limit=0.05) == pytest.approx(0.025, abs=1e-3)


def test_nferd_test_reports_segf1_and_aupro_005_next_to_ours(ad2, tmp_path) -> None:
    root, ckpt = ad2
    out = tmp_path / "test"
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(root), "--category", CAT, "--out", str(out)]) == 0
    m = json.loads((out / "results.json").read_text())["categories"][CAT]
    # SegF1 is measured at the threshold the submission uses: mean + 3 std of the validation maps
    from nferd.deploy.mvtec_ad2 import segmentation_threshold
    from nferd.deploy.predict import Predictor
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    assert m["segf1_threshold"] == pytest.approx(
        segmentation_threshold(predictor, MVTecAD2Dataset(root, CAT, "validation", 64)), rel=1e-4)
    assert m["aupro_0.05"] is not None and m["aupro_0.05"] != m["aupro"]  # integrated to another FPR
    assert "segf1" in (out / "results.md").read_text()


def test_submission_folder_is_what_the_server_takes(ad2, tmp_path) -> None:
    tifffile = pytest.importorskip("tifffile")
    root, ckpt = ad2
    out = tmp_path / "submission"
    assert main(["mvtec-ad2-submission", "--checkpoint", str(ckpt), "--data", str(root), "--category", CAT,
                 "--out", str(out)]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    want = [f"anomaly_images/{CAT}/test_private/{i:03d}_regular.tiff" for i in range(3)]
    want += [f"anomaly_images/{CAT}/test_private_mixed/{i:03d}_mixed.tiff" for i in range(3)]
    want += [f"anomaly_images_thresholded/{CAT}/test_private/{i:03d}_regular.png" for i in range(3)]
    want += [f"anomaly_images_thresholded/{CAT}/test_private_mixed/{i:03d}_mixed.png" for i in range(3)]
    assert files == sorted(want)  # nothing else: the server refuses superfluous files
    amap = tifffile.imread(out / "anomaly_images" / CAT / "test_private" / "000_regular.tiff")
    assert amap.dtype == np.float16 and amap.shape == (80, 96) and np.isfinite(amap).all()
    binary = np.asarray(Image.open(out / "anomaly_images_thresholded" / CAT / "test_private" / "000_regular.png"))
    assert binary.ndim == 2 and set(np.unique(binary)) <= {0, 255}
    summary = json.loads((tmp_path / "submission.json").read_text())["categories"][CAT]
    # the binarised map is the map above the category's threshold (up to float16 rounding at the edge)
    assert np.mean((binary == 255) != (amap.astype(np.float32) > summary["threshold"])) < 0.01
    with tarfile.open(tmp_path / "submission.tar.gz") as tar:
        names = tar.getnames()
    assert f"submission/anomaly_images/{CAT}/test_private/000_regular.tiff" in names
    assert all(n.startswith(("submission/anomaly_images/", "submission/anomaly_images_thresholded/")) or
               n in ("submission/anomaly_images", "submission/anomaly_images_thresholded") for n in names)
    # a second run into the same folder is refused: the server takes no extra files
    assert main(["mvtec-ad2-submission", "--checkpoint", str(ckpt), "--data", str(root), "--category", CAT,
                 "--out", str(out)]) != 0


def test_a_missing_private_split_leaves_nothing_and_the_rerun_works(ad2, tmp_path) -> None:
    pytest.importorskip("tifffile")
    root, ckpt = ad2
    broken = tmp_path / "ad2"
    shutil.copytree(root, broken)
    shutil.rmtree(broken / CAT / "test_private_mixed")
    out = tmp_path / "submission"
    assert main(["mvtec-ad2-submission", "--checkpoint", str(ckpt), "--data", str(broken), "--category", CAT,
                 "--out", str(out)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad2"]  # no folder, no archive, no temporary folder
    shutil.copytree(root / CAT / "test_private_mixed", broken / CAT / "test_private_mixed")
    assert main(["mvtec-ad2-submission", "--checkpoint", str(ckpt), "--data", str(broken), "--category", CAT,
                 "--out", str(out)]) == 0
    assert len([p for p in out.rglob("*") if p.is_file()]) == 12


def test_a_private_split_is_never_evaluated(ad2) -> None:
    from nferd import evaluate, load_checkpoint
    root, ckpt = ad2
    model, _ = load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="no labels"):
        evaluate(model, MVTecAD2Dataset(root, CAT, "test_private", 64))
