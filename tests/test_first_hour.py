"""A new user's first hour with their own images: a plain folder of good parts, then test and
export with labelled folders, as the README's folder workflow shows."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from nferd.cli import main

CAT = "synthetic_tiles"


@pytest.fixture(scope="module")
def folders(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """good/ (training), val/good, val/defect, val/masks: images only, no dataset layout."""
    root = tmp_path_factory.mktemp("product")
    src = synth_root / CAT
    shutil.copytree(src / "train" / "good", root / "good")
    shutil.copytree(src / "test" / "good", root / "val" / "good")
    (root / "val" / "defect").mkdir()
    (root / "val" / "masks").mkdir()
    for d in sorted(p for p in (src / "test").iterdir() if p.name != "good"):
        for img in sorted(d.glob("*.png"))[:2]:
            shutil.copy(img, root / "val" / "defect" / f"{d.name}_{img.name}")
            shutil.copy(src / "ground_truth" / d.name / f"{img.stem}_mask.png",
                        root / "val" / "masks" / f"{d.name}_{img.stem}_mask.png")
    return {"good": root / "good", "normal": root / "val" / "good", "defect": root / "val" / "defect",
            "masks": root / "val" / "masks", "root": root}


@pytest.fixture(scope="module")
def part(folders: dict[str, Path]) -> Path:
    """`nferd train --data good/` with no --format and no --category: a folder of images is a folder."""
    out = folders["root"] / "runs" / "part"
    assert main(["train", "--data", str(folders["good"]), "--image-size", "64", "--epochs", "1", "--n-bank", "4",
                 "--top-k", "2", "--batch-size", "4", "--no-cross-fit", "--out", str(out)]) == 0
    return out


def test_a_plain_folder_of_images_trains_without_format_or_category(part) -> None:
    from nferd.engine.checkpoint import read_metadata
    assert read_metadata(part)["data"]["format"] == "folder"


def test_a_dataset_root_without_category_says_what_to_give(folders, tmp_path, capsys) -> None:
    assert main(["train", "--data", str(folders["root"]), "--image-size", "64", "--epochs", "1",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--category is required" in err and "folder of good images" in err


def test_folder_test_needs_no_training_folder(part, folders, tmp_path, capsys) -> None:
    assert main(["test", "--checkpoint", str(part), "--test-normal-dir", str(folders["normal"]),
                 "--test-abnormal-dir", str(folders["defect"]), "--mask-dir", str(folders["masks"]),
                 "--out", str(tmp_path / "t")]) == 0
    assert "pixel_auroc" in capsys.readouterr().out


def test_test_without_data_uses_the_recorded_dataset(tiny_checkpoint, tmp_path, capsys) -> None:
    assert main(["test", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "t")]) == 0
    assert "image_auroc" in capsys.readouterr().out


def test_test_of_a_folder_model_without_test_folders_says_which_options(part, tmp_path, capsys) -> None:
    assert main(["test", "--checkpoint", str(part), "--out", str(tmp_path / "t")]) == 2
    assert "--test-normal-dir" in capsys.readouterr().err


def test_int8_export_of_a_folder_model_checks_its_test_images_before_working(part, folders, tmp_path,
                                                                            capsys) -> None:
    pytest.importorskip("nncf")
    out = tmp_path / "m.xml"
    assert main(["export", "--checkpoint", str(part), "--format", "openvino", "--int8", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "--test-abnormal-dir" in captured.err and "image_auroc" not in captured.out and not out.exists()
    assert main(["export", "--checkpoint", str(part), "--format", "openvino", "--int8", "--allow-accuracy-loss",
                 "--test-normal-dir", str(folders["normal"]), "--test-abnormal-dir", str(folders["defect"]),
                 "--mask-dir", str(folders["masks"]), "--out", str(out)]) == 0
    assert "image_auroc: fp32" in capsys.readouterr().out and out.is_file()


def test_an_unreadable_training_image_is_skipped_and_listed_unless_strict(folders, tmp_path, capsys) -> None:
    good = tmp_path / "good"
    shutil.copytree(folders["good"], good)
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["train", "--data", str(good), "--image-size", "64", "--epochs", "1", "--n-bank", "4", "--top-k", "2",
            "--batch-size", "4", "--no-cross-fit"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr()
    assert "1 unreadable image skipped" in out.out and "broken.png" in out.err
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert [Path(s["path"]).name for s in summary["skipped_images"]] == ["broken.png"]
    assert summary["n_train"] + summary["n_calibration"] == len(list(folders["good"].glob("*.png")))
    assert main([*args, "--strict-images", "--out", str(tmp_path / "strict")]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_messages_count_in_words_and_results_round_their_times(part, folders, tmp_path, capsys) -> None:
    assert main(["train", "--data", str(folders["good"]), "--image-size", "64", "--epochs", "1", "--n-bank", "4",
                 "--top-k", "2", "--batch-size", "4", "--no-cross-fit", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert ", 1 epoch" in out and "1 epochs" not in out
    assert main(["test", "--checkpoint", str(part), "--test-normal-dir", str(folders["normal"]),
                 "--test-abnormal-dir", str(folders["defect"]), "--out", str(tmp_path / "t")]) == 0
    info = (tmp_path / "t" / "results.md").read_text().splitlines()[-1]
    assert re.search(r"train_seconds: \d+\.\d s", info) and not re.search(r"\d\.\d{5,}", info)
    assert main(["predict", "--checkpoint", str(part), str(tmp_path / "incomin" / "*.png"),
                 "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "no images found in '" in err and "['" not in err


def test_overlays_carry_the_decision_and_score(part, folders, tmp_path) -> None:
    from PIL import Image

    from nferd.deploy.visualize import DECISION_COLOURS
    image = min(folders["defect"].glob("*.png"))
    assert main(["predict", "--checkpoint", str(part), str(image), "--out", str(tmp_path / "p")]) in (0, 3)
    row = json.loads((tmp_path / "p" / "summary.json").read_text())
    row = (row["images"] if isinstance(row, dict) else row)[0]
    with Image.open(image) as src, Image.open(tmp_path / "p" / "overlays" / f"{image.stem}.png") as ov:
        assert ov.width == src.width and ov.height > src.height  # the band above the image
        band = np.asarray(ov.convert("RGB"))[1, -1]
    assert tuple(band) == DECISION_COLOURS[row["decision"]]
