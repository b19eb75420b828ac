"""Where and how a figure was measured: date, code, versions, machine and its CPU flags, command.

Every result file nferd writes carries this record, so a figure can be compared only with
figures from the same machine and code.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "neon")


def provenance(threads: int, device: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Where and how a figure was measured: date, code, versions, machine, command."""
    import numpy
    import torch

    from ..version import __version__
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "nferd_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": numpy.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": device,
        "command": shlex.join(["nferd", *(sys.argv[1:] if argv is None else argv)]),
    }


def git_commit() -> str | None:
    """The commit of the source tree this package runs from (``+dirty`` when the package's own
    files have uncommitted changes; results and docs written beside it do not count)."""
    src = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) if head else None


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    m = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.M)
    return m.group(1).strip() if m else platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide CPU speed for this workload (AVX2, AVX-512, AMX, ...)."""
    m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", _cpuinfo(), re.M)
    have = set(m.group(1).split()) if m else set()
    return [f for f in CPU_FLAGS if f in have]
