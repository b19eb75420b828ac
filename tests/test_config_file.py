"""Config files in sections: what ``--print-config`` prints reads back as the same options, a
section takes its own options only, and flags override the file."""

from __future__ import annotations

import argparse

import pytest
import yaml

from nferd.cli.main import main
from nferd.cli.options import CLIError
from nferd.cli.parser import parse_args

FLAGS = ["train", "--data", "d", "--category", "bottle", "--out", "o", "--epochs", "3", "--no-cross-fit",
         "--bank-stages", "2,3", "--teacher", "resnet18", "--lr", "0.001", "--mlflow"]


def _options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}


def test_print_config_reads_back_as_the_same_options(tmp_path, capsys) -> None:
    assert main([*FLAGS, "--print-config"]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert {"model", "dataset", "training", "tracking"} <= set(data)
    assert data["model"]["teacher"] == "resnet18" and data["dataset"]["data"] == "d"
    assert data["training"]["epochs"] == 3 and data["training"]["no-cross-fit"] is True
    assert data["out"] == "o" and not (tmp_path / "o").exists()  # printed, nothing ran
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    assert _options(parse_args(["train", "--config", str(cfg)])) == _options(parse_args(FLAGS))


def test_a_section_takes_its_own_options_only(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {data: d}\nout: o\ntraining: {teacher: resnet18}\n")
    with pytest.raises(CLIError, match="section training has no option 'teacher'.*epochs"):
        parse_args(["train", "--config", str(cfg)])


def test_flags_override_a_sectioned_file_and_a_file_fills_required_options(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: {data: d, category: bottle}\nout: o\ntraining: {epochs: 7, cross_fit: false}\n"
                   "model: {preset: patchcore}\n")
    args = parse_args(["train", "--config", str(cfg), "--epochs", "9"])
    assert (args.data, args.category, args.out, args.epochs, args.cross_fit, args.preset) == \
        ("d", "bottle", "o", 9, False, "patchcore")


def test_a_bad_value_in_a_section_names_the_flag_and_the_file(tmp_path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("training: {epochs: 0}\n")
    assert main(["train", "--data", "d", "--out", "o", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "argument --epochs" in err and "run.yaml" in err and len(err.strip().splitlines()) == 1
