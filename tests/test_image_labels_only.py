"""Test sets with OK / NOK image labels but no defect masks (parts sorted on the line, nobody painted
masks) are evaluated on image metrics; pixel metrics are null with the reason, and a set where only
some defective images have a mask is refused unless ``--image-metrics-only``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from nferd.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("labels_only")
    data = tmp / "data"
    assert main(["synth", "--out", str(data), "--n-train", "10"]) == 0
    ckpt = tmp / "ckpt"
    assert main(["train", "--data", str(data), "--category", "synthetic_tiles", "--image-size", "64", "--epochs", "1",
                 "--n-bank", "4", "--top-k", "2", "--batch-size", "4", "--holdout", "0.2", "--out", str(ckpt)]) == 0
    return data, ckpt


def without_masks(data: Path, tmp_path: Path, keep: int = 0) -> Path:
    """A copy of the dataset whose ground_truth folder holds only ``keep`` masks."""
    root = tmp_path / "copy"
    shutil.copytree(data, root)
    gt = root / "synthetic_tiles" / "ground_truth"
    masks = sorted(gt.rglob("*.png"))
    for m in masks[keep:]:
        m.unlink()
    return root


def test_mvtec_layout_without_ground_truth_gets_image_metrics(trained, tmp_path, capsys) -> None:
    data, ckpt = trained
    root = without_masks(data, tmp_path)
    out = tmp_path / "test"
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(root), "--category", "synthetic_tiles",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pixel metrics absent" in printed and "no ground-truth masks" in printed
    res = json.loads((out / "results.json").read_text())
    cat = res["categories"]["synthetic_tiles"]
    assert all(isinstance(cat[k], float) for k in ("image_auroc", "image_ap", "image_f1max"))  # values: next test
    assert cat["pixel_auroc"] is None and cat["aupro"] is None and cat["pixel_ap"] is None
    assert res["pixel_auroc"] is None  # the mean of absent metrics is absent too
    assert cat["at_threshold"]["defective"] > 0  # the calibrated threshold's misses need labels only
    md = (out / "results.md").read_text()
    assert "–" in md and "pixel metrics absent" in md


def test_the_same_images_with_masks_give_the_same_image_metrics(trained, tmp_path) -> None:
    data, ckpt = trained
    with_masks, labels_only = tmp_path / "with", tmp_path / "without"
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(data), "--category", "synthetic_tiles",
                 "--out", str(with_masks)]) == 0
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(without_masks(data, tmp_path)),
                 "--category", "synthetic_tiles", "--out", str(labels_only)]) == 0
    a = json.loads((with_masks / "results.json").read_text())["categories"]["synthetic_tiles"]
    b = json.loads((labels_only / "results.json").read_text())["categories"]["synthetic_tiles"]
    for k in ("image_auroc", "image_ap", "image_f1max"):
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert math.isfinite(a["pixel_auroc"]) and b["pixel_auroc"] is None


def test_partly_masked_set_is_refused_unless_image_metrics_only(trained, tmp_path, capsys) -> None:
    data, ckpt = trained
    root = without_masks(data, tmp_path, keep=2)
    args = ["test", "--checkpoint", str(ckpt), "--data", str(root), "--category", "synthetic_tiles",
            "--out", str(tmp_path / "t")]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "have no ground-truth mask" in err and "--image-metrics-only" in err and "Traceback" not in err
    assert main([*args, "--image-metrics-only"]) == 0
    cat = json.loads((tmp_path / "t" / "results.json").read_text())["categories"]["synthetic_tiles"]
    assert cat["pixel_auroc"] is None and "image metrics only" in cat["pixel_metrics_absent"]


def test_folder_with_ok_and_nok_folders_and_no_masks(trained, tmp_path) -> None:
    data, ckpt = trained
    test = data / "synthetic_tiles" / "test"
    nok = tmp_path / "nok"
    nok.mkdir()
    for f in sorted(p for d in test.iterdir() if d.name != "good" for p in d.glob("*.png")):
        shutil.copy(f, nok / f"{f.parent.name}_{f.name}")
    out = tmp_path / "folder_test"
    assert main(["test", "--checkpoint", str(ckpt), "--format", "folder", "--data", str(data),
                 "--test-normal-dir", str(test / "good"), "--test-abnormal-dir", str(nok), "--out", str(out)]) == 0
    cat = json.loads((out / "results.json").read_text())["categories"][data.name]  # named after the folder
    assert cat["aupro"] is None and cat["pixel_auroc"] is None
    # the same images in the dataset's own layout: the same image metrics
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(data), "--category", "synthetic_tiles",
                 "--out", str(tmp_path / "layout")]) == 0
    ref = json.loads((tmp_path / "layout" / "results.json").read_text())["categories"]["synthetic_tiles"]
    for k in ("image_auroc", "image_ap", "image_f1max"):
        assert cat[k] == pytest.approx(ref[k], abs=1e-6), k


def test_report_of_a_labels_only_set(trained, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    data, ckpt = trained
    out = tmp_path / "report"
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(without_masks(data, tmp_path)),
                 "--category", "synthetic_tiles", "--out", str(out), "--report"]) == 0
    html = next(out.glob("*.html")).read_text()
    assert 'data-key="aupro" data-value="nan">n/a<' in html and "pixel metrics absent: the " in html


def test_calibrate_on_a_partly_masked_validation_set_needs_image_metrics_only(trained, tmp_path, capsys) -> None:
    data, ckpt = trained
    test = data / "synthetic_tiles" / "test"
    nok, masks = tmp_path / "nok", tmp_path / "masks"
    nok.mkdir()
    masks.mkdir()
    defects = sorted(p for d in test.iterdir() if d.name != "good" for p in d.glob("*.png"))[:3]
    for f in defects:
        shutil.copy(f, nok / f"{f.parent.name}_{f.name}")
    gt = data / "synthetic_tiles" / "ground_truth" / defects[0].parent.name / f"{defects[0].stem}_mask.png"
    shutil.copy(gt, masks / f"{defects[0].parent.name}_{defects[0].stem}.png")
    cal_ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt, cal_ckpt)
    args = ["calibrate", "--checkpoint", str(cal_ckpt), "--normal-dir", str(test / "good"), "--abnormal-dir", str(nok),
            "--mask-dir", str(masks)]
    assert main(args) != 0
    assert "--image-metrics-only" in capsys.readouterr().err
    assert main([*args, "--image-metrics-only"]) == 0
