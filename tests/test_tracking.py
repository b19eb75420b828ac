"""Experiment tracking: ``--mlflow`` writes a local MLflow run with the parameters, the loss of every
epoch, the test metrics and the checkpoint path; without MLflow installed nothing else changes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nferd.cli import main

TRAIN = ["--category", "synthetic_tiles", "--image-size", "64", "--n-bank", "4", "--top-k", "2",
         "--batch-size", "4", "--holdout", "0.2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tracking") / "data"
    assert main(["synth", "--out", str(root), "--n-train", "10"]) == 0
    return root


def test_train_and_test_runs_appear_in_a_local_mlflow_store(data, tmp_path, capsys) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    store, ckpt = tmp_path / "mlruns", tmp_path / "ckpt"
    assert main(["train", "--data", str(data), *TRAIN, "--epochs", "2", "--out", str(ckpt), "--test",
                 "--mlflow", "--mlflow-dir", str(store)]) == 0
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(data), "--category", "synthetic_tiles",
                 "--out", str(tmp_path / "test"), "--mlflow", "--mlflow-dir", str(store)]) == 0
    assert "MLflow run" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    exp = client.get_experiment_by_name("nferd")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"train synthetic_tiles", "test synthetic_tiles"}
    tr = runs["train synthetic_tiles"]
    assert tr.info.status == "FINISHED"
    assert tr.data.params["model.distance"] == "memory" and tr.data.params["model.memory_stages"] == "1,2"
    assert tr.data.params["train.epochs"] == "2" and tr.data.params["data.category"] == "synthetic_tiles"
    loss = client.get_metric_history(tr.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 2] and all(m.value > 0 for m in loss)
    tested = json.loads((ckpt / "test" / "results.json").read_text())  # what `--test` wrote, logged as is
    assert tr.data.metrics["test_image_auroc"] == pytest.approx(tested["image_auroc"], abs=1e-9)
    assert tr.data.metrics["test_pixel_auroc"] == pytest.approx(tested["pixel_auroc"], abs=1e-9)
    assert tr.data.tags["checkpoint"].endswith("model.safetensors") and Path(tr.data.tags["checkpoint"]).is_file()
    te = runs["test synthetic_tiles"]
    assert te.data.metrics["image_auroc"] == pytest.approx(tr.data.metrics["test_image_auroc"], abs=1e-6)
    assert "at_threshold.false_alarms" in te.data.metrics and te.data.params["checkpoint"] == str(ckpt)


def test_a_failed_training_ends_its_run_as_failed(data, tmp_path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    store, ckpt = tmp_path / "mlruns", tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "last.safetensors").write_bytes(b"")  # an earlier run's checkpoint: train refuses without --resume
    assert main(["train", "--data", str(data), *TRAIN, "--epochs", "1", "--out", str(ckpt),
                 "--mlflow", "--mlflow-dir", str(store)]) != 0
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("nferd").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_without_mlflow_installed_training_works_and_mlflow_asks_for_it(data, tmp_path, monkeypatch,
                                                                       capsys) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    assert main(["train", "--data", str(data), *TRAIN, "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    assert not (tmp_path / "mlruns").exists() and not Path("mlruns").exists()
    assert main(["train", "--data", str(data), *TRAIN, "--epochs", "1", "--out", str(tmp_path / "b"),
                 "--mlflow", "--mlflow-dir", str(tmp_path / "mlruns")]) != 0
    err = capsys.readouterr().err
    assert "pip install 'nferd[mlflow]'" in err and "Traceback" not in err
    assert not (tmp_path / "b" / "model.safetensors").exists()  # refused before any training
