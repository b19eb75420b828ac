"""The command line's wording of library errors: the options they name, as flags."""

from __future__ import annotations

# Python names whose flag is not ``--`` + the name with dashes
FLAGS = {"out_dir": "--out", "root": "--data", "data_format": "--format", "include_preprocess": "--preprocess"}


def flag(key: str) -> str:
    """The command-line flag of the option a library error names (``n_bank`` -> ``--n-bank``)."""
    return FLAGS.get(key, "--" + key.replace("_", "-"))


def message(e: BaseException) -> str:
    """An error's text as the command line says it: the options it names are flags."""
    from ..errors import NferdError
    return e.render(flag) if isinstance(e, NferdError) else str(e)
