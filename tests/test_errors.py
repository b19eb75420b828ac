"""Errors a user can act on: typed, and naming options as the caller knows them (a parameter in
Python, a flag on the command line)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import nferd
from nferd.cli.main import main
from nferd.cli.parser import COMMANDS
from nferd.cli.wording import flag, message
from nferd.errors import MissingDependency, NferdError, OptionError, option

SRC = Path(nferd.__file__).parent


def test_an_option_reads_as_a_parameter_in_python_and_as_a_flag_on_the_command_line() -> None:
    e = OptionError(f"{option('n_bank')} 9 is larger than the 4 training images; lower {option('n_bank')}, "
                    f"or pass {option('fresh', 'resume=False')} into {option('out_dir')}")
    assert str(e) == "`n_bank` 9 is larger than the 4 training images; lower `n_bank`, or pass resume=False into " \
                     "`out_dir`"
    assert message(e) == "--n-bank 9 is larger than the 4 training images; lower --n-bank, or pass --fresh into --out"
    assert isinstance(e, ValueError) and isinstance(e, NferdError)
    assert message(ValueError("plain")) == "plain"


def test_a_message_without_options_is_left_alone() -> None:
    text = "'/data/{run}/a.png' has {'teacher': 'x'} in it"  # braces in paths and reprs are not options
    assert str(NferdError(text)) == text and message(NferdError(text)) == text


def _all_flags(capsys: pytest.CaptureFixture[str]) -> set[str]:
    flags: set[str] = set()
    for verb in COMMANDS:
        assert main([verb, "--help"]) == 0
        flags |= set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
    return flags


def test_every_option_a_library_error_names_is_a_real_flag(capsys: pytest.CaptureFixture[str]) -> None:
    named = {k for f in SRC.rglob("*.py") for k in re.findall(r"option\('([a-z_0-9]+)'", f.read_text())}
    assert len(named) >= 15  # the messages below the command line name their options this way
    missing = sorted(f"{k} -> {flag(k)}" for k in named if flag(k) not in _all_flags(capsys))
    assert not missing, missing


def _raised_texts(path: Path) -> list[tuple[int, str]]:
    """The literal text of every ``raise`` in ``path``, by line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            parts = [n.value for n in ast.walk(node.exc) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            found.append((node.lineno, "".join(parts)))
    return found


def test_only_typed_errors_name_options() -> None:
    """An ``option()`` mark is rendered by ``NferdError`` alone: raised in a plain ``ValueError`` it
    would reach the user as control characters and a bare key."""
    import importlib

    def typed(cls: object) -> bool:
        return isinstance(cls, type) and issubclass(cls, NferdError)

    untyped = []
    for f in SRC.rglob("*.py"):
        module = None
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            if not any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "option" for n in ast.walk(node.exc)):
                continue
            name = ast.unparse(node.exc.func)
            if module is None:
                parts = f.relative_to(SRC.parent).with_suffix("").parts
                module = importlib.import_module(".".join(p for p in parts if p != "__init__"))
            if not typed(eval(name, vars(module))):
                untyped.append(f"{f.relative_to(SRC)}:{node.lineno}: {name}")
    assert not untyped, untyped


def test_no_flag_is_spelled_out_below_the_command_line() -> None:
    """Library code names options with ``option()``, so a Python caller never reads ``--n-bank``
    (a whole command to run, in backquotes, may still be suggested)."""
    spelled = []
    for f in SRC.rglob("*.py"):
        if "cli" in f.relative_to(SRC).parts:
            continue
        for line, text in _raised_texts(f):
            if re.search(r"(?<![\w-])--[a-z]", re.sub(r"`[^`]*`", "", text)):
                spelled.append(f"{f.relative_to(SRC)}:{line}: {text[:80]}")
    assert not spelled, spelled


def test_an_engine_error_reaches_the_command_line_with_its_flags(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--n-train", "6"]) == 0
    capsys.readouterr()
    code = main(["benchmark", "run", "--data", str(data), "--categories", "synthetic_tiles", "--train-images", "50",
                 "--epochs", "1", "--image-size", "64", "--teacher", "efficientnet_lite0",
                 "--results", str(tmp_path / "r"), "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and "--train-images 50 is more than the" in err and "`" not in err and "Traceback" not in err


def test_a_missing_optional_package_is_an_error_the_user_can_act_on() -> None:
    assert issubclass(MissingDependency, ImportError) and issubclass(MissingDependency, NferdError)
