"""Entry point of the ``nferd`` command: parse, dispatch to the verb, turn bad input into one line."""

from __future__ import annotations

import sys

from . import commands
from .options import CLIError
from .parser import build_parser, parse_args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 1
        return getattr(commands, f"cmd_{args.command}")(args) or 0
    except CLIError as e:
        print(f"nferd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nferd: interrupted (the last checkpoint is kept; rerun with --resume)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not type(e).__module__.startswith("nferd"):
            raise  # a bug, not bad input: keep the traceback
        print(f"nferd: error: {e}", file=sys.stderr)
        return 2
