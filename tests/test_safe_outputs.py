"""Output files: never written through a planted symbolic link, CSV cells that cannot run as
formulas, and a resume that changes nothing on a finished run and logs each epoch once."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from torch.utils.data import Subset

from nferd.cli import main
from nferd.data.datasets import MVTecDataset
from nferd.engine import safe_io
from nferd.engine.checkpoint import read_metadata
from nferd.engine.evaluate import write_results
from nferd.engine.train import LAST, TrainConfig, Trainer, split_holdout, train
from nferd.models.nferd import NFERD, ModelConfig

CAT = "synthetic_tiles"
TRAIN_ARGS = ["--category", CAT, "--image-size", "64", "--epochs", "2", "--n-bank", "4", "--top-k", "2",
              "--batch-size", "4", "--holdout", "0.25"]


@pytest.fixture(scope="module")
def run_dir(synth_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "ckpt"
    assert main(["train", "--data", str(synth_root), *TRAIN_ARGS, "--out", str(out)]) == 0
    return out


def good_images(synth_root: Path) -> list[Path]:
    return sorted((synth_root / CAT / "test" / "good").glob("*.png"))[:2]


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (links included): its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else os.readlink(p), p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if not p.is_dir() or p.is_symlink()}


# ------------------------------------------------------------------------------- symbolic links
def test_predict_replaces_planted_links_and_leaves_their_targets_unchanged(run_dir, synth_root, tmp_path) -> None:
    images = good_images(synth_root)
    out = tmp_path / "pred"
    (out / "overlays").mkdir(parents=True)
    (out / "maps").mkdir()
    names = ["summary.csv", "summary.json", f"overlays/{images[0].stem}.png", f"maps/{images[1].stem}.npy"]
    victims = {name: tmp_path / f"victim_{i}" for i, name in enumerate(names)}
    for name, victim in victims.items():
        victim.write_text(f"precious {name}")
        (out / name).symlink_to(victim)

    assert main(["predict", "--checkpoint", str(run_dir), *map(str, images), "--out", str(out)]) == 0

    for name, victim in victims.items():
        assert victim.read_text() == f"precious {name}"  # the link's target is untouched
        assert not (out / name).is_symlink() and (out / name).is_file()  # the link was replaced by the output
    assert (out / "summary.csv").read_text().startswith("path,score,")
    assert (out / f"overlays/{images[0].stem}.png").read_bytes().startswith(b"\x89PNG")
    assert (out / f"maps/{images[1].stem}.npy").read_bytes().startswith(b"\x93NUMPY")
    assert not list(out.rglob("*.tmp"))


def test_predict_refuses_a_planted_link_for_a_folder_it_creates(run_dir, synth_root, tmp_path, capsys) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "pred"
    out.mkdir()
    (out / "progress").symlink_to(elsewhere, target_is_directory=True)
    rc = main(["predict", "--checkpoint", str(run_dir), str(good_images(synth_root)[0]), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "progress" in err and "Traceback" not in err
    assert list(elsewhere.iterdir()) == []


def test_user_chosen_out_folder_may_be_a_link(run_dir, synth_root, tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real, target_is_directory=True)
    assert main(["predict", "--checkpoint", str(run_dir), str(good_images(synth_root)[0]),
                 "--out", str(tmp_path / "out")]) == 0
    assert (real / "summary.csv").is_file()


def test_write_helpers_replace_links_and_append_refuses_them(tmp_path) -> None:
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    safe_io.write_text(link, "new")
    assert target.read_text() == "keep" and not link.is_symlink() and link.read_text() == "new"

    log = tmp_path / "log.jsonl"
    log.symlink_to(target)
    with pytest.raises(safe_io.UnsafePathError, match="symbolic link"):
        safe_io.open_append(log)
    os.link(target, tmp_path / "hard.jsonl")  # a second name for the target: appending would change it too
    with pytest.raises(safe_io.UnsafePathError, match="one name"):
        safe_io.open_append(tmp_path / "hard.jsonl")
    assert target.read_text() == "keep"

    (tmp_path / "maps").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(safe_io.UnsafePathError, match="symbolic link"):
        safe_io.make_dir(tmp_path / "maps")


def plant(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def test_exports_and_reports_never_write_through_planted_links(run_dir, synth_root, tmp_path) -> None:
    """At every output name, and at the temporary names a writer that follows links would use."""
    target = tmp_path / "target"
    target.write_text("keep")
    onnx_out = tmp_path / "ex" / "m.onnx"
    for name in ("m.onnx", "m.onnx.tmp"):
        plant(onnx_out.parent / name, target)
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(onnx_out)]) == 0
    assert not onnx_out.is_symlink() and onnx_out.stat().st_size > 1000
    pytest.importorskip("openvino")
    ov_out = tmp_path / "exv" / "ov.xml"
    for name in ("ov.xml", "ov.bin"):
        plant(ov_out.parent / name, target)
    assert main(["export", "--checkpoint", str(run_dir), "--format", "openvino", "--out", str(ov_out)]) == 0
    assert not ov_out.is_symlink() and not ov_out.with_suffix(".bin").is_symlink()
    report = tmp_path / "t"
    for name in ("report.html", "report.html.tmp"):
        plant(report / name, target)
    assert main(["test", "--checkpoint", str(run_dir), "--data", str(synth_root), "--category", CAT,
                 "--out", str(report), "--report"]) == 0
    assert not (report / "report.html").is_symlink() and "<html" in (report / "report.html").read_text()
    assert target.read_text() == "keep"
    leftovers = [p.name for d in (onnx_out.parent, ov_out.parent, report) for p in d.iterdir()
                 if ".tmp" in p.name and p.name not in ("m.onnx.tmp", "report.html.tmp")]
    assert leftovers == []


def test_a_library_that_fails_leaves_nothing_at_the_final_name(tmp_path) -> None:
    out = tmp_path / "model.xml"
    with pytest.raises(RuntimeError):
        with safe_io.staged(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_of_a_killed_prediction_removes_its_temporary_files(run_dir, synth_root, tmp_path) -> None:
    images = good_images(synth_root)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run_dir), *map(str, images), "--out", str(out)]) == 0
    stale = out / "maps" / f"{images[0].stem}.npy.0badc0de.tmp"  # killed between a write and its rename
    stale.write_bytes(b"half")
    (out / "summary.json.12345678.tmp").write_bytes(b"half")
    mine = out / "maps" / "notes.tmp"  # not a name nferd makes: left alone
    mine.write_text("the user's")
    assert main(["predict", "--checkpoint", str(run_dir), *map(str, images), "--out", str(out)]) == 0
    assert not stale.exists() and not (out / "summary.json.12345678.tmp").exists() and mine.is_file()


# ----------------------------------------------------------------------------- CSV formulas
def test_formula_file_name_is_neutralised_in_summary_csv(run_dir, synth_root, tmp_path, monkeypatch) -> None:
    name = '=HYPERLINK("http:evil","click").png'
    shutil.copy(good_images(synth_root)[0], tmp_path / name)
    monkeypatch.chdir(tmp_path)  # the summary's path cell is the path as given: here, the bare file name
    assert main(["predict", "--checkpoint", str(run_dir), name, "--out", "pred"]) == 0
    rows = list(csv.DictReader((tmp_path / "pred" / "summary.csv").open(newline="")))
    assert rows[0]["path"] == "'" + name
    assert float(rows[0]["score"]) == json.loads((tmp_path / "pred" / "summary.json").read_text())[0]["score"]
    assert json.loads((tmp_path / "pred" / "summary.json").read_text())[0]["path"] == name  # JSON keeps the name


def test_neutralise_only_strings_that_start_like_a_formula() -> None:
    for bad in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert safe_io.neutralize_cell(bad) == "'" + bad
    for kept in ("a=1", "bottle", "", None, -0.5, -3, 2.0):
        assert safe_io.neutralize_cell(kept) == kept
    rows = list(csv.reader(safe_io.csv_text(["name", "score"], [["=cmd", -0.5], ["ok", 1]]).splitlines()))
    assert rows == [["name", "score"], ["'=cmd", "-0.5"], ["ok", "1"]]  # a negative score stays a number


def test_results_csv_neutralises_category_names(tmp_path) -> None:
    metrics = {"image_auroc": 0.5, "pixel_auroc": -0.25}
    write_results(tmp_path, {"=cmd|' /C calc'!A0": metrics, "bottle": metrics}, {"teacher": "t"})
    rows = list(csv.reader((tmp_path / "results.csv").read_text().splitlines()))
    assert [r[0] for r in rows] == ["category", "'=cmd|' /C calc'!A0", "bottle", "mean"]
    assert rows[1][1:] == ["0.5", "-0.25"]


# ------------------------------------------------------------------------------------ resume
def test_resume_of_a_finished_run_changes_nothing(run_dir, synth_root, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = files(run)
    capsys.readouterr()
    assert main(["train", "--data", str(synth_root), *TRAIN_ARGS, "--out", str(run), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "finished" in out and "nothing changed" in out and "Traceback" not in err
    assert files(run) == before  # same files, same bytes, same modification times


def small_config() -> ModelConfig:
    return ModelConfig(image_size=64, n_bank=4, top_k=2)


def interrupted_run(synth_root: Path, out: Path, cfg: TrainConfig, stop_after: int) -> None:
    """A run killed after ``stop_after`` epochs (the log may hold epochs after its last checkpoint)."""
    ds = MVTecDataset(synth_root, CAT, "train", 64)
    keep, held = split_holdout(len(ds), cfg.holdout, cfg.seed)
    Trainer(NFERD(small_config()), Subset(ds, keep), cfg, out, Subset(ds, held), progress=False).fit(
        stop_after=stop_after)


def test_resume_logs_each_epoch_once_and_removes_stale_temp_files(synth_root, tmp_path) -> None:
    cfg = TrainConfig(epochs=4, batch_size=4, holdout=0.25, checkpoint_every=2, precision="fp32")
    out = tmp_path / "run"
    interrupted_run(synth_root, out, cfg, stop_after=3)  # epochs 1-3 logged, checkpoint at epoch 2
    assert read_metadata(out / LAST)["epoch"] == 2
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"epoch": 4, "lo')  # killed while writing a line
    stale = [out / "last.safetensors.k1ll3d.tmp", out / "model.safetensors.abcd.tmp", out / "config.json.tmp"]
    keep = [out / "notes.tmp", out / "other.safetensors.abcd.tmp"]  # not nferd's: left alone
    for p in stale + keep:
        p.write_bytes(b"partial")

    _, summary = train(MVTecDataset(synth_root, CAT, "train", 64), small_config(), cfg, out, resume=True,
                       progress=False)

    assert summary["epochs_run"] == 2
    epochs = [json.loads(line)["epoch"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"partial" for p in keep)


def test_resume_after_the_last_checkpoint_but_before_the_model_finishes_it(synth_root, tmp_path) -> None:
    cfg = TrainConfig(epochs=2, batch_size=4, holdout=0.25, checkpoint_every=1, precision="fp32")
    out = tmp_path / "run"
    interrupted_run(synth_root, out, cfg, stop_after=2)  # last epoch done and saved ...
    (out / "model.safetensors").unlink()  # ... killed while calibrating, before the model was written
    (out / "config.json").unlink()
    log = (out / "train_log.jsonl").read_text()

    _, summary = train(MVTecDataset(synth_root, CAT, "train", 64), small_config(), cfg, out, resume=True,
                       progress=False)

    assert summary["epochs_run"] == 0 and summary["final_loss"] == json.loads(log.splitlines()[-1])["loss"]
    assert read_metadata(out)["epoch"] == 2 and read_metadata(out)["calibration"] is not None
    assert (out / "train_log.jsonl").read_text() == log
