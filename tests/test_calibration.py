"""Calibration: thresholds from normal scores with a false-alarm bound or, with defects, at the F1 optimum;
`nferd calibrate`."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from nferd.cli import main
from nferd.engine.calibration import (
    Calibration,
    CalibrationWarning,
    NonFiniteError,
    as_calibration,
    fit_calibration,
    fit_f1,
    fit_normal,
    fit_validation,
)


def test_normal_threshold_is_the_order_statistic_that_bounds_the_false_alarm_rate() -> None:
    scores = np.arange(1, 101, dtype=float)  # 100 good images
    cal = fit_normal(scores, np.zeros((100, 4, 4)), false_alarm_rate=0.05)
    # 90 % confidence for 5 %: the 2nd largest (P(Bin(100, .05) <= 1) = .037); the 3rd would give .118 > .1
    assert cal.rank == 2 and cal.image_threshold == 99.0 and cal.confidence == 0.9
    assert cal.counts(scores, np.zeros(100))["false_alarms"] == 1
    assert cal.normalize(cal.image_threshold) == pytest.approx(0.5)


def test_f1_threshold_lies_between_the_classes_and_decides_with_greater_than() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.5, 0.6, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    maps = np.zeros((7, 2, 2), dtype=np.float32)
    masks = np.zeros((7, 2, 2), dtype=np.uint8)
    maps[3:, 0, 0], masks[3:, 0, 0] = 1.0, 1  # defect pixels hot, the rest cold
    cal = fit_f1(scores, labels, maps, masks)
    assert 0.3 < cal.image_threshold < 0.35  # halfway: the lowest defect is flagged, the top good is not
    assert cal.image_f1 == pytest.approx(1.0)
    assert cal.counts(scores, labels) == {"good": 3, "false_alarms": 0, "defective": 4, "misses": 0}
    assert 0.0 < cal.pixel_threshold <= 1.0 and cal.normalize(0.35) > 0.5 > cal.normalize(0.3)
    # overlapping classes: the F1 optimum trades one false alarm for no miss
    cal = fit_f1(np.array([0.1, 0.2, 0.6, 0.4, 0.5, 0.7]), np.array([0, 0, 0, 1, 1, 1]), maps[:6], None)
    assert cal.counts(np.array([0.1, 0.2, 0.6, 0.4, 0.5, 0.7]), np.array([0, 0, 0, 1, 1, 1]))["misses"] == 0


def test_validation_fit_picks_the_method_by_what_the_set_holds() -> None:
    maps = np.random.default_rng(0).random((6, 4, 4)).astype(np.float32)
    with pytest.warns(CalibrationWarning, match="needs at least 230"):  # 6 good images are far too few for 1 %
        assert fit_validation(np.arange(6.0), np.zeros(6), maps).method == "normal_bound"
    assert fit_validation(np.arange(6.0), np.array([0, 0, 0, 1, 1, 1]), maps).method == "validation_f1"
    with pytest.raises(ValueError, match="good images"):
        fit_validation(np.arange(3.0), np.ones(3), maps[:3])


class _Validation:
    calibration_source = "validation/good"
    has_masks = True


NORMAL_KEYS = ["method", "image_threshold", "pixel_threshold", "pixel_median", "score_min", "false_alarm_rate",
               "confidence", "rank", "false_alarm_bound", "images_needed", "pixel_fpr", "n_images"]
FITTED_KEYS = ["source", "fitted_set", "normal_scores"]


def test_the_record_writes_the_json_both_fits_wrote_and_reads_it_back() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((300, 4, 4)).astype(np.float32)
    d = fit_normal(rng.random(300), maps).to_dict()
    assert list(d) == NORMAL_KEYS  # the keys and their order in every file written so far
    assert Calibration.from_dict(d).to_dict() == d and json.dumps(Calibration.from_dict(d).to_dict()) == json.dumps(d)
    labels = np.array([0] * 200 + [1] * 100)
    masks = np.zeros((300, 4, 4), dtype=np.uint8)
    masks[200:, 0, 0] = 1
    res = {"scores": rng.random(300) + labels, "maps": maps, "labels": labels, "masks": masks,
           "paths": [f"{i}.png" for i in range(300)]}
    cal = fit_calibration(res, _Validation())
    d = cal.to_dict()
    assert list(d) == ["method", "image_threshold", "pixel_threshold", "pixel_median", "score_min", "image_f1",
                       "n_images", "n_defective", *FITTED_KEYS]
    assert d["source"] == "validation/good" and d["fitted_set"] == cal.counts(res["scores"], labels)
    assert d["normal_scores"] == sorted(float(v) for v in res["scores"][:200])
    assert Calibration.from_dict(d).to_dict() == d and json.dumps(Calibration.from_dict(d).to_dict()) == json.dumps(d)
    assert Calibration.from_dict(json.loads(json.dumps(d))) == cal  # through a file and back: the same record


def test_an_older_or_newer_file_loads_and_keeps_what_it_holds() -> None:
    older = {"method": "normal_bound", "image_threshold": 2.5, "pixel_threshold": 0.8, "pixel_median": 0.1,
             "score_min": 1.0, "false_alarm_rate": 0.01, "confidence": 0.9, "rank": 1, "false_alarm_bound": 0.2,
             "images_needed": 230, "pixel_fpr": 0.001, "n_images": 10, "warning": "too few"}  # no normal scores
    cal = Calibration.from_dict(older)
    assert cal.normal_scores is None and cal.source is None and cal.to_dict() == older
    assert cal.decide(2.6) == "NOK" and cal.decide(2.5) == "OK" and "the highest of 10 normal scores" in cal.describe()
    newer = {**older, "normal_scores": [1.0, 2.0], "a_later_key": {"per_line": [1, 2]}}
    cal = Calibration.from_dict(newer)
    assert cal.extra == {"a_later_key": {"per_line": [1, 2]}} and cal.to_dict() == newer
    minimal = Calibration.from_dict({"image_threshold": 1, "pixel_threshold": 0.5, "score_min": 0})
    assert minimal.method is None and minimal.pixel_median == 0.0 and minimal.decide(1.5) == "NOK"
    assert as_calibration(None) is None and as_calibration(cal) is cal and as_calibration(newer) == cal


def test_a_calibration_no_decision_can_rest_on_is_refused_with_its_key_named() -> None:
    sound = {"method": "normal_bound", "image_threshold": 2.5, "pixel_threshold": 0.8, "score_min": 1.0,
             "false_alarm_rate": 0.01, "confidence": 0.9, "rank": 1, "false_alarm_bound": 0.2, "n_images": 10}
    with pytest.raises(ValueError, match="not a JSON object"):
        Calibration.from_dict([2.5])  # type: ignore[arg-type]
    for key, value in (("image_threshold", None), ("score_min", "1.0"), ("pixel_threshold", True), ("rank", None)):
        with pytest.raises(ValueError, match=f"calibration.{key} is"):
            Calibration.from_dict({**sound, key: value})
    with pytest.raises(ValueError, match="normal_scores"):
        Calibration.from_dict({**sound, "normal_scores": [1.0, "2"]})
    with pytest.raises(NonFiniteError, match=r"calibration\.a_later_key\.x\[1\] is inf"):
        Calibration.from_dict({**sound, "a_later_key": {"x": [1.0, float("inf")]}})
    with pytest.raises(NonFiniteError, match="image_threshold is nan"):  # built in code: checked the same way
        dataclasses.replace(Calibration.from_dict(sound), image_threshold=float("nan"))


def test_shifted_thresholds_are_a_new_record_that_says_by_how_much() -> None:
    cal = Calibration(method="normal_bound", image_threshold=2.0, pixel_threshold=0.5, pixel_median=0.1, score_min=1.0,
                      false_alarm_rate=0.01, confidence=0.9, rank=1, false_alarm_bound=0.2, n_images=10,
                      normal_scores=(1.0, 1.5))
    moved = cal.shifted("int8", 0.25, -0.05, 7)
    assert (moved.image_threshold, moved.score_min, moved.normal_scores) == (2.25, 1.25, (1.25, 1.75))
    assert (moved.pixel_threshold, moved.pixel_median) == pytest.approx((0.45, 0.05))
    assert moved.to_dict()["int8_shift"] == {"image_score": 0.25, "pixel": -0.05, "n_images": 7}
    assert cal.image_threshold == 2.0 and cal.int8_shift is None  # the original is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        cal.image_threshold = 3.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="int8 or bf16"):
        cal.shifted("fp16", 0.25, 0.0, 7)


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
