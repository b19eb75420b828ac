"""Benchmark runner: a grid of (dataset root x categories x models x seeds) trained and tested
with the normal train/test code, one JSON result file per run, each with its provenance.

A run whose result file exists is skipped, and an interrupted run resumes from its last
checkpoint, so a grid can be stopped and started again. ``render`` turns the result files into
the Markdown tables of ``docs/results.md`` and the README (mean and spread over seeds).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import safe_io

METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "miss_at_1pct_fa")
HOLDOUT = 0.1  # good training images a run keeps out when its dataset has no validation/good
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "neon")


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


def few_images(n: int, count: int, seed: int) -> list[int]:
    """The seeded subset of ``count`` of ``n`` training images that a few-image run trains on."""
    if count > n:
        raise ValueError(f"--train-images {count} is more than the {n} training images")
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
            raise ValueError(f"{out} holds a model trained with another configuration than preset '{run.model}' "
                             f"has today: move it away (or pass another --work folder) and run again")
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
    at_threshold = threshold_outcome(raw, summary.get("calibration") or (meta_calibration(out)))
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


def meta_calibration(folder: Path) -> dict[str, Any] | None:
    from .checkpoint import read_metadata
    return read_metadata(folder).get("calibration")


def threshold_outcome(raw: dict[str, Any], cal: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the calibrated threshold did on the test split: the share of good images flagged (false
    alarms) and of defective images passed (misses), beside the false-alarm bound it promised."""
    if not cal:
        return None
    from .calibration import decision_counts
    c = decision_counts(raw["scores"], raw["labels"], cal)
    return {**c, "false_alarm_rate": c["false_alarms"] / c["good"] if c["good"] else None,
            "miss_rate": c["misses"] / c["defective"] if c["defective"] else None,
            "promised_false_alarm_bound": cal.get("false_alarm_bound"), "calibration_images": cal.get("n_images"),
            "calibration_source": cal.get("source")}


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


