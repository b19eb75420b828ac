"""Every option is checked before any work: one line naming the option and its range, exit 2, the
same from the command line and from a --config file, and nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from nferd.cli import main
from nferd.engine.checkpoint import save_checkpoint
from nferd.models.nferd import NFERD, ModelConfig

CAT = "synthetic_tiles"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A loadable checkpoint (random weights): a verb that skipped a check would start working on it."""
    path = tmp_path_factory.mktemp("ckpt") / "run"
    save_checkpoint(path, NFERD(ModelConfig(image_size=64, n_bank=4, top_k=2), teacher_weights="random"))
    return path


def bases(data: Path, ckpt: Path, tmp: Path) -> dict[str, list[str]]:
    """Valid arguments of each verb (cheap settings, so a missing check fails fast instead of hanging)."""
    out = str(tmp / "out")
    img = str(data / CAT / "test" / "good" / "000.png")
    tiny = ["--image-size", "64", "--n-bank", "4", "--top-k", "2"]
    return {
        "demo": ["--out", out, "--epochs", "1"],
        "synth": ["--out", out, "--n-train", "2"],
        "info": ["--teacher-weights", "random", *tiny],
        "train": ["--data", str(data), "--category", CAT, "--out", out, *tiny, "--epochs", "1", "--batch-size", "4"],
        "test": ["--checkpoint", str(ckpt), "--data", str(data), "--category", CAT, "--out", out],
        "predict": ["--checkpoint", str(ckpt), img, "--out", out],
        "calibrate": ["--checkpoint", str(ckpt), "--normal-dir", str(data / CAT / "test" / "good")],
        "diagnose": ["--checkpoint", str(ckpt), "--data", str(data), "--category", CAT],
        "export": ["--checkpoint", str(ckpt), "--out", str(tmp / "out" / "m.onnx"), "--no-check"],
        "speed": ["--image-size", "64", "--batch-size", "2", "--train-steps", "1", "--infer-iters", "1"],
        "benchmark": ["run", "--data", str(data), "--categories", CAT, "--results", str(tmp / "out" / "r"),
                      "--work", str(tmp / "out" / "w"), "--epochs", "1", "--image-size", "64"],
        "serve": ["--checkpoint", str(ckpt)],
    }


CUDA_CASE = ("cuda:99", "torch sees") if torch.cuda.is_available() else ("cuda", "CUDA GPU")

