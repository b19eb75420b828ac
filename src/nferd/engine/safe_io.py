"""Output files written without following symbolic links, and CSV cells that cannot run as formulas.

Whole files (maps, masks, overlays, summaries, results, logs rewritten on resume) are written to a
new temporary file in the same folder and renamed onto their final name: the rename replaces a
symbolic link planted at that name instead of writing through it, and a reader never sees half a
file. Files that grow a line at a time (progress and training logs) are opened with
``O_NOFOLLOW`` and refused when they are a link or have a second hard link.

Files a library writes by name (ONNX, OpenVINO's .xml and .bin, safetensors) are written by
:func:`staged` into a fresh private folder beside their final place, then renamed into place the
same way.

Policy: the output folder the user names (``--out``) may itself be a symbolic link; it is the
user's choice and is followed. Sub-folders nferd creates inside it (``maps``, ``overlays``,
``progress``, ...) must be real folders, and no file inside them is ever written through a link.
"""

from __future__ import annotations

import csv
import io
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..errors import NferdError
from . import jsonio

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # OWASP: cells a spreadsheet may read as a formula


class UnsafePathError(NferdError, ValueError):
    """An output path is a symbolic link (or a hard-linked file) that nferd refuses to write through."""


def temp_name(path: Path) -> Path:
    """``NAME.<random>.tmp`` next to ``path``: the pattern ``remove_stale_temps`` cleans up."""
    return path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; a symbolic link at ``path`` is replaced, never followed."""
    path = Path(path)
    while True:
        tmp = temp_name(path)
        try:  # O_EXCL | O_NOFOLLOW: a fresh file, never something planted under the temporary name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # rename(2) replaces a link at `path` itself
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``write_bytes`` of UTF-8 text."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, **kw: Any) -> Path:
    """``obj`` as indented strict JSON, atomically (``kw`` goes to ``jsonio.dumps``: ``default=str``,
    ``nulls=False`` to refuse a non-finite value instead of writing null)."""
    return write_text(path, jsonio.dumps(obj, indent=2, **kw) + "\n")


def neutralize_cell(value: Any) -> Any:
    """A string a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, carriage
    return first) gets a leading single quote; numbers and other values are returned as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV of ``header`` and ``rows`` with every string cell passed through ``neutralize_cell``."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow([neutralize_cell(h) for h in header])
    for row in rows:
        w.writerow([neutralize_cell(v) for v in row])
    return buf.getvalue()


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """``csv_text`` written atomically."""
    return write_text(path, csv_text(header, rows))


def write_dict_csv(path: str | Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
    """One CSV row per dict (keys outside ``columns`` ignored, missing ones empty), written atomically."""
    return write_csv(path, columns, ([r.get(c) for c in columns] for r in rows))  # None -> empty cell


def save_image(path: str | Path, image: Any, format: str = "PNG") -> Path:
    """A PIL image encoded in memory, then written atomically."""
    buf = io.BytesIO()
    image.save(buf, format=format)
    return write_bytes(path, buf.getvalue())


def save_npy(path: str | Path, array: Any) -> Path:
    """A NumPy array as ``.npy``, written atomically."""
    import numpy as np
    buf = io.BytesIO()
    np.save(buf, array)
    return write_bytes(path, buf.getvalue())


@contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """A path to hand a library that writes ``path`` (and files beside it) by name: it lies in a
    new folder only this process can enter, and every file written there is renamed next to
    ``path`` when the block ends without an error. A link planted at a final name is replaced,
    never followed; on an error nothing reaches the final names."""
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield folder / path.name
        for f in sorted(folder.iterdir()):
            if f.is_symlink() or not f.is_file():
                raise UnsafePathError(f"'{f}' is not a plain file; nothing was written at '{path}'")
        for f in sorted(folder.iterdir(), key=lambda f: f == folder / path.name):  # `path` itself last
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def make_dir(path: str | Path) -> Path:
    """Create a folder nferd owns (and its parents); refuse one that is a symbolic link."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafePathError(f"'{path}' is a symbolic link; nferd writes its outputs only into real folders: "
                              "remove the link or write somewhere else")
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise UnsafePathError(f"'{path}' is not a folder")
    return path


def open_append(path: str | Path) -> IO[str]:
    """Open a text file for appending without following a symbolic link; refuse a link, a
    non-regular file, or a file with another hard link (writing would change that other name too)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _BINARY, 0o666)
    except OSError as e:
        if path.is_symlink():
            raise UnsafePathError(f"'{path}' is a symbolic link; nferd does not write through it: remove it") from e
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise UnsafePathError(f"'{path}' is not a plain file with one name; nferd does not append to it: remove it")
    return os.fdopen(fd, "a", encoding="utf-8")


def remove_own_temps(folder: str | Path) -> list[Path]:
    """Delete every ``NAME.<random>.tmp`` file in ``folder`` (what ``write_bytes`` leaves when the
    process is killed between its write and its rename); returns the removed paths."""
    removed = []
    for p in Path(folder).glob("*.tmp"):
        if re.fullmatch(r".+\.[0-9a-f]{8}\.tmp", p.name) and (p.is_symlink() or p.is_file()):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def remove_stale_temps(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete temporary files an interrupted atomic write left in ``folder`` (``NAME.<random>.tmp``
    or ``NAME.tmp`` for each of ``names``); returns the removed paths."""
    folder = Path(folder)
    removed = []
    for name in names:
        for p in [*folder.glob(f"{name}.*.tmp"), folder / f"{name}.tmp"]:
            if p.is_symlink() or p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
            elif p.is_dir():  # a folder `staged` left
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed
