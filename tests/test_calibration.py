"""Calibration: thresholds from normal scores with a false-alarm bound or, with defects, at the F1 optimum;
`nferd calibrate`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from nferd.cli import main
from nferd.engine.calibration import CalibrationWarning, decision_counts, fit_f1, fit_normal, fit_validation, normalize


def test_normal_threshold_is_the_order_statistic_that_bounds_the_false_alarm_rate() -> None:
    scores = np.arange(1, 101, dtype=float)  # 100 good images
    cal = fit_normal(scores, np.zeros((100, 4, 4)), false_alarm_rate=0.05)
    # 90 % confidence for 5 %: the 2nd largest (P(Bin(100, .05) <= 1) = .037); the 3rd would give .118 > .1
    assert cal["rank"] == 2 and cal["image_threshold"] == 99.0 and cal["confidence"] == 0.9
    assert decision_counts(scores, np.zeros(100), cal)["false_alarms"] == 1
    assert normalize(cal["image_threshold"], cal) == pytest.approx(0.5)


def test_f1_threshold_lies_between_the_classes_and_decides_with_greater_than() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.5, 0.6, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    maps = np.zeros((7, 2, 2), dtype=np.float32)
    masks = np.zeros((7, 2, 2), dtype=np.uint8)
    maps[3:, 0, 0], masks[3:, 0, 0] = 1.0, 1  # defect pixels hot, the rest cold
    cal = fit_f1(scores, labels, maps, masks)
    assert 0.3 < cal["image_threshold"] < 0.35  # halfway: the lowest defect is flagged, the top good is not
    assert cal["image_f1"] == pytest.approx(1.0)
    assert decision_counts(scores, labels, cal) == {"good": 3, "false_alarms": 0, "defective": 4, "misses": 0}
    assert 0.0 < cal["pixel_threshold"] <= 1.0 and normalize(0.35, cal) > 0.5 > normalize(0.3, cal)
    # overlapping classes: the F1 optimum trades one false alarm for no miss
    cal = fit_f1(np.array([0.1, 0.2, 0.6, 0.4, 0.5, 0.7]), np.array([0, 0, 0, 1, 1, 1]), maps[:6], None)
    assert decision_counts(np.array([0.1, 0.2, 0.6, 0.4, 0.5, 0.7]), np.array([0, 0, 0, 1, 1, 1]), cal)["misses"] == 0


def test_validation_fit_picks_the_method_by_what_the_set_holds() -> None:
    maps = np.random.default_rng(0).random((6, 4, 4)).astype(np.float32)
    with pytest.warns(CalibrationWarning, match="needs at least 230"):  # 6 good images are far too few for 1 %
        assert fit_validation(np.arange(6.0), np.zeros(6), maps)["method"] == "normal_bound"
    assert fit_validation(np.arange(6.0), np.array([0, 0, 0, 1, 1, 1]), maps)["method"] == "validation_f1"
    with pytest.raises(ValueError, match="good images"):
        fit_validation(np.arange(3.0), np.ones(3), maps[:3])


def test_calibrate_command_refits_the_checkpoint_on_validation_folders(synth_root, tmp_path, capsys) -> None:
    data = synth_root / "synthetic_tiles"
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--data", str(synth_root), "--category", "synthetic_tiles", "--image-size", "64",
                 "--epochs", "1", "--n-bank", "4", "--top-k", "2", "--batch-size", "4", "--holdout", "0.25",
                 "--out", str(ckpt)]) == 0
    before = json.loads((ckpt / "config.json").read_text())
    val = tmp_path / "val"  # a validation set of our own, copied out of the generated data
    shutil.copytree(data / "test" / "good", val / "good")
    defect = sorted(p for p in (data / "test").iterdir() if p.name != "good")[0]
    shutil.copytree(defect, val / "defect")
    shutil.copytree(data / "ground_truth" / defect.name, val / "masks")
    capsys.readouterr()
    assert main(["calibrate", "--checkpoint", str(ckpt), "--normal-dir", str(val / "good"),
                 "--abnormal-dir", str(val / "defect"), "--mask-dir", str(val / "masks")]) == 0
    out = capsys.readouterr().out
    assert "validation_f1" in out and "was" in out
    after = json.loads((ckpt / "config.json").read_text())
    cal = after["calibration"]
    assert cal["method"] == "validation_f1" and cal["n_defective"] == len(list((val / "defect").iterdir()))
    assert cal["fitted_set"]["good"] == len(list((val / "good").iterdir()))
    assert {k: v for k, v in after.items() if k != "calibration"} == \
        {k: v for k, v in before.items() if k != "calibration"}  # only the calibration changed
    from nferd.engine.checkpoint import read_metadata
    assert read_metadata(ckpt)["calibration"] == cal  # the weights file's header holds it too
    # good images only: back to the normal bound; 3 images are far too few for 1 %, which is said
    capsys.readouterr()
    assert main(["calibrate", "--checkpoint", str(ckpt), "--normal-dir", str(val / "good")]) == 0
    cal = json.loads((ckpt / "config.json").read_text())["calibration"]
    assert cal["method"] == "normal_bound" and cal["rank"] == 1 and cal["images_needed"] == 230
    captured = capsys.readouterr()
    assert "at most" in captured.out and "90 % confidence" in captured.out
    assert "needs at least 230" in captured.err
    # bad input: a clear message, exit 2, checkpoint unchanged
    assert main(["calibrate", "--checkpoint", str(ckpt)]) == 2
    assert main(["calibrate", "--checkpoint", str(ckpt), "--data", str(synth_root), "--category",
                 "synthetic_tiles"]) == 2  # no validation/ folder in this layout
    err = capsys.readouterr().err
    assert "--normal-dir" in err and "validation" in err
