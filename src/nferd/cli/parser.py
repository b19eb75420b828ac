"""Argument parsing of the ``nferd`` command: one sub-parser per verb, with an example each.

Every option can also come from a YAML/JSON file (``--config run.yaml``, keys = option names
with dashes or underscores); flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NamedTuple, NoReturn

from ..deploy.onnx_format import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from ..models.choices import DEFAULT_TEACHER, FUSIONS, LR_SCHEDULES, PRESETS, TEACHER_NAMES
from ..version import __version__
from . import config_file, deployment, tools, training
from .config_file import Option, Recorder
from .options import (
    DEVICES,
    IMAGE_SIZE_HELP,
    IntRange,
    add_data_options,
    add_folder_test_options,
    add_model_options,
    add_tiling_options,
    add_tracking_options,
    device,
    fraction_open,
    holdout_fraction,
    image_size_int,
    non_negative_int,
    on_off,
    port_int,
    positive_float,
    positive_int,
    seed_int,
    seed_list,
)

DEVICE_HELP = f"{DEVICES} (default auto: cuda when torch sees a GPU, else cpu)"

EXAMPLES = {
    "demo": "nferd demo --out runs/demo",
    "synth": "nferd synth --out data/synthetic --seed 0",
    "info": "nferd info --teacher wide_resnet50_2 --image-size 256 --json",
    "train": ("nferd train --data /data/mvtec_ad --category bottle --teacher wide_resnet50_2 --epochs 200 "
              "--out runs/bottle\n  nferd train --data /data/mvtec_ad --category bottle --bank off "
              "--out runs/bottle-rd   # RD4AD baseline\n  nferd train --config run.yaml --epochs 50"),
    "test": ("nferd test --checkpoint runs/bottle --data /data/mvtec_ad --category bottle --out runs/bottle/test"
             " --report"),
    "predict": ("nferd predict --checkpoint runs/bottle 'line3/*.png' more.jpg --out runs/bottle/pred\n"
                "  nferd predict --backend onnx --model runs/bottle/model.onnx 'line3/*.png' --out runs/bottle/pred"),
    "export": ("nferd export --checkpoint runs/bottle --format onnx --out runs/bottle/model.onnx\n"
               "  nferd export --checkpoint runs/bottle --format onnx --preprocess --out runs/bottle/model_u8.onnx\n"
               "  nferd export --checkpoint runs/bottle --format openvino --int8 --out runs/bottle/model_int8.xml"),
    "calibrate": ("nferd calibrate --checkpoint runs/bottle --normal-dir val/good --abnormal-dir val/defect "
                  "--mask-dir val/masks\n  nferd calibrate --checkpoint runs/tire --data /data/mvtec_3d --category tire"
                  "   # ROOT/C/validation"),
    "diagnose": "nferd diagnose --checkpoint runs/bottle --data /data/mvtec_ad --category bottle",
    "speed": "nferd speed --teacher wide_resnet50_2 --image-size 256 --batch-size 16 --reference --json",
    "mvtec-ad2-submission": ("nferd mvtec-ad2-submission --checkpoint runs/ad2 --data /data/mvtec_ad_2 "
                             "--category all --out submission"),
    "benchmark": ("nferd benchmark run --data /data/mvtec_ad --categories bottle,cable --models rd4ad,patchcore,nferd "
                  "--seeds 0,1,2\n  nferd benchmark table"),
    "serve": "nferd serve --checkpoint runs/bottle --host 0.0.0.0 --port 8000   # page at http://HOST:8000/",
}


# each verb and the function that runs it (``bench`` is ``speed``'s old name, an alias)
COMMANDS = {"demo": training.cmd_demo, "train": training.cmd_train, "test": training.cmd_test,
            "calibrate": training.cmd_calibrate, "predict": deployment.cmd_predict, "serve": deployment.cmd_serve,
            "export": deployment.cmd_export, "mvtec-ad2-submission": deployment.cmd_mvtec_ad2_submission,
            "synth": tools.cmd_synth, "info": tools.cmd_info, "diagnose": tools.cmd_diagnose, "speed": tools.cmd_speed,
            "benchmark": tools.cmd_benchmark}


class Verb(NamedTuple):
    parser: argparse.ArgumentParser
    options: dict[str, Option]  # by dest, as the verb's parser declares them (for config files)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``nferd: error: argument --X: ...``), exit 2;
    ``verbs`` holds each sub-command's parser and options."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.verbs: dict[str, Verb] = {}

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"nferd: error: {message}\n")


def build_parser() -> Parser:
    ap = Parser(prog="nferd", description="NFERD anomaly detection: train on normal images, "
                                 "find and localise defects.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()))
    ap.add_argument("--version", action="version", version=f"nferd {__version__}")
    sub = ap.add_subparsers(dest="command")

    def cmd(name: str, help: str, aliases: tuple[str, ...] = ()) -> Recorder:
        p = sub.add_parser(name, aliases=list(aliases), help=help, description=help,
                           epilog="example:\n  " + EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=COMMANDS[name])
        p.add_argument("--config", default=None, metavar="FILE",
                       help="YAML/JSON file of options, flat or in sections (flags override it)")
        p.add_argument("--print-config", action="store_true",
                       help="print these options as a config file and exit (nothing runs)")
        verb = ap.verbs[name] = Verb(p, {})
        for alias in aliases:
            ap.verbs[alias] = verb
        return Recorder(p, verb.options)

    p = cmd("demo", "generate the embedded synthetic dataset, train NFERD on it, test, and write overlays")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=positive_int, default=40, help="training epochs (>= 1; default 40)")
    p.add_argument("--seed", type=seed_int, default=0, help="0 to 2**32 - 1 (default 0)")

    p = cmd("synth", "write the embedded synthetic inspection dataset in MVTec layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=seed_int, default=0, help="0 to 2**32 - 1 (default 0)")
    p.add_argument("--n-train", type=positive_int, default=60, help="normal training images (>= 1; default 60)")

    p = cmd("info", "parameter counts and forward GFLOPs of a model configuration")
    add_model_options(p)
    p.add_argument("--json", action="store_true")

    p = cmd("train", "train NFERD (or RD4AD with --bank off) on normal images")
    add_model_options(p)
    add_data_options(p)
    add_tiling_options(p, training=True)
    add_tracking_options(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=200, help="training epochs (>= 1; default 200)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="images per optimiser step (>= 1; default 16)")
    g.add_argument("--lr", type=positive_float, default=0.005, help="Adam learning rate (> 0; default 0.005)")
    g.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES,
                   help="constant (RD4AD's recipe) or cosine: the lr falls to 0 over the epochs, so the last "
                        "epoch, which is the model, is not a snapshot of a noisy walk (default constant)")
    g.add_argument("--seed", type=seed_int, default=0, help="0 to 2**32 - 1 (default 0)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    g.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    g.add_argument("--holdout", type=holdout_fraction, default=0.1,
                   help="fraction of training images kept out for calibration when the data has no "
                        "validation/good folder (>= 0 and < 1; default 0.1)")
    g.add_argument("--false-alarm-rate", type=fraction_open, default=0.01,
                   help="calibration target on normal images (> 0 and < 1; default 0.01)")
    g.add_argument("--no-cross-fit", dest="cross_fit", action="store_false",
                   help="with fewer than 20 held-out good images and at most 100 training images, nferd trains 5 "
                        "more students on folds of the training images so that every image gets a score from a "
                        "model that never saw it, and calibrates on those too; this turns that off")
    g.add_argument("--strict-images", action="store_true",
                   help="stop when a training image cannot be read (default: skip it, warn, and list it in "
                        "OUT/train_summary.json)")
    g.add_argument("--checkpoint-every", type=positive_int, default=10,
                   help="epochs between resumable checkpoints (>= 1; default 10)")
    g.add_argument("--feature-cache-dir", default=None, help="keep teacher features in memory-mapped files here")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the dense modules (needs a C++ compiler on CPU; first epoch pays the compile)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    g.add_argument("--test", action="store_true", help="evaluate on the test split after training")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch, not each process's part "
                        "(the closest match to a single-process run; no effect in one process)")
    p.add_argument("--out", required=True, help="checkpoint folder (one per category with --category all)")

    p = cmd("test", "evaluate a checkpoint on a labelled test split (image/pixel AUROC, AUPRO, F1, AP)")
    p.add_argument("--checkpoint", required=True)
    add_data_options(p, required=False)
    add_tiling_options(p)
    add_tracking_options(p)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (>= 1; default 16)")
    p.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--report", action="store_true",
                   help="also write OUT/report.html: metrics, ROC/PRO curves, score histogram and a gallery of "
                        "misses and false alarms, images embedded (needs matplotlib: nferd[report])")
    p.add_argument("--report-gallery", type=non_negative_int, default=4, metavar="K",
                   help="gallery entries per group: K lowest-scored defective, K highest-scored good, "
                        "K highest-scored defective images (>= 0; default 4)")

    p = cmd("predict", "score new images: decision, anomaly map, mask and overlay per image")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder or .safetensors (torch backend)")
    add_tiling_options(p)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "openvino"],
                   help="torch (default), onnx (ONNX Runtime on the CPU) or openvino (OpenVINO on the CPU, fp32), "
                        "the last two with the file from `nferd export`")
    p.add_argument("--model", default=None, metavar="FILE", help="the exported model (FILE.onnx or FILE.xml) for "
                   "--backend onnx or openvino")
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (>= 1; default 16)")
    p.add_argument("--map-format", default="npy", choices=["npy", "png16"])
    p.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--fresh", action="store_true",
                   help="discard the progress of an interrupted run in --out and score every image again "
                        "(default: an interrupted run is continued, finished images are not redone)")

    p = cmd("calibrate", "fit a checkpoint's OK/NOK thresholds again on a validation set (never the test split)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--normal-dir", default=None, help="folder of good validation images")
    p.add_argument("--abnormal-dir", default=None,
                   help="folder of defective validation images: the thresholds become F1-optimal")
    p.add_argument("--mask-dir", default=None, help="masks of the defective images, matched by file stem "
                   "(without them the pixel threshold comes from the good images)")
    p.add_argument("--image-metrics-only", action="store_true",
                   help="ignore the masks (needed when only some defective images have one)")
    p.add_argument("--data", default=None, metavar="ROOT", help="instead of the folders: ROOT/CATEGORY/validation "
                   "of an MVTec-style dataset (MVTec 3D-AD and LOCO ship one)")
    p.add_argument("--category", default=None)
    p.add_argument("--false-alarm-rate", type=fraction_open, default=0.01,
                   help="target on good images when the set holds no defects (> 0 and < 1; default 0.01)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (>= 1; default 16)")
    p.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])

    p = cmd("diagnose", "retrieval health of the normal feature banks (spread, entropy, diversity, ablations)")
    p.add_argument("--checkpoint", required=True)
    add_data_options(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)

    p = cmd("export", "export a checkpoint's whole inference graph (map, blur and score included) for deployment")
    p.add_argument("--checkpoint", required=True)
    add_tiling_options(p)
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"], dest="export_format",
                   help="onnx (one .onnx file) or openvino (an IR: FILE.xml with FILE.bin beside it)")
    p.add_argument("--out", required=True, metavar="FILE.onnx|FILE.xml")
    p.add_argument("--preprocess", action="store_true",
                   help="take uint8 N x H x W x 3 RGB images of any size and resize in the graph (as nferd's loader "
                        "does) instead of float N x 3 x S x S images in [0, 1]")
    p.add_argument("--opset", type=IntRange(MIN_OPSET, MAX_OPSET), default=None,
                   help=f"ONNX opset ({MIN_OPSET} to {MAX_OPSET}; default {DEFAULT_OPSET})")
    p.add_argument("--no-check", action="store_true",
                   help="skip running the exported file against the PyTorch model on random images")
    p.add_argument("--int8", action="store_true",
                   help="with --format openvino: quantise to INT8 (NNCF, statistics from normal training images), "
                        "refit the thresholds, and refuse when image or pixel AUROC moves by more than 0.005 or "
                        "AUPRO by more than 0.01 on the test split (needs nferd[openvino])")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="with --format openvino: the precision the IR runs in on the CPU. bf16 (on CPUs with "
                        "AVX-512 BF16 or AMX) is gated and its thresholds refitted as --int8 is; auto: bf16 where "
                        "the CPU has it and the gate passes, else fp32 (default fp32)")
    p.add_argument("--data", default=None, metavar="ROOT",
                   help="with --int8 or --precision: the dataset root the model was trained on (default: the one "
                        "recorded in the checkpoint)")
    p.add_argument("--category", default=None, help="with --int8 and --data: the category")
    add_folder_test_options(p.add_argument_group("--int8 on a model trained on a plain folder: its gate's test images"))
    p.add_argument("--allow-accuracy-loss", action="store_true",
                   help="with --int8: write the INT8 model even when the gate fails or cannot measure (a warning "
                        "and the gate's figures go into its metadata)")

    p = cmd("speed", "training and inference speed on synthetic input with random weights (no data needed; "
                     "`bench` is its old name)", aliases=("bench",))
    p.add_argument("--teacher", default=DEFAULT_TEACHER, choices=list(TEACHER_NAMES), help=f"default {DEFAULT_TEACHER}")
    p.add_argument("--image-size", type=image_size_int, default=256, metavar="PX", help=IMAGE_SIZE_HELP)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (>= 1; default 16)")
    p.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="the design to time (instead of --bank, --recall and --fusion), e.g. nferd, patchcore or rd4ad")
    p.add_argument("--bank", type=on_off, default=True, metavar="on|off")
    p.add_argument("--recall", default="patch", choices=["patch", "map"], help="bank recall to time (default patch)")
    p.add_argument("--fusion", default=None, choices=FUSIONS,
                   help="fuse the recall into the student (hafm: the paper's design); default none with the patch "
                        "recall (the bank scores the map), hafm with --recall map")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's dense modules")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "openvino"],
                   help="torch (default: training and inference), or the model exported and run by ONNX Runtime or "
                        "OpenVINO (CPU, fp32, inference only)")
    p.add_argument("--int8", action="store_true",
                   help="with --backend openvino: time the IR quantised as `nferd export --int8` quantises it")
    p.add_argument("--stages", action="store_true",
                   help="also time the PyTorch forward's parts at batch 1 (teacher, student, map and its search)")
    p.add_argument("--peer", default=None, choices=["anomalib"],
                   help="also time anomalib's reverse distillation model with the same backbone, interleaved with "
                        "this one (needs anomalib importable: a separate environment with PyPI's torch)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="the torch path's precision (auto: bf16 autocast where the CPU has it, else fp32)")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="also write the figures with their provenance as a result file under DIR "
                        "(benchmarks/speed is what the README's performance table is rendered from)")
    p.add_argument("--reference", action="store_true", help="also time the RD4AD-style reference path")
    p.add_argument("--train-steps", type=positive_int, default=6, help="timed training steps (>= 1; default 6)")
    p.add_argument("--infer-iters", type=positive_int, default=10,
                   help="timed batch-1 inferences (>= 1; default 10)")
    p.add_argument("--json", action="store_true")

    p = cmd("mvtec-ad2-submission", "write MVTec AD 2 test_private / test_private_mixed maps for its evaluation "
                                    "server (float16 TIFF, binarised PNG at the validation threshold, .tar.gz)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint, or with --category all the folder of one checkpoint per category")
    p.add_argument("--data", required=True, metavar="ROOT", help="MVTec AD 2 root (ROOT/<category>/test_private ...)")
    p.add_argument("--category", required=True, help="category name, or 'all' for every category under ROOT")
    p.add_argument("--out", required=True, help="submission folder; the archive is written next to it as OUT.tar.gz")
    p.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])

    p = cmd("benchmark", "run a grid of trainings and tests into result files (run), or print their tables (table)")
    p.add_argument("action", choices=["run", "table"])
    p.add_argument("--image-metrics-only", action="store_true",
                   help="run: evaluate on image labels alone, ignoring masks (test sets where only some defective "
                        "images have one)")
    p.add_argument("--data", action="append", default=None, metavar="ROOT",
                   help="run: dataset root (repeat for several)")
    p.add_argument("--categories", default=None, help="run: categories under every root, comma-separated")
    p.add_argument("--models", default="nferd,rd4ad",
                   help="run: model presets, comma-separated (nferd, patchcore, nferd_bankdist, nferd_fusion, "
                        "nferd_paper, rd4ad); presets that train the same student share one training")
    p.add_argument("--seeds", type=seed_list, default="0",
                   help="run: seeds, comma-separated, each 0 to 2**32 - 1 (default 0)")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, choices=list(TEACHER_NAMES), help=f"default {DEFAULT_TEACHER}")
    p.add_argument("--image-size", type=image_size_int, default=256, metavar="PX", help=IMAGE_SIZE_HELP)
    p.add_argument("--epochs", type=positive_int, default=200, help="run: training epochs (>= 1; default 200)")
    p.add_argument("--train-images", type=positive_int, default=None, metavar="N",
                   help="run: train on a seeded subset of N good training images and calibrate on a hold-out "
                        "of them (no validation set), as a user with few good images would")
    p.add_argument("--threads", type=positive_int, default=None, help="run: torch threads (>= 1; default: all cores)")
    p.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    p.add_argument("--results", default="benchmarks/results", help="result files (default benchmarks/results)")
    p.add_argument("--work", default="runs/benchmark", help="run: checkpoints of the runs (default runs/benchmark)")

    p = cmd("serve", "HTTP inspection service: POST /predict, GET /health, /metadata, and an operator page at /")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (torch backend)")
    add_tiling_options(p)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "openvino"],
                   help="torch (default), or an exported file run by ONNX Runtime or OpenVINO (--model)")
    p.add_argument("--model", default=None, metavar="FILE", help="FILE.onnx or FILE.xml for --backend onnx or openvino")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for the "
                   "network: there is no authentication)")
    p.add_argument("--port", type=port_int, default=8000, help="1 to 65535 (default 8000)")
    p.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0,
                   help="largest accepted file in MiB (> 0; default 20)")
    p.add_argument("--max-queue", type=non_negative_int, default=16,
                   help="requests allowed to wait while one is processed; more get 503 (>= 0; default 16)")
    p.add_argument("--max-batch-files", type=positive_int, default=16,
                   help="files per POST /predict/batch (>= 1; default 16)")
    p.add_argument("--max-image-memory-mb", type=positive_float, default=1024.0,
                   help="memory in MiB for decoding images, shared by all requests in flight; a request that "
                        "does not fit waits in the queue (> 0; default 1024)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse flags; a ``--config`` file's values become the defaults (so they may also fill required
    options), and flags given on the command line override them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = next((a for a in argv if a in parser.verbs), None)
    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None) or \
        next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if command is not None and config:
        verb = parser.verbs[command]
        config_file.apply(verb.parser, verb.options, config)
    return parser.parse_args(argv)


def print_config(args: argparse.Namespace) -> None:
    """``--print-config``: the options of this command as a YAML config file, in sections."""
    import yaml
    options = build_parser().verbs[args.command].options
    print(f"# nferd {args.command}: options as a config file (nferd {args.command} --config FILE; flags override)")
    print(yaml.safe_dump(config_file.as_file(args, options), sort_keys=False, default_flow_style=False), end="")
