"""Runs over a dataset: what ``nferd train`` does, for Python callers too.

:class:`DataSpec` names the images (a dataset root and a category, every category with ``'all'``,
or a plain folder of good images). :func:`train_categories` trains one model per category into
``out`` (``out/CATEGORY`` with ``'all'``): under torchrun, several categories are shared out whole,
one process each (no gradient traffic), and one category is trained by all processes together
(DistributedDataParallel). A finished run in a folder is left alone on ``resume``; each run can
be logged to MLflow and tested on its test split right after training.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import OptionError, option
from ..text import count
from .train_config import TrainConfig


@dataclass(frozen=True)
class DataSpec:
    """Where a run's images come from. ``root``: a dataset root (MVTec AD / 3D-AD / LOCO / VisA
    layout) or a folder of good training images; ``category``: one under ``root``, or ``'all'``;
    ``format``: auto, mvtec, visa or folder; the ``test_*`` folders and ``mask_dir``: the labelled
    test images of a plain folder; ``image_metrics_only``: evaluate on image labels alone."""

    root: str | None
    category: str | None = None
    format: str = "auto"
    test_normal_dir: str | None = None
    test_abnormal_dir: str | None = None
    mask_dir: str | None = None
    image_metrics_only: bool = False

    def categories(self) -> list[str | None]:
        """The categories to run (None: a plain folder, which is one run)."""
        if self.format == "folder":
            return [None]
        if self.category is None:
            raise OptionError(f"{option('category')} is required: a category folder under '{self.root}', or 'all' "
                              f"({option('root')} holds no images itself; for a folder of good images give that "
                              f"folder, or {option('data_format')} folder)")
        if self.category == "all":
            from ..data.datasets import discover_categories
            return list(discover_categories(self.root))
        return [self.category]

    def dataset(self, category: str | None, split: str, image_size: int | None) -> Any:
        """The ``split`` of ``category`` (``image_size`` None: full resolution, for tiling)."""
        from ..data.datasets import make_dataset
        kw: dict[str, Any] = {"image_metrics_only": True} if split == "test" and self.image_metrics_only else {}
        if self.format == "folder" and split == "test":
            if not (self.test_normal_dir or self.test_abnormal_dir):
                raise OptionError(f"a plain folder needs {option('test_normal_dir')} and/or "
                                  f"{option('test_abnormal_dir')} to test")
            return make_dataset("folder", None, None, split, image_size, test_normal_dir=self.test_normal_dir,
                                test_abnormal_dir=self.test_abnormal_dir, mask_dir=self.mask_dir, **kw)
        return make_dataset(self.format, self.root, category, split, image_size, **kw)

    def validation(self, category: str | None, image_size: int | None) -> Any:
        """A ``validation/good`` folder (MVTec 3D-AD, LOCO) calibrates instead of held-out training images."""
        if self.format == "folder" or category is None:
            return None
        if not (Path(str(self.root)) / category / "validation" / "good").is_dir():
            return None
        ds = self.dataset(category, "validation", image_size)
        ds.calibration_source = "validation/good"
        return ds

    def name(self, category: str | None) -> str:
        """The name results are filed under: the category, or for a plain folder the folder's name."""
        if category:
            return category
        folder = self.root or self.test_normal_dir or self.test_abnormal_dir
        name = Path(folder).resolve().name if folder else ""
        return (Path(folder).resolve().parent.name if name in ("good", "train", "ok") else name) or "images"

    def record(self, category: str | None) -> dict[str, Any]:
        """What a checkpoint records of its data (so ``test`` and ``export`` find it again)."""
        return {"root": str(self.root), "category": category, "format": self.format}


@dataclass(frozen=True)
class Tracking:
    """Log runs to MLflow: a tracking ``uri`` (a server, a database), or a local ``directory``."""

    uri: str | None = None
    directory: str = "mlruns"

    @contextmanager
    def run(self, name: str) -> Iterator[Any]:
        from .tracking import MLflowRun
        with MLflowRun(name, uri=self.uri, directory=self.directory) as run:
            print(f"MLflow run {run.run_id} in {run.uri}")
            yield run


@contextmanager
def _tracked(tracking: Tracking | None, name: str, lead: bool) -> Iterator[Any]:
    if tracking is None or not lead:
        yield None
    else:
        with tracking.run(name) as run:
            yield run


@dataclass
class TrainedRun:
    """One category's training: its folder, model and summary (``train_summary.json``), and its test
    metrics when it was tested."""

    category: str | None
    out: Path
    model: Any = None
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    skipped: bool = False  # finished earlier: nothing was done


