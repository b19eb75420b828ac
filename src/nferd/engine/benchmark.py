"""Benchmark runner: a grid of (dataset root x categories x models x seeds) trained and tested
with the normal train/test code, one JSON result file per run, each with its provenance.

A run whose result file exists is skipped, and an interrupted run resumes from its last
checkpoint, so a grid can be stopped and started again. ``engine.tables`` turns result files into
Markdown tables (mean and spread over seeds).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OptionError, option
from . import safe_io
from .provenance import provenance

if TYPE_CHECKING:
    from .calibration import Calibration

METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "miss_at_1pct_fa")


HOLDOUT = 0.1  # good training images a run keeps out when its dataset has no validation/good


def model_presets(teacher: str, image_size: int) -> dict[str, Any]:
    """The models a benchmark compares, by name: the designs of ``nferd.models.nferd.PRESETS``."""
    from ..models.nferd import PRESETS, ModelConfig
    return {name: ModelConfig.preset(name, teacher=teacher, image_size=image_size) for name in PRESETS}


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    data: str
    category: str
    model: str
    teacher: str
    image_size: int
    epochs: int
    seed: int
    train_images: int | None = None  # a seeded subset of this many good training images (few-image settings)

    @property
    def dataset(self) -> str:
        return Path(self.data).resolve().name

    @property
    def key(self) -> str:
        few = f"-{self.train_images}img" if self.train_images else ""
        return f"{self.model}-{self.teacher}-{self.image_size}px-{self.epochs}ep{few}-seed{self.seed}"

    def same_student(self, other: Run) -> bool:
        """The two runs train on the same images with the same options and seed."""
        return (self.data, self.category, self.teacher, self.image_size, self.epochs, self.seed, self.train_images) == \
            (other.data, other.category, other.teacher, other.image_size, other.epochs, other.seed, other.train_images)

    def result_path(self, results: Path) -> Path:
        return results / self.dataset / self.category / f"{self.key}.json"


def few_images(n: int, count: int, seed: int) -> list[int]:
    """The seeded subset of ``count`` of ``n`` training images that a few-image run trains on."""
    if count > n:
        raise OptionError(f"{option('train_images')} {count} is more than the {n} training images")
    import torch
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed + 15485863))[:count].tolist())


def shared_student(run: Run, work: Path, presets: dict[str, Any], others: list[str]) -> Path | None:
    """A finished run folder among ``others`` (preset names) of the same images, options and seed whose
    student is the one ``run`` would train (same :attr:`ModelConfig.student_recipe`): its student is
    reused instead of trained again, which gives the same weights (training does not depend on what
    scores beside the student)."""
    from .train import finished_run
    recipe = presets[run.model].student_recipe
    if not recipe:
        return None
    for name in others:
        if name == run.model or presets[name].student_recipe != recipe:
            continue
        other = Run(run.data, run.category, name, run.teacher, run.image_size, run.epochs, run.seed, run.train_images)
        folder = work / other.dataset / other.category / other.key
        if finished_run(folder, run.epochs) is not None:
            return folder
    return None


def run_one(run: Run, results: Path, work: Path, threads: int, device: str = "auto",
            argv: list[str] | None = None, progress: bool = True, image_metrics_only: bool = False,
            siblings: list[str] = ()) -> dict[str, Any]:
    """Train and test one grid cell with the product's code; write and return its result file.
    ``siblings``: the grid's other presets, whose finished students this run may reuse."""
    import torch
    from torch.utils.data import Subset

    from ..data.datasets import make_dataset
    from .calibration import as_calibration
    from .checkpoint import load_checkpoint, weights_file
    from .device import autocast_dtype, resolve_device
    from .evaluate import evaluate
    from .train import TrainConfig, train
    torch.set_num_threads(threads)
    dev = resolve_device(device)
    amp = autocast_dtype(dev, "auto")
    presets = model_presets(run.teacher, run.image_size)
    mcfg = presets[run.model]
    root = Path(run.data)
    train_set = make_dataset("auto", root, run.category, "train", run.image_size)
    cal_set = None
    if run.train_images:  # a user with this few good images has no separate validation set either
        train_set = Subset(train_set, few_images(len(train_set), run.train_images, run.seed))
    elif (root / run.category / "validation" / "good").is_dir():
        cal_set = make_dataset("auto", root, run.category, "validation", run.image_size)
    tcfg = TrainConfig(epochs=run.epochs, seed=run.seed, device=device, threads=threads,
                       holdout=0.0 if cal_set is not None else HOLDOUT)
    out = work / run.dataset / run.category / run.key
    t0 = time.perf_counter()
    if weights_file(out).is_file():  # trained before, its result file lost: test only
        model, meta = load_checkpoint(out)
        if model.config != mcfg:
            raise OptionError(f"{out} holds a model trained with another configuration than preset '{run.model}' "
                              f"has today: move it away (or pass another {option('work')} folder) and run again")
        summary = {"train_seconds": meta.get("train_seconds"), "feature_seconds": None}
    else:
        source = shared_student(run, work, presets, list(siblings))
        model, summary = train(train_set, mcfg, tcfg, out, calibration_set=cal_set,
                               resume=(out / "last.safetensors").is_file(), progress=progress,
                               student_from=source)
    train_wall = time.perf_counter() - t0
    test_set = make_dataset("auto", root, run.category, "test", run.image_size, image_metrics_only=image_metrics_only)
    metrics, raw = evaluate(model, test_set, device=device, progress=progress)
    n = metrics["n_images"]
    at_threshold = threshold_outcome(raw, as_calibration(summary.get("calibration")) or meta_calibration(out))
    result = {
        "dataset": run.dataset, "category": run.category, "model": run.model, "teacher": run.teacher,
        "image_size": run.image_size, "epochs": run.epochs, "seed": run.seed,
        **({"train_images": run.train_images} if run.train_images else {}),
        "metrics": {k: float(metrics[k]) for k in METRICS if k in metrics},
        **({"pixel_metrics_absent": metrics["pixel_metrics_absent"]} if "pixel_metrics_absent" in metrics else {}),
        "n_train": len(train_set), "n_test": n,
        **({"student_from": summary["student_from"]} if summary.get("student_from") else {}),
        **({"at_threshold": at_threshold} if at_threshold else {}),
        "timing": {"train_seconds": summary.get("train_seconds"), "feature_seconds": summary.get("feature_seconds"),
                   "train_wall_seconds": train_wall, "inference_seconds": metrics["inference_seconds"],
                   "inference_ms_per_image": 1000 * metrics["inference_seconds"] / max(n, 1)},
        "config": {"model": model.config.to_dict(), "train": {k: v for k, v in vars(tcfg).items()}},
        "provenance": {**provenance(threads, str(dev), argv),
                       "precision": str(amp).replace("torch.", "") if amp else "fp32"},
    }
    path = run.result_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    safe_io.write_json(path, result, default=str)
    return result


