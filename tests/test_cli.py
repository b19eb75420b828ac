"""The command line end to end on a tiny generated dataset: synth, train, test, predict, diagnose, info."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nferd.cli import main
from nferd.cli.options import CLIError


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data"
    assert main(["synth", "--out", str(data), "--n-train", "10"]) == 0
    ckpt = tmp / "ckpt"
    rc = main(["train", "--data", str(data), "--category", "synthetic_tiles", "--teacher", "efficientnet_lite0",
               "--image-size", "64", "--epochs", "2", "--n-bank", "4", "--top-k", "2", "--batch-size", "4",
               "--holdout", "0.2", "--out", str(ckpt)])
    assert rc == 0
    return data, ckpt


def test_train_writes_an_atomic_checkpoint_and_log(trained) -> None:
    _, ckpt = trained
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["model"]["teacher"] == "efficientnet_lite0" and meta["epoch"] == 2
    assert meta["calibration"]["image_threshold"] > 0 and meta["calibration"]["n_images"] == 2
    assert len((ckpt / "train_log.jsonl").read_text().splitlines()) == 2
    assert not list(ckpt.glob("*.tmp"))


def test_test_writes_results_json(trained, tmp_path) -> None:
    """``nferd test`` writes the metrics that ``evaluate()`` computes for the saved checkpoint on the
    whole test split (same batch size, device and precision defaults), under the right names, in
    the category row and as the mean of its one category, and the same figures in the CSV table."""
    from nferd.data.datasets import MVTecDataset
    from nferd.engine.checkpoint import load_checkpoint
    from nferd.engine.evaluate import evaluate
    data, ckpt = trained
    out = tmp_path / "test"
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(data), "--category", "synthetic_tiles",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    model, _ = load_checkpoint(ckpt)
    test_set = MVTecDataset(data, "synthetic_tiles", "test", model.config.image_size)
    expected, _ = evaluate(model, test_set, batch_size=16, device="auto", precision="auto")
    row = res["categories"]["synthetic_tiles"]
    assert row["n_images"] == len(test_set) == 36  # 12 good + 3 defect types x 8 (synth defaults)
    for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_ap"):
        assert row[k] == pytest.approx(expected[k], abs=1e-6), k
        assert res[k] == pytest.approx(row[k]), k
    assert "| mean |" in (out / "results.md").read_text()
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("category,") and csv_rows[1].startswith("synthetic_tiles,")
    values = dict(zip(csv_rows[0].split(","), csv_rows[1].split(",")))
    assert float(values["image_auroc"]) == pytest.approx(expected["image_auroc"], abs=1e-6)


def test_predict_reports_a_broken_file_and_goes_on(trained, tmp_path) -> None:
    data, ckpt = trained
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = sorted((data / "synthetic_tiles" / "test" / "good").glob("*.png"))[:2]
    out = tmp_path / "pred"
    rc = main(["predict", "--checkpoint", str(ckpt), str(good[0]), str(broken), str(good[1]),
               "--out", str(out), "--map-format", "png16"])
    assert rc == 3  # some files failed
    rows = json.loads((out / "summary.json").read_text())
    assert [("error" in r) for r in rows] == [False, True, False]
    assert "broken.png" in rows[1]["error"]
    from nferd.engine.checkpoint import read_metadata
    cal = read_metadata(ckpt)["calibration"]
    thr, lo = cal["image_threshold"], cal["score_min"]
    for r in (r for r in rows if "error" not in r):  # the checkpoint's calibration decides; 0.5 at its threshold
        assert r["decision"] == ("NOK" if r["score"] > thr else "OK")
        expected = 0.5 + 0.5 * (r["score"] - thr) / max(thr - lo, 1e-12)
        assert r["normalized_score"] == pytest.approx(min(1.0, max(0.0, expected)))
    assert len(list((out / "overlays").glob("*.png"))) == 2 and len(list((out / "maps").glob("*.png"))) == 2


def test_diagnose_of_the_default_scores_each_term_alone(trained, capsys) -> None:
    data, ckpt = trained
    assert main(["diagnose", "--checkpoint", str(ckpt), "--data", str(data), "--category", "synthetic_tiles",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert list(rep["stages"]) == ["layer1", "layer2", "layer3", "model", "student", "bank distance"]
    assert rep["stages"]["student"] != rep["stages"]["bank distance"]


def test_diagnose_reports_retrieval_health(trained, capsys, tmp_path) -> None:
    data, _ = trained
    ckpt = tmp_path / "banked"  # banks that only score (the nferd 0.3-0.4 design)
    assert main(["train", "--data", str(data), "--category", "synthetic_tiles", "--image-size", "64", "--epochs", "1",
                 "--n-bank", "4", "--top-k", "2", "--batch-size", "4", "--holdout", "0.2", "--preset", "nferd_bankdist",
                 "--out", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--checkpoint", str(ckpt), "--data", str(data), "--category", "synthetic_tiles",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    # the default's banks (layer1, layer2) only score: their nearest match, no recall
    assert [r["bank"] for r in rep["retrieval"]] == ["layer1", "layer2"]
    assert all(-1 <= r["top1_similarity_mean"] <= 1 and "topk_gap" not in r for r in rep["retrieval"])
    assert set(rep["metrics"]) == {"bank", "random", "mean", "zero"}
    assert list(rep["stages"]) == ["layer1", "layer2", "layer3", "model", "student", "bank distance"]
    # the model row is the model's own map, scored as `nferd test` scores it (its fast path rounds apart)
    assert rep["stages"]["model"]["pixel_auroc"] == pytest.approx(rep["metrics"]["bank"]["pixel_auroc"], abs=1e-4)
    assert all(0 <= r["defect_matched_share"] <= 1 for r in rep["retrieval"])
    assert main(["diagnose", "--checkpoint", str(ckpt), "--data", str(data), "--category", "synthetic_tiles"]) == 0
    assert "only scores the map" in capsys.readouterr().out


def test_diagnose_reports_the_recall_of_a_fused_bank(trained) -> None:
    from nferd.cli.diagnose import diagnose
    from nferd.data.datasets import MVTecDataset
    from nferd.models.nferd import NFERD, ModelConfig
    data, _ = trained
    torch.manual_seed(0)
    model = NFERD(ModelConfig(image_size=64, n_bank=4, top_k=2, fusion="hafm"), teacher_weights="random")
    with torch.no_grad():
        model.fill_banks(model.teacher(torch.rand(4, 3, 64, 64)), torch.arange(4))
    rep = diagnose(model, MVTecDataset(data, "synthetic_tiles", "test", 64))
    assert [r["bank"] for r in rep["retrieval"]] == ["layer1", "layer2", "layer3"]
    assert all(r["recall"] == "patch" and 0 <= r["weight_entropy"] <= 1 for r in rep["retrieval"])
    assert list(rep["stages"]) == ["layer1", "layer2", "layer3", "model"]


def test_diagnose_reads_one_pass_as_the_separate_reports_read_theirs(trained) -> None:
    from nferd.cli.diagnose import diagnose, retrieval_stats, stage_localisation
    from nferd.data.datasets import MVTecDataset
    from nferd.engine.checkpoint import load_checkpoint
    data, ckpt = trained
    ds = MVTecDataset(data, "synthetic_tiles", "test", 64)
    rep = diagnose(load_checkpoint(ckpt)[0], ds)
    model, _ = load_checkpoint(ckpt)  # fresh: evaluate() moved the first to channels_last (other kernels)
    assert rep["stages"] == stage_localisation(model, ds)
    assert rep["retrieval"] == retrieval_stats(model, ds)
    rd = dataclasses.replace(model.config, bank=False, fusion="none", bank_distance_weight=0.0)
    from nferd.models.nferd import NFERD
    with pytest.raises(ValueError, match="no bank"):
        diagnose(NFERD(rd, teacher=model.teacher), ds)
    assert set(stage_localisation(NFERD(rd, teacher=model.teacher), ds)) == {"layer1", "layer2", "layer3", "model"}


def test_info_json(capsys) -> None:
    assert main(["info", "--teacher", "resnet18", "--image-size", "128", "--bank", "off", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["bank"] == 0 and info["params"]["fusion"] == 0 and info["gflops"] > 0


def test_config_file_with_flag_override(trained, tmp_path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("teacher: resnet18\nimage-size: 64\nbank: 'off'\n")
    assert main(["info", "--config", str(cfg), "--image-size", "96", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["teacher"] == "resnet18" and info["image_size"] == 96 and info["params"]["bank"] == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    assert main(["info", "--config", str(bad)]) == 2
    assert "epochz" in capsys.readouterr().err


def test_config_key_format_means_each_commands_own_format_option(tmp_path) -> None:
    from nferd.cli.parser import parse_args
    cfg = tmp_path / "run.yaml"
    cfg.write_text("format: folder\npatch-limit: 512\n")
    args = parse_args(["train", "--config", str(cfg), "--data", "d", "--out", "o"])
    assert args.data_format == "folder" and args.patch_limit == 512
    assert parse_args(["train", "--config", str(cfg), "--data", "d", "--out", "o",
                       "--format", "mvtec"]).data_format == "mvtec"  # the flag wins over the file
    exp = tmp_path / "export.yaml"
    exp.write_text("format: onnx\ncheckpoint: ckpt\nout: m.onnx\n")
    args = parse_args(["export", "--config", str(exp)])
    assert args.export_format == "onnx" and args.checkpoint == "ckpt"
    exp.write_text("format: tflite\n")
    with pytest.raises(CLIError, match="format.*must be one of onnx"):
        parse_args(["export", "--config", str(exp), "--checkpoint", "c", "--out", "m.onnx"])


def test_bad_input_gets_a_clear_error_not_a_traceback(tmp_path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path), "--category", "nothing", "--epochs", "1",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nferd: error:") and "Traceback" not in err
    assert main(["test", "--checkpoint", str(tmp_path / "none"), "--data", str(tmp_path), "--category", "x",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_console_entry_point_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "nferd", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "predict" in r.stdout


def test_category_all_trains_and_tests_every_category(tmp_path, capsys) -> None:
    from nferd.data.synth import generate_synthetic_dataset
    for i, cat in enumerate(("tiles_a", "tiles_b")):
        generate_synthetic_dataset(tmp_path / "data", seed=i, category=cat, n_train=6, n_test_good=2,
                                   n_test_per_defect=1, image_size=64)
    common = ["--data", str(tmp_path / "data"), "--category", "all"]
    assert main(["train", *common, "--image-size", "64", "--epochs", "1", "--n-bank", "3", "--top-k", "1",
                 "--holdout", "0.34", "--batch-size", "4", "--out", str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / "tiles_a" / "model.safetensors").is_file()
    assert (tmp_path / "ck" / "tiles_b" / "model.safetensors").is_file()
    assert main(["test", "--checkpoint", str(tmp_path / "ck"), *common, "--out", str(tmp_path / "res")]) == 0
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert set(res["categories"]) == {"tiles_a", "tiles_b"}
    mean = (res["categories"]["tiles_a"]["pixel_auroc"] + res["categories"]["tiles_b"]["pixel_auroc"]) / 2
    assert res["pixel_auroc"] == pytest.approx(mean)
    assert "| mean |" in (tmp_path / "res" / "results.md").read_text()


def test_bank_stages_flag_and_config_file(tmp_path, capsys) -> None:
    from nferd.cli.options import model_config_from
    from nferd.cli.parser import parse_args
    args = parse_args(["train", "--data", "d", "--out", "o", "--bank-stages", "2,3"])
    assert model_config_from(args).bank_stages == (2, 3)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("bank-stages: [3]\n")
    args = parse_args(["train", "--config", str(cfg), "--data", "d", "--out", "o"])
    assert model_config_from(args).bank_stages == (3,)
    with pytest.raises(SystemExit):
        parse_args(["train", "--data", "d", "--out", "o", "--bank-stages", "4"])
    err = capsys.readouterr().err
    assert "--bank-stages" in err and "expected teacher stages" in err
    assert model_config_from(parse_args(["train", "--data", "d", "--out", "o", "--recall", "map"])).recall == "map"


def test_train_preset_nferd_fusion_trains_the_fused_design(trained, tmp_path) -> None:
    """`--preset` selects a whole design on `train`; a flag given with it still wins."""
    from nferd.models.choices import PRESETS
    from nferd.models.nferd import ModelConfig
    data, _ = trained
    ckpt = tmp_path / "fusion"
    assert main(["train", "--data", str(data), "--category", "synthetic_tiles", "--preset", "nferd_fusion",
                 "--image-size", "64", "--epochs", "1", "--n-bank", "4", "--top-k", "2", "--batch-size", "4",
                 "--holdout", "0.2", "--out", str(ckpt)]) == 0
    saved = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text())["model"])
    want = ModelConfig.preset("nferd_fusion", image_size=64, n_bank=4, top_k=2)
    assert PRESETS["nferd_fusion"]["fusion"] == want.fusion
    assert saved == want and saved.fusion != "none" and saved != ModelConfig(image_size=64, n_bank=4, top_k=2)
