"""Config files: every option of a verb from a YAML or JSON file, flags on the command line over it.

A file is a mapping of option names (the flag without its dashes; ``-`` or ``_``) to values,
either flat or in sections named after the option groups of ``--help``: ``model``, ``dataset``,
``training``, ``tracking``. A section only takes its own options, so a misplaced key is an error
and not a silent no-op. ``nferd VERB ... --print-config`` prints the options of a command in
this form, a file to start from. A value is checked exactly as the same flag's value is, and an
error names the flag and the file.

The options of each verb are recorded as they are added to its parser (:class:`Recorder`), so the
file is read against what the parser declares, in one place, without argparse's internals.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .options import CLIError

SECTIONS = ("model", "dataset", "training", "tracking")
FLAG_ACTIONS = ("store_true", "store_false")  # options that take no value: true or false in a file
NOT_IN_FILES = ("config", "print_config", "help")


@dataclass
class Option:
    """One flag of a verb, as its parser declares it."""

    action: argparse.Action  # the object ``add_argument`` returned (its ``dest``, ``type``, ``choices``, ...)
    flag: str  # the long flag, e.g. --n-bank
    kind: str  # "value", "flag" (store_true / store_false) or "repeated" (one value per element of a list)
    section: str | None  # the option group, when it is one of SECTIONS


class Recorder:
    """Adds options to a parser or to one of its groups, and records each in ``options`` (by dest)."""

    def __init__(self, target: Any, options: dict[str, Option], section: str | None = None) -> None:
        self.target, self.options, self.section = target, options, section

    def add_argument(self, *flags: str, **kw: Any) -> argparse.Action:
        action = self.target.add_argument(*flags, **kw)
        longs = [f for f in flags if f.startswith("--")]
        if longs and action.dest not in NOT_IN_FILES:
            act = kw.get("action")
            kind = "flag" if act in FLAG_ACTIONS else "repeated" if act == "append" or kw.get("nargs") else "value"
            self.options[action.dest] = Option(action, max(longs, key=len), kind, self.section)
        return action

    def add_argument_group(self, title: str, *args: Any, **kw: Any) -> Recorder:
        group = self.target.add_argument_group(title, *args, **kw)
        return Recorder(group, self.options, title if title in SECTIONS else self.section)

    def set_defaults(self, **kw: Any) -> None:
        self.target.set_defaults(**kw)


def load(path: str) -> dict[str, Any]:
    """The file's mapping, sections kept."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file '{path}' does not exist")
    try:
        text = p.read_text()
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:
        raise CLIError(f"cannot parse config file '{path}': {e}") from e
    if not isinstance(data, dict):
        raise CLIError(f"config file '{path}' must hold a mapping of option: value")
    return data


def _by_key(options: dict[str, Option]) -> dict[str, tuple[str, bool]]:
    """Every name a file may use for an option, to its dest and whether the name is the flag's
    (``no_cross_fit: true`` is the flag given; ``cross_fit: false`` says the same by its dest)."""
    names = {dest: (dest, False) for dest in options}
    names.update({o.flag.lstrip("-").replace("-", "_"): (dest, True) for dest, o in options.items()})
    return names


def _value(option: Option, v: Any, by_flag: bool, where: str) -> Any:
    if option.kind != "flag":
        return v
    if not isinstance(v, bool):
        raise CLIError(f"argument {option.flag}: must be true or false, got {v!r} (in config file '{where}')")
    return (option.action.const if v else not option.action.const) if by_flag else v


def flatten(data: dict[str, Any], options: dict[str, Option], where: str) -> dict[str, Any]:
    """The file's values by dest (a flag's as its dest's value); sections checked to hold their
    own options only."""
    names, flat = _by_key(options), {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS and isinstance(value, dict) and key not in names:
            for k, v in value.items():
                k = str(k).replace("-", "_")
                if k not in names or options[names[k][0]].section != key:
                    known = ", ".join(o.flag.lstrip("-") for o in options.values() if o.section == key) or "none"
                    raise CLIError(f"config file '{where}': section {key} has no option '{k}' (its options: "
                                   f"{known})")
                dest, by_flag = names[k]
                flat[dest] = _value(options[dest], v, by_flag, where)
        elif key in names:
            dest, by_flag = names[key]
            flat[dest] = _value(options[dest], value, by_flag, where)
        else:
            raise CLIError(f"config file '{where}' has unknown option(s): {key}")
    return flat


def _text(v: Any) -> str:
    """A file's value for a text option (a path, a name): numbers become text, nothing else does."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise argparse.ArgumentTypeError(f"must be text, got {v!r}")
    return str(v)


def convert(option: Option, v: Any, where: str) -> Any:
    """A file's value checked and converted as the flag's value would be."""
    if option.kind == "flag" or v is None:
        return v
    action, suffix = option.action, f" (in config file '{where}')"
    try:
        convert_one = action.type or _text
        if option.kind == "repeated":
            v = [convert_one(x) for x in (v if isinstance(v, list) else [v])]
        else:
            v = convert_one(v)  # a list is one value here (bank-stages: [2, 3])
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise CLIError(f"argument {option.flag}: {e}{suffix}") from e
    if action.choices is not None and v not in action.choices:
        raise CLIError(f"argument {option.flag}: must be one of {', '.join(map(str, action.choices))}, "
                       f"got {v!r}{suffix}")
    return v


def apply(parser: argparse.ArgumentParser, options: dict[str, Option], path: str) -> None:
    """Make the file's values the defaults of ``parser``: flags given on the command line win, and
    a value from the file fills a required option."""
    values = {dest: convert(options[dest], v, path) for dest, v in flatten(load(path), options, path).items()}
    for dest in values:
        options[dest].action.required = False
    parser.set_defaults(**values)


def as_file(args: argparse.Namespace, options: dict[str, Option]) -> dict[str, Any]:
    """The parsed options as a config file's mapping, in sections (what ``--print-config`` prints):
    each by its flag's name, a store_false flag (``no-cross-fit``) as whether it is given."""
    out: dict[str, Any] = {}
    for dest, o in options.items():
        v = getattr(args, dest, None)
        if o.kind == "flag":
            v = v == o.action.const
        elif isinstance(v, tuple):
            v = list(v)
        (out.setdefault(o.section, {}) if o.section else out)[o.flag.lstrip("-")] = v
    return out