def setting(r: dict[str, Any]) -> str:
    """A result's category, with the few-image subset it trained on."""
    return r["category"] + (f", {r['train_images']} images" if r.get("train_images") else "")


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summary_table(rows: list[dict[str, Any]], metrics: tuple[str, ...] = METRICS[:4]) -> str:
    """One Markdown table: a row per (dataset, category, teacher, size, epochs, model), mean ±
    sample standard deviation over its seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        k = (r["dataset"], setting(r), r["teacher"], r["image_size"], r["epochs"], r["model"])
        groups.setdefault(k, []).append(r)
    head = ["dataset / category", "teacher", "epochs", "model", "seeds", *metrics, "test ms / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in sorted(groups):
        g = groups[k]
        cells = [f"{k[0]} / {k[1]}", f"{k[2]} ({k[3]} px)", str(k[4]), k[5], str(len(g))]
        cells += [_mean_spread([r["metrics"][m] for r in g])
                  if all(isinstance(r["metrics"].get(m), (int, float)) for r in g) else "–" for m in metrics]
        cells.append(f"{statistics.mean(r['timing']['inference_ms_per_image'] for r in g):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short_commit(commit: str | None) -> str:
    """A commit for a table: 12 hex digits, marked when the tree had uncommitted changes."""
    if not commit:
        return "?"
    return commit[:12] + (" (modified)" if commit.endswith("+dirty") else "")


def provenance_table(rows: list[dict[str, Any]]) -> str:
    head = ["result file", "date", "commit", "CPU", "flags", "threads", "precision", "torch", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["dataset"], setting(r), r["model"], r["seed"])):
        p = r["provenance"]
        few = f"-{r['train_images']}img" if r.get("train_images") else ""
        name = (f"{r['dataset']}/{r['category']}/{r['model']}-{r['teacher']}-{r['image_size']}px-{r['epochs']}ep"
                f"{few}-seed{r['seed']}")
        train_s = r["timing"].get("train_seconds")
        lines.append("| " + " | ".join([name, p["date"][:10], short_commit(p.get("git_commit")), p["cpu_model"],
                                         " ".join(p["cpu_flags"]), str(p["threads"]), p.get("precision", "?"),
                                         p["torch_version"],
                                         f"{train_s:.0f}" if train_s else "–"]) + " |")
    return "\n".join(lines)


README_START = "<!-- results:start (rendered by `nferd benchmark render`; do not edit) -->"
README_END = "<!-- results:end -->"


def load_calibration_results(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """``results.json`` files of ``nferd test`` runs under ``folder``, named by their folder."""
    folder = Path(folder)
    return [(str(p.parent.relative_to(folder)), json.loads(p.read_text()))
            for p in sorted(folder.rglob("results.json"))]


def calibration_table(results: list[tuple[str, dict[str, Any]]]) -> str:
    """Per ``nferd test`` run: the calibration's promise (false-alarm bound at its confidence, from
    n normal images) next to what the test split showed at that threshold."""
    head = ["run", "normal images", "target", "bound (confidence)", "false alarms on test good",
            "misses on test defective", "date", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results:
        prov = res.get("run", {}).get("provenance", {})
        for m in res.get("categories", {}).values():
            a = m.get("at_threshold")
            if not a:
                continue
            bound = (f"{a['false_alarm_bound']:.1%} ({a['confidence']:.0%})" if a.get("false_alarm_bound") is not None
                     else "–")
            target = f"{a['false_alarm_target']:.1%}" if a.get("false_alarm_target") is not None else "–"
            lines.append("| " + " | ".join([name, str(a.get("n_images", "–")), target, bound,
                                             f"{a['false_alarms']} / {a['good']}", f"{a['misses']} / {a['defective']}",
                                             prov.get("date", "?")[:10], short_commit(prov.get("git_commit"))]) + " |")
    return "\n".join(lines)


def render_results_doc(rows: list[dict[str, Any]], calibration: list[tuple[str, dict[str, Any]]] | None = None,
                       speed: list[dict[str, Any]] | None = None) -> str:
    perf = [] if not speed else [
        "## Speed",
        "",
        "`nferd speed --save benchmarks/speed` on random weights and synthetic input (no data): batch-1",
        "latency (median and 95th percentile), batch throughput, training throughput (PyTorch only), and",
        "the achieved GFLOP/s next to the matmul peak measured at the same precision. Each row names its",
        "machine: figures from different CPUs do not compare. Result files in `benchmarks/speed/`.",
        "",
        speed_table(speed),
        "",
    ]
    extra = [] if not calibration else [
        "## Decisions at the calibrated threshold",
        "",
        "`nferd test` on checkpoints whose thresholds were fitted by `nferd calibrate` on held-out normal",
        "images only (the training hold-out, or the dataset's `validation/good`): the bound is the",
        "false-alarm rate the calibration guarantees at its confidence for that many normal images; the",
        "test split shows what happened at that threshold. Result files in `benchmarks/calibration/`.",
        "",
        calibration_table(calibration),
        "",
    ]
    return "\n".join([
        "# Results",
        "",
        "Rendered by `nferd benchmark render` from the result files in `benchmarks/results/` (one JSON",
        "per run, written by `nferd benchmark run`). Do not edit by hand: run the benchmark, then render.",
        "Each row is the mean ± sample standard deviation over the seeds listed; a single seed shows its",
        "value alone. The last epoch is the model (nothing is selected on the test split); thresholds",
        "play no part in these threshold-free metrics. Test time per image is measured at batch 16 with",
        "the run's threads and precision (see the provenance table), on the machine named there.",
        "",
        "## Detection and localisation",
        "",
        summary_table(rows, METRICS),
        "",
        "## Provenance of each run",
        "",
        "The full command, versions and configuration are in each result file.",
        "",
        provenance_table(rows),
        "",
        *perf,
        *extra,
    ])


def replace_between(text: str, start: str, end: str, body: str) -> str:
    """``text`` with what lies between its ``start`` and ``end`` markers replaced by ``body``."""
    if start not in text or end not in text:
        raise ValueError(f"no '{start}' ... '{end}' markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + start + "\n" + body + "\n" + end + tail


def render_readme(readme: str, rows: list[dict[str, Any]], speed: list[dict[str, Any]] | None = None) -> str:
    """The README with the tables between its results (and performance) markers replaced."""
    if README_START not in readme or README_END not in readme:
        raise ValueError("README has no results markers")
    readme = replace_between(readme, README_START, README_END, summary_table(rows))
    if speed and SPEED_START in readme:
        readme = replace_between(readme, SPEED_START, SPEED_END, speed_table(speed))
    return readme


SPEED_START = "<!-- performance:start (rendered by `nferd benchmark render`; do not edit) -->"
SPEED_END = "<!-- performance:end -->"
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "neon")


def save_speed_result(res: dict[str, Any], folder: Path) -> Path:
    """One ``nferd speed`` run as a result file with its provenance, named by what it measured."""
    precision = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "int8": "int8"}.get(str(res["precision"]), "fp32")
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


def _peer_cell(peer: dict[str, Any] | None) -> str:
    """anomalib's latency timed in the same run (``nferd speed --peer anomalib``), with this row's
    latency over it measured pairwise."""
    if not peer:
        return "–"
    return (f"{peer['infer_latency_ms_b1']:.1f} (anomalib {peer['version']}; ratio {peer['latency_ratio_b1']:.2f})")


def speed_table(rows: list[dict[str, Any]]) -> str:
    """``nferd speed`` result files: latency, throughput and achieved GFLOP/s against the measured
    matmul peak, with the machine each was measured on."""
    head = ["teacher", "model", "backend", "precision", "threads", "batch-1 latency ms (p95)", "batch img/s",
            "training img/s", "GFLOPs / image", "GFLOP/s (peak)", "anomalib RD, same run: batch-1 ms",
            "CPU (flags)", "date", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["teacher"], r["design"], r["backend"], r["threads"])):
        p = r["provenance"]
        flags = " ".join(f for f in r.get("cpu_flags", []) if f in SPEED_FLAGS)
        train = r.get("train_images_per_s")
        lines.append("| " + " | ".join([
            f"{r['teacher']} ({r['image_size']} px)", "RD4AD" if not r["bank"] else r["design"], r["backend"],
            str(r["precision"]).replace("torch.", ""), str(r["threads"]),
            f"{r['infer_latency_ms_b1']:.1f} ({r['infer_latency_ms_b1_p95']:.1f})",
            f"{r['infer_images_per_s']:.1f} (batch {r['batch_size']})", f"{train:.1f}" if train else "–",
            f"{r['gflops_per_image']:.2f}", f"{r['gflops_achieved']:.0f} ({r['peak_gflops_matmul']:.0f})",
            _peer_cell(r.get("peer")), f"{r['cpu_model']} ({flags})", p["date"][:10],
            short_commit(p.get("git_commit"))]) + " |")
    return "\n".join(lines)


def versus_table(rows: list[dict[str, Any]], baseline: str = "rd4ad",
                 metrics: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro")) -> str:
    """Each model against ``baseline`` trained with the same seeds: per metric the mean of the
    per-seed differences, with the smallest and largest of them (both > 0: ahead on every seed)."""
    groups: dict[tuple, dict[str, dict[int, dict[str, float]]]] = {}
    for r in rows:
        k = (r["dataset"], setting(r), r["teacher"], r["image_size"], r["epochs"])
        groups.setdefault(k, {}).setdefault(r["model"], {})[r["seed"]] = r["metrics"]
    head = ["dataset / category", "model", "seeds", *(f"Δ {m}" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in sorted(groups):
        base = groups[k].get(baseline)
        if not base:
            continue
        for model in sorted(groups[k]):
            seeds = sorted(set(groups[k][model]) & set(base))
            if model == baseline or not seeds:
                continue
            cells = [f"{k[0]} / {k[1]}", model, ",".join(map(str, seeds))]
            for m in metrics:
                if not all(isinstance(g.get(m), (int, float)) for g in (*(groups[k][model][s] for s in seeds),
                                                                        *(base[s] for s in seeds))):
                    cells.append("–")
                    continue
                d = [groups[k][model][s][m] - base[s][m] for s in seeds]
                cells.append(f"{statistics.mean(d):+.4f} ({min(d):+.4f} … {max(d):+.4f})" if len(d) > 1
                             else f"{d[0]:+.4f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def screen_table(screen: dict[str, Any], metrics: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro")) -> str:
    """A rescoring screen (``benchmarks/map_terms.py``): per mix and category, the mean over the
    screened checkpoints."""
    cats = sorted({(r["dataset"], r["category"]) for r in screen["runs"]})
    def seeds(d: str, c: str) -> str:
        n = sum(1 for r in screen["runs"] if (r["dataset"], r["category"]) == (d, c))
        return f"{n} seed" + ("s" if n != 1 else "")
    head = ["weight", "bank stages", *(f"{d} / {c} ({seeds(d, c)})" for d, c in cats)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, mix in screen["mixes"].items():
        cells = [f"{mix['weight']:g}" if mix["stages"] else "0 (student map alone)",
                 ",".join(map(str, mix["stages"])) or "–"]
        for d, c in cats:
            runs = [r for r in screen["runs"] if (r["dataset"], r["category"]) == (d, c)]
            cells.append(" / ".join(f"{statistics.mean(r['mixes'][name][m] for r in runs):.4f}" for m in metrics))
        lines.append("| " + " | ".join(cells) + " |")
    p = screen["provenance"]
    lines += ["", f"*Screened {p['date'][:10]} at commit {short_commit(p.get('git_commit'))} on {p['cpu_model']} "
                  f"({p.get('precision', '?')}, {p['threads']} thread) by `benchmarks/map_terms.py` on "
                  f"{len(screen['runs'])} checkpoints; the command and every value are in its result file.*"]
    return "\n".join(lines)


PEERS = ("rd4ad", "patchcore", "nferd")


def peers_table(rows: list[dict[str, Any]], models: tuple[str, ...] = PEERS) -> str:
    """The default against both peers per setting: mean ± std over seeds of image AUROC, pixel AUROC,
    AUPRO and the miss rate at 1 % false alarms, and what its calibrated threshold did on the good
    test images (mean and worst seed), beside the false-alarm bound the calibration promised."""
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        if r["model"] in models:
            k = (r["dataset"], setting(r), r["teacher"], r["image_size"], r["epochs"])
            groups.setdefault(k, {}).setdefault(r["model"], []).append(r)
    metrics = ("image_auroc", "pixel_auroc", "aupro", "miss_at_1pct_fa")
    head = ["setting", "model", "seeds", "image AUROC", "pixel AUROC", "AUPRO", "miss at 1 % false alarms",
            "false alarms at the threshold (mean, worst seed)", "misses at the threshold", "promised bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in sorted(groups):
        for model in models:
            g = groups[k].get(model)
            if not g:
                continue
            cells = [f"{k[0]} / {k[1]}", f"**{model}**" if model == "nferd" else model, str(len(g))]
            for m in metrics:
                vals = [r["metrics"].get(m) for r in g]
                cells.append(_mean_spread(vals) if all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals)
                             else "–")
            at = [r.get("at_threshold") or {} for r in g]
            fa = [a.get("false_alarm_rate") for a in at]
            miss = [a.get("miss_rate") for a in at]
            bound = [a.get("promised_false_alarm_bound") for a in at]
            ok = all(isinstance(v, (int, float)) for v in fa)
            cells.append(f"{statistics.mean(fa):.3f}, {max(fa):.3f}" if ok else "–")
            cells.append(f"{statistics.mean(miss):.3f}" if all(isinstance(v, (int, float)) for v in miss) else "–")
            cells.append(f"{max(bound):.3f}" if all(isinstance(v, (int, float)) for v in bound) else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PEERS_START = "<!-- peers:start (rendered by `nferd benchmark render`; do not edit) -->"
PEERS_END = "<!-- peers:end -->"
VERSUS_START = "<!-- versus-rd4ad:start (rendered by `nferd benchmark render`; do not edit) -->"
VERSUS_END = "<!-- versus-rd4ad:end -->"
SCREEN_START = "<!-- map-terms:start (rendered by `nferd benchmark render`; do not edit) -->"
SCREEN_END = "<!-- map-terms:end -->"


def render_method_doc(text: str, rows: list[dict[str, Any]], screen: dict[str, Any] | None) -> str:
    """The method page with its comparison with RD4AD (and the rescoring screen, if there is one)
    replaced by the rendered tables; a page without the markers is returned unchanged."""
    if VERSUS_START in text:
        text = replace_between(text, VERSUS_START, VERSUS_END, versus_table(rows))
    if PEERS_START in text:
        text = replace_between(text, PEERS_START, PEERS_END, peers_table(rows))
    if screen is not None and SCREEN_START in text:
        text = replace_between(text, SCREEN_START, SCREEN_END, screen_table(screen))
    return text