# (verb, option, bad value, part of the message that states the allowed range)
BAD = [
    ("train", "--epochs", "0", "an integer >= 1"),
    ("train", "--epochs", "-3", "an integer >= 1"),
    ("train", "--batch-size", "0", "an integer >= 1"),
    ("train", "--batch-size", "-4", "an integer >= 1"),
    ("train", "--image-size", "1000000", "a multiple of 32 from 64 to 4096"),
    ("train", "--image-size", "100", "a multiple of 32 from 64 to 4096"),
    ("train", "--checkpoint-every", "0", "an integer >= 1"),
    ("train", "--patch-limit", "0", "an integer >= 1"),
    ("train", "--temperature", "0", "a number > 0"),
    ("train", "--lr", "0", "a number > 0"),
    ("train", "--lr", "nan", "a number > 0"),
    ("train", "--seed", "-1", "an integer from 0 to 4294967295"),
    ("train", "--n-bank", "1", "an integer >= 2"),
    ("train", "--top-k", "0", "an integer >= 1"),
    ("train", "--top-k", "4", "from 1 to --n-bank - 1 = 3"),
    ("train", "--holdout", "-0.5", "a number >= 0 and < 1"),
    ("train", "--holdout", "1", "a number >= 0 and < 1"),
    ("train", "--false-alarm-rate", "2", "a number > 0 and < 1"),
    ("train", "--false-alarm-rate", "0", "a number > 0 and < 1"),
    ("train", "--device", "tpu", "auto, cpu, cuda, cuda:N or mps"),
    ("train", "--device", CUDA_CASE[0], CUDA_CASE[1]),
    ("train", "--out", "{file}/run", "is a file, not a folder"),
    ("train", "--feature-cache-dir", "{file}/cache", "is a file, not a folder"),
    ("train", "--teacher-weights", "{tmp}/missing.pth", "no file"),
    ("info", "--image-size", "1000000", "a multiple of 32 from 64 to 4096"),
    ("info", "--n-bank", "1", "an integer >= 2"),
    ("demo", "--epochs", "0", "an integer >= 1"),
    ("demo", "--seed", "-1", "an integer from 0 to 4294967295"),
    ("demo", "--out", "{file}/demo", "is a file, not a folder"),
    ("synth", "--n-train", "0", "an integer >= 1"),
    ("synth", "--seed", "-5", "an integer from 0 to 4294967295"),
    ("test", "--batch-size", "0", "an integer >= 1"),
    ("test", "--report-gallery", "-1", "an integer >= 0"),
    ("test", "--device", "tpu", "auto, cpu, cuda, cuda:N or mps"),
    ("test", "--out", "{file}/res", "is a file, not a folder"),
    ("predict", "--batch-size", "-1", "an integer >= 1"),
    ("predict", "--device", "tpu", "auto, cpu, cuda, cuda:N or mps"),
    ("predict", "--out", "{file}/pred", "is a file, not a folder"),
    ("calibrate", "--false-alarm-rate", "2", "a number > 0 and < 1"),
    ("calibrate", "--batch-size", "0", "an integer >= 1"),
    ("calibrate", "--device", "tpu", "auto, cpu, cuda, cuda:N or mps"),
    ("diagnose", "--device", "tpu", "auto, cpu, cuda, cuda:N or mps"),
    ("export", "--opset", "3", "an integer from 17 to 20"),
    ("export", "--out", "{tmp}", "is a folder"),
    ("speed", "--image-size", "1000000", "a multiple of 32 from 64 to 4096"),
    ("speed", "--batch-size", "0", "an integer >= 1"),
    ("speed", "--train-steps", "0", "an integer >= 1"),
    ("speed", "--infer-iters", "0", "an integer >= 1"),
    ("speed", "--device", "tpu", "auto, cpu, cuda, cuda:N or mps"),
    ("benchmark", "--seeds", "0,-2", "each an integer from 0 to 4294967295"),
    ("benchmark", "--epochs", "0", "an integer >= 1"),
    ("benchmark", "--threads", "0", "an integer >= 1"),
    ("benchmark", "--image-size", "100", "a multiple of 32 from 64 to 4096"),
    ("benchmark", "--device", "tpu", "auto, cpu, cuda, cuda:N or mps"),
    ("benchmark", "--results", "{file}/r", "is a file, not a folder"),
    ("serve", "--port", "70000", "an integer from 1 to 65535"),
    ("serve", "--port", "-1", "an integer from 1 to 65535"),
    ("serve", "--max-upload-mb", "0", "a number > 0"),
    ("serve", "--max-queue", "-1", "an integer >= 0"),
    ("serve", "--max-batch-files", "0", "an integer >= 1"),
    ("serve", "--max-image-memory-mb", "0", "a number > 0"),
    ("serve", "--device", "tpu", "auto, cpu, cuda, cuda:N or mps"),
]