def train_categories(data: DataSpec, model_config: Any, train_config: TrainConfig, out: str | Path, *,
                     teacher_weights: str | None = None, resume: bool = False, test: bool = False,
                     tracking: Tracking | None = None, sync_bn: bool = False) -> list[TrainedRun]:
    """Train (and with ``test`` evaluate) one model per category of ``data`` into ``out``."""
    from . import distributed as ddp
    from .train import train
    if train_config.tile and train_config.tile != model_config.image_size:
        raise OptionError(f"{option('tile')} {train_config.tile}: tiles are the model's input, so the model's "
                          f"{option('image_size')} must be {train_config.tile}")
    cats = data.categories()
    round_robin = ddp.launched() and len(cats) > 1
    if round_robin:
        cats = cats[ddp.env_rank()::ddp.env_world_size()]
        names = ", ".join(map(str, cats)) or "none (more processes than categories)"
        print(f"[rank {ddp.env_rank()}] categories: {names}")
    lead = round_robin or not ddp.launched() or ddp.env_rank() == 0  # prints and writes the summary
    runs = []
    for cat in cats:
        folder = Path(out) / cat if (data.category == "all" and cat) else Path(out)
        if resume and _finished(folder, train_config.epochs, test, lead):
            runs.append(TrainedRun(cat, folder, skipped=True))
            continue
        native = None if train_config.tile else model_config.image_size  # tiles are cut at full resolution
        train_set, cal_set = data.dataset(cat, "train", native), data.validation(cat, native)
        tcfg = train_config if cal_set is None else replace(train_config, holdout=0.0)
        if lead:
            print(f"training {model_config.describe()} ({model_config.teacher} teacher) on {cat or data.root}: "
                  f"{count(len(train_set), 'image')}, {count(tcfg.epochs, 'epoch')}"
                  + (f", {ddp.env_world_size()} processes" if ddp.launched() and not round_robin else ""))
        meta = {"data": data.record(cat)}
        with _tracked(tracking, f"train {data.name(cat)}", lead) as run:
            if run is not None:
                run.params({"model": model_config.to_dict(), "train": asdict(tcfg), **meta, "out": str(folder)})
            model, summary = train(train_set, model_config, tcfg, folder, teacher_weights=teacher_weights,
                                   calibration_set=cal_set, resume=resume, extra_meta=meta,
                                   distributed=False if round_robin else None, sync_bn=sync_bn,
                                   on_epoch=run.epoch if run is not None else None)
            if not lead:  # DDP: rank 0 reports, writes and tests
                continue
            trained = TrainedRun(cat, folder, model, summary)
            _report_trained(folder, summary)
            if run is not None:
                run.tag("checkpoint", summary["checkpoint"])
                run.metrics({k: summary.get(k) for k in ("final_loss", "train_seconds", "feature_seconds")})
            if test:
                trained.metrics = test_category(model, data, cat, folder / "test", {"checkpoint": str(folder),
                                                                                    **summary},
                                                batch_size=tcfg.batch_size, device=tcfg.device,
                                                precision=tcfg.precision, tiling=tcfg.tiling)
                if run is not None:
                    run.metrics(trained.metrics, prefix="test_")
            runs.append(trained)
    return runs


def evaluate_category(model: Any, data: DataSpec, category: str | None, test_set: Any,
                      **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``evaluate``, plus MVTec AD 2's SegF1 and AU-PRO@0.05 for a test on its test_public split."""
    from ..data.datasets import MVTecAD2Dataset
    from .evaluate import evaluate, mvtec_ad2_metrics
    metrics, raw = evaluate(model, test_set, **kw)
    if isinstance(test_set, MVTecAD2Dataset):
        size = None if kw.get("tiling") else model.config.image_size
        metrics.update(mvtec_ad2_metrics(model, raw, data.dataset(category, "validation", size), **kw))
    return metrics, raw


def test_category(model: Any, data: DataSpec, category: str | None, out: Path, info: dict[str, Any], *,
                  batch_size: int = 16, device: str = "auto", precision: str = "auto",
                  tiling: Any = None) -> dict[str, Any]:
    """Evaluate ``model`` on the test split of ``category`` and write ``out/results.json``."""
    from .distributed import local_device
    from .evaluate import write_results
    test_set = data.dataset(category, "test", None if tiling else model.config.image_size)
    t0 = time.perf_counter()
    metrics, _ = evaluate_category(model, data, category, test_set, batch_size=batch_size,
                                   device=str(local_device(device)), precision=precision, tiling=tiling)
    run = {"teacher": model.config.teacher, "model": model.config.to_dict(), "eval_seconds": time.perf_counter() - t0,
           **info}
    path = write_results(out, {data.name(category): metrics}, run)
    print_metrics(data.name(category), metrics)
    print(f"results: {path}")
    return metrics


def _finished(folder: Path, epochs: int, test: bool, lead: bool) -> bool:
    """``resume`` on a run that already finished: say so and touch nothing (True), else False."""
    from .run_folder import finished_run
    meta = finished_run(folder, epochs)
    if meta is None:
        return False
    if lead:
        done = meta.get("epoch")
        longer = (f"; it was trained for {count(done, 'epoch')}, more than the {epochs} asked for: train into "
                  "another folder for a shorter run") if done != epochs else ""
        then = f"; test it with `nferd test --checkpoint {folder}`" if test else ""
        print(f"{folder}: training finished earlier ({count(done, 'epoch')}, {folder / 'model.safetensors'}): "
              f"nothing to resume, nothing changed{longer}{then}")
    return True


def _report_trained(folder: Path, summary: dict[str, Any]) -> None:
    from .safe_io import write_json
    write_json(folder / "train_summary.json", summary, default=str)
    loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    skipped = len(summary.get("skipped_images", []))
    print(f"done in {summary['train_seconds']:.0f} s (+{summary['feature_seconds']:.0f} s teacher features); "
          f"final loss {loss}; {count(summary['n_train'], 'image')} trained on"
          + (f", {count(skipped, 'unreadable image')} skipped" if skipped else "")
          + f"; checkpoint {summary['checkpoint']}")


def print_metrics(name: str, m: dict[str, Any]) -> None:
    """One line of a category's metrics (and why pixel metrics are absent, when they are)."""
    keys = ("image_auroc", "image_ap", "image_f1max", "miss_at_1pct_fa") + (() if m.get("pixel_metrics_absent") else
                                                         ("pixel_auroc", "aupro", "pixel_ap", "segf1", "aupro_0.05"))
    print(f"{name}: " + "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m))
    if m.get("pixel_metrics_absent"):
        print(f"{name}: pixel metrics absent: {m['pixel_metrics_absent']}")
