"""Entry point of the ``nferd`` command: parse, check, dispatch to the verb, turn bad input into one line."""

from __future__ import annotations

import sys
import warnings

from ..errors import NferdError
from .options import CLIError, preflight
from .parser import build_parser, parse_args, print_config
from .wording import message


def _show_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
    """nferd's own warnings as one line for the user; other libraries' as Python prints them."""
    if category.__module__.startswith("nferd"):
        print(f"nferd: warning: {message}", file=sys.stderr)
    else:
        _default_show(message, category, filename, lineno, file, line)


_default_show = warnings.showwarning

def main(argv: list[str] | None = None) -> int:
    """Run one ``nferd`` command; returns the exit status (2: bad input, reported in one line)."""
    warnings.showwarning = _show_warning
    try:
        try:
            args = parse_args(argv)
        except SystemExit as e:  # --help / --version (0), or a bad option already reported in one line (2)
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if args.command is None:
            build_parser().print_help()
            return 1
        if args.print_config:
            print_config(args)
            return 0
        preflight(args)  # every check that can fail before any work starts
        if args.command == "bench":
            print("nferd: note: `nferd bench` is now `nferd speed`; the old name goes in the next release",
                  file=sys.stderr)
        return args.func(args) or 0
    except CLIError as e:
        print(f"nferd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nferd: interrupted (the last checkpoint is kept; rerun with --resume)", file=sys.stderr)
        return 130
    except (NferdError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"nferd: error: {message(e)}", file=sys.stderr)  # bad input; any other exception is a bug
        return 2
