"""Entry point of the ``nferd`` command: parse, check, dispatch to the verb, turn bad input into one line."""

from __future__ import annotations

import sys
import warnings

from . import deployment, tools, training
from .options import CLIError, preflight
from .parser import build_parser, parse_args


def _show_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
    """nferd's own warnings as one line for the user; other libraries' as Python prints them."""
    if category.__module__.startswith("nferd"):
        print(f"nferd: warning: {message}", file=sys.stderr)
    else:
        _default_show(message, category, filename, lineno, file, line)


_default_show = warnings.showwarning

# each verb and the function that runs it (`bench` is `speed`'s old name)
VERBS = {"demo": training.cmd_demo, "train": training.cmd_train, "test": training.cmd_test,
         "calibrate": training.cmd_calibrate, "predict": deployment.cmd_predict, "serve": deployment.cmd_serve,
         "export": deployment.cmd_export, "mvtec-ad2-submission": deployment.cmd_mvtec_ad2_submission,
         "synth": tools.cmd_synth, "info": tools.cmd_info, "diagnose": tools.cmd_diagnose, "speed": tools.cmd_speed,
         "bench": tools.cmd_speed, "benchmark": tools.cmd_benchmark}


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    """Run one ``nferd`` command; returns the exit status (2: bad input, reported in one line)."""
    try:
        try:
            args = parse_args(argv)
        except SystemExit as e:  # --help / --version (0), or a bad option already reported in one line (2)
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if args.command is None:
            build_parser().print_help()
            return 1
        preflight(args)  # every check that can fail before any work starts
        if args.command == "bench":
            print("nferd: note: `nferd bench` is now `nferd speed`; the old name goes in the next release",
                  file=sys.stderr)
        return VERBS[args.command](args) or 0
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