def without(args: list[str], option: str) -> list[str]:
    """``args`` without ``option`` and its value (so a config file's value is not overridden)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        else:
            out.append(a)
    return out


def snapshot(*folders: Path) -> dict[str, tuple[int, int] | None]:
    """Every entry under ``folders``: files with size and modification time, folders by name."""
    snap: dict[str, tuple[int, int] | None] = {}
    for folder in folders:
        for p in folder.rglob("*"):
            st = p.lstat()
            snap[str(p)] = None if p.is_dir() and not p.is_symlink() else (st.st_size, st.st_mtime_ns)
    return snap


def run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, err


@pytest.mark.parametrize("verb,option,value,allowed", BAD, ids=[f"{v} {o} {x}" for v, o, x, _ in BAD])
def test_bad_option_is_refused_before_any_work(verb, option, value, allowed, synth_root, ckpt, tmp_path,
                                               capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    value = value.format(file=blocker, tmp=tmp_path)
    base = without(bases(synth_root, ckpt, tmp_path)[verb], option)
    before = snapshot(tmp_path, ckpt.parent, synth_root)

    rc, err = run([verb, *base, option, value], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nferd: error:"), err  # one message
    assert option in lines[0] and allowed in lines[0], err
    assert snapshot(tmp_path, ckpt.parent, synth_root) == before  # nothing created or changed: no work started
    assert not (tmp_path / "out").exists()

    # the same value from a config file: the same message (plus where it came from), nothing written
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({option.lstrip("-"): yaml.safe_load(value)}))
    before = snapshot(tmp_path, ckpt.parent, synth_root)
    rc, cfg_err = run([verb, *base, "--config", str(cfg)], capsys)
    assert rc == 2
    assert cfg_err.strip().startswith(lines[0].removesuffix(".")), (err, cfg_err)
    assert len(cfg_err.strip().splitlines()) == 1
    assert snapshot(tmp_path, ckpt.parent, synth_root) == before
    assert not (tmp_path / "out").exists()


def test_config_file_values_of_the_wrong_kind_name_the_option(synth_root, ckpt, tmp_path, capsys) -> None:
    base = bases(synth_root, ckpt, tmp_path)["train"]
    for text, option in [("resume: 'no'\n", "--resume"), ("epochs: 2.5\n", "--epochs"),
                         ("category: [a, b]\n", "--category"), ("batch-size: true\n", "--batch-size")]:
        cfg = tmp_path / "run.yaml"
        cfg.write_text(text)
        rc, err = run(["train", *without(base, option), "--config", str(cfg)], capsys)
        assert rc == 2 and f"argument {option}:" in err and "run.yaml" in err, err
    assert not (tmp_path / "out").exists()


def test_unwritable_checkpoint_is_refused_before_calibrating(synth_root, ckpt, tmp_path, capsys,
                                                            monkeypatch) -> None:
    import nferd.cli.options as options
    real_access = os.access
    monkeypatch.setattr(options.os, "access", lambda p, mode: Path(p) != ckpt and real_access(p, mode))
    before = snapshot(ckpt)
    rc, err = run(["calibrate", *bases(synth_root, ckpt, tmp_path)["calibrate"]], capsys)
    assert rc == 2 and "--checkpoint" in err and "cannot write" in err and str(ckpt) in err, err
    assert snapshot(ckpt) == before


def test_unwritable_out_is_named(tmp_path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
        rc, err = run(["synth", "--out", str(locked / "data")], capsys)
        assert rc == 2 and "--out" in err and str(locked) in err and "cannot write" in err
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_good_options_still_parse(tmp_path) -> None:
    from nferd.cli.parser import parse_args
    args = parse_args(["train", "--data", "d", "--out", "o", "--epochs", "3", "--holdout", "0", "--lr", "1e-3",
                       "--false-alarm-rate", "0.05", "--device", "CPU", "--image-size", "4096"])
    assert (args.epochs, args.holdout, args.lr, args.false_alarm_rate, args.device, args.image_size) == \
        (3, 0.0, 1e-3, 0.05, "cpu", 4096)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("seeds: [0, 1, 2]\nthreads: 2\ndata: root\n")
    args = parse_args(["benchmark", "run", "--config", str(cfg)])
    assert args.seeds == "0,1,2" and args.threads == 2 and args.data == ["root"]


def test_train_flags_default_to_the_config_fields_and_presets_select_designs() -> None:
    """Each option's default lives in its dataclass: a flag that disagrees fails here."""
    import dataclasses

    from nferd.cli.options import model_config_from
    from nferd.cli.parser import parse_args
    from nferd.engine.train import TrainConfig
    from nferd.models.choices import PRESETS
    from nferd.models.nferd import ModelConfig
    args = parse_args(["train", "--data", "d", "--out", "o"])
    late = {"tile_overlap"}  # None: the model's own overlap, 0.25 for a new tiled run
    checked = 0
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            assert value == f.default or (value is None and f.name in late), f"--{f.name.replace('_', '-')}: {value!r}"
            checked += 1
    assert checked >= 12
    assert model_config_from(args) == ModelConfig()
    for name, fields in PRESETS.items():
        args = parse_args(["train", "--data", "d", "--out", "o", "--preset", name])
        assert model_config_from(args) == ModelConfig(**fields), name
