"""The errors a user can act on, shared by every layer.

``NferdError`` is the base of what is bad input or a file that cannot be used (not a bug): the
command line prints it in one line and exits 2, and a Python caller catches it by type. A message
names the options it suggests with :func:`option`, so that one error reads right in both places:
a Python caller sees the parameter (```n_bank```), the command line its flag (``--n-bank``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_MARK = "\x1f"  # unit separator: never in a path or a value a message quotes
_OPTION = re.compile(f"{_MARK}([a-z][a-z0-9_]*)(?:=([^{_MARK}]*))?{_MARK}")


def option(key: str, python: str | None = None) -> str:
    """Name the option ``key`` inside an error message: ```key``` (or ``python``, e.g.
    ``resume=False``) for a Python caller, its flag on the command line."""
    return f"{_MARK}{key}{'' if python is None else '=' + python}{_MARK}"


def render(message: str, name: Callable[[str], str]) -> str:
    """``message`` with every :func:`option` named by ``name(key)``."""
    return _OPTION.sub(lambda m: name(m.group(1)), message)


def for_python(message: str) -> str:
    """``message`` as a Python caller reads it: each option as ```key``` (or its Python spelling)."""
    return _OPTION.sub(lambda m: m.group(2) if m.group(2) is not None else f"`{m.group(1)}`", message)


class NferdError(Exception):
    """Bad input, or a file or environment that cannot be used; the message says what to do."""

    def __init__(self, message: str = "") -> None:
        self.template = message
        super().__init__(for_python(message))

    def render(self, name: Callable[[str], str]) -> str:
        """The message with its options named by ``name(key)`` (the command line passes its flags)."""
        return render(self.template, name)


class OptionError(NferdError, ValueError):
    """An option's value cannot work (alone, or with the data or the other options)."""


class MissingDependency(NferdError, ImportError):
    """An optional package a feature needs is not installed; the message gives the install command."""