def meta_calibration(folder: Path) -> Calibration | None:
    from .calibration import as_calibration
    from .checkpoint import read_metadata
    return as_calibration(read_metadata(folder).get("calibration"))


def threshold_outcome(raw: dict[str, Any], cal: Calibration | None) -> dict[str, Any] | None:
    """What the calibrated threshold did on the test split: the share of good images flagged (false
    alarms) and of defective images passed (misses), beside the false-alarm bound it promised."""
    if cal is None:
        return None
    c = cal.counts(raw["scores"], raw["labels"])
    return {**c, "false_alarm_rate": c["false_alarms"] / c["good"] if c["good"] else None,
            "miss_rate": c["misses"] / c["defective"] if c["defective"] else None,
            "promised_false_alarm_bound": cal.false_alarm_bound, "calibration_images": cal.n_images,
            "calibration_source": cal.source}


def run_grid(runs: list[Run], results: Path, work: Path, threads: int, device: str = "auto",
             log: Callable[[str], None] = print, argv: list[str] | None = None,
             image_metrics_only: bool = False) -> list[Path]:
    """Every run of ``runs`` whose result file is missing, in order; returns the files written."""
    todo = [r for r in runs if not r.result_path(results).is_file()]
    log(f"{len(runs)} runs in the grid, {len(runs) - len(todo)} done before, {len(todo)} to run")
    written = []
    models = list(dict.fromkeys(r.model for r in runs))
    for i, run in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {run.dataset}/{run.category} {run.key}")
        res = run_one(run, results, work, threads, device, argv, image_metrics_only=image_metrics_only,
                      siblings=models)
        m = res["metrics"]
        log(f"[{i}/{len(todo)}] " + "  ".join(f"{k} {m[k]:.4f}" for k in METRICS if k in m and math.isfinite(m[k]))
            + (f"  (pixel metrics absent: {res['pixel_metrics_absent']})" if "pixel_metrics_absent" in res else ""))
        written.append(run.result_path(results))
    return written


# ------------------------------------------------------------------------------------------ render
def load_results(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(results).rglob("*.json"))]


def save_speed_result(res: dict[str, Any], folder: Path) -> Path:
    """One ``nferd speed`` run as a result file with its provenance, named by what it measured."""
    precision = {"torch.bfloat16": "bf16", "bfloat16": "bf16", "torch.float16": "fp16", "int8": "int8"}.get(
        str(res["precision"]), "fp32")
    key = "-".join([res["teacher"], f"{res['image_size']}px", res["backend"], precision,
                    res.get("preset") or (res["fusion"] if res["bank"] else "rd4ad"),
                    f"b{res['batch_size']}", f"t{res['threads']}", res["device"].replace(":", "")]
                   + ([f"vs-{res['peer']['name']}"] if res.get("peer") else []))
    path = Path(folder) / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    safe_io.write_json(path, {**res, "provenance": provenance(res["threads"], res["device"])}, default=str)
    return path


def load_speed_results(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))] if Path(folder).is_dir() else []
