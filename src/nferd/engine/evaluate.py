"""Evaluation: batched inference over a test set, the field's metrics, and result files.

Maps are computed at the model's resolution (RD4AD protocol); everything up to the blurred map
and the image score runs on the model's device, in bf16 where the hardware has it. A model that
scores any test image NaN or infinite is refused (``NonFiniteError``), since no metric or decision
means anything then; a metric that cannot be computed is written as ``null`` (strict JSON).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.tiles import Tiling
from ..metrics import compute_metrics
from ..models.nferd import NFERD
from . import safe_io, scoring
from .device import autocast, autocast_dtype, channels_last, inference_copy, place, resolve_device
from .finite import require_finite

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_ap", "image_ap", "miss_at_1pct_fa", "segf1",
               "aupro_0.05")
PIXEL_KEYS = ("pixel_auroc", "aupro", "pixel_ap")


@torch.no_grad()
def infer(model: NFERD, dataset: Dataset, batch_size: int = 16, device: str | torch.device = "auto",
          precision: str = "auto", num_workers: int = 0, progress: bool = False,
          tiling: Tiling | None = None) -> dict[str, Any]:
    """Scores (N), maps (N x H x W float32), labels, masks (uint8) and paths for ``dataset``; with
    ``tiling``, ``dataset`` holds full-resolution images (all of one size), scored tile by tile."""
    device = resolve_device(device) if isinstance(device, str) else device
    amp = autocast_dtype(device, precision)
    runner = inference_copy(place(model.eval(), device), amp)

    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Maps (N x H x W) and scores of a batch, a CPU micro-batch at a time."""
        return scoring.in_micro_batches(lambda x: scoring.score_batch(runner, x, device, amp), images,
                                        scoring.cpu_step(device, images))

    loader = DataLoader(dataset, batch_size=1 if tiling else batch_size, shuffle=False, num_workers=num_workers)
    scores, maps, labels, masks, paths, types = [], [], [], [], [], []
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc="inference", unit="image" if tiling else "batch", leave=False)
    t0 = time.perf_counter()
    for batch in it:
        if tiling is None:
            m, sc = run(batch["image"])
        else:
            stitched, score = tiling.score(batch["image"][0], lambda tiles: torch.from_numpy(run(tiles)[0]))
            m, sc = stitched[None].numpy(), np.array([score], dtype=np.float32)
            if maps and maps[0].shape[1:] != m.shape[1:]:
                raise ValueError(f"tiled evaluation needs images of one size: {batch['path'][0]} is "
                                 f"{tuple(m.shape[1:])}, the first was {maps[0].shape[1:]}")
        maps.append(m)
        scores.append(sc)
        labels.append(np.asarray(batch["label"]))
        masks.append((batch["mask"][:, 0] > 0.5).numpy().astype(np.uint8))
        paths += list(batch["path"])
        types += list(batch["defect_type"])
    seconds = time.perf_counter() - t0
    return {"scores": np.concatenate(scores), "maps": np.concatenate(maps), "labels": np.concatenate(labels),
            "masks": np.concatenate(masks), "paths": paths, "defect_types": types, "seconds": seconds}


@torch.no_grad()
def fit_map_norm(model: NFERD, dataset: Dataset | None, batch_size: int = 16, device: str | torch.device = "auto",
                 precision: str = "auto", left_out: Dataset | None = None,
                 folds: list[tuple[NFERD, Dataset]] = ()) -> list[float]:
    """Mean and standard deviation, over every pixel of ``dataset`` (normal images, never the test
    split), of the student's and the bank's blurred maps; stored in ``model.map_norm`` so that the
    two enter the anomaly map on one scale. Returns [mean_s, std_s, mean_d, std_d].

    ``left_out``: the training images, whose memory distance is scored with each image's own
    memory rows left out, so the distance's statistics come from more good images than the
    hold-out (the student's come from ``dataset`` alone, since it has seen the training images,
    unless there is no ``dataset``). ``folds``: cross-fitted models with the training images they
    never saw (``engine.crossfit``), whose student maps count among the normals' too."""
    if not hasattr(model, "map_norm"):
        raise ValueError("this model has no bank distance in its map (bank_distance_weight is 0)")
    device = resolve_device(device) if isinstance(device, str) else device
    amp = autocast_dtype(device, precision)
    model = place(model.eval(), device)
    sums = torch.zeros(2, 3, dtype=torch.float64)  # per term: count, sum, sum of squares
    passes = [(model, dataset, False)] if dataset is not None else []
    if left_out is not None:
        passes.append((model, left_out, True))
    passes += [(place(fm.eval(), device), fset, None) for fm, fset in folds]
    honest_student = dataset is not None or bool(folds)
    for scorer, images_set, leave_out in passes:
        start = 0
        for batch in DataLoader(images_set, batch_size=batch_size, shuffle=False):
            images = channels_last(batch["image"].to(device))
            ids = torch.arange(start, start + len(images), device=device) if leave_out else None
            start += len(images)
            with autocast(device, amp):
                t, s = scorer(images)
            terms = scorer.term_maps(t, s, tuple(images.shape[-2:]), exclude=ids)
            for j, (row, m) in enumerate(zip(sums, terms)):
                if (leave_out and j == 0 and honest_student) or (leave_out is None and j == 1):
                    # the student has seen these images (its map there is no normal's);
                    # a fold's memory is not the model's
                    continue
                m = m.double().cpu()
                row += torch.stack([torch.tensor(float(m.numel()), dtype=torch.float64), m.sum(), (m * m).sum()])
    mean = sums[:, 1] / sums[:, 0]
    std = (sums[:, 2] / sums[:, 0] - mean ** 2).clamp_min(0).sqrt()
    if not bool(torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError("cannot standardise the anomaly map: its terms do not vary on these normal images")
    values = [float(mean[0]), float(std[0]), float(mean[1]), float(std[1])]
    model.map_norm.copy_(torch.tensor(values))
    return values


def evaluate(model: NFERD, dataset: Dataset, **kw: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of ``model`` on a labelled test set, and the raw inference results (see :func:`infer`,
    plus ``has_masks``). Raises ``NonFiniteError`` when a score or map is NaN or infinite."""
    if not getattr(dataset, "labelled", True):
        raise ValueError("this split has no labels (MVTec AD 2's private tests): it cannot be evaluated here; "
                         "write its maps for the evaluation server with `nferd mvtec-ad2-submission`")
    res = infer(model, dataset, **kw)
    require_finite(res["scores"], res["maps"], res["paths"], what="test images")
    has_masks = getattr(dataset, "has_masks", True)
    metrics = compute_metrics(res["scores"], res["labels"],
                              res["maps"] if has_masks else None, res["masks"] if has_masks else None)
    if not has_masks:  # image labels alone: pixel metrics are absent (null), and the reason is said
        metrics.update({k: float("nan") for k in PIXEL_KEYS})
        metrics["pixel_metrics_absent"] = getattr(dataset, "no_masks_reason", None) or "the test set has no masks"
    metrics["n_images"] = int(len(res["scores"]))
    metrics["inference_seconds"] = res["seconds"]
    res["has_masks"] = has_masks  # False: the masks are placeholders, not ground truth (report, callers)
    return metrics, res


def mvtec_ad2_metrics(model: NFERD, raw: dict[str, Any], validation: Dataset, **kw: Any) -> dict[str, float]:
    """MVTec AD 2's published metrics of a test run (``raw`` from :func:`evaluate`): SegF1 of the
    maps binarised at the mean + 3 std of the good validation images' maps, and AU-PRO up to a
    false-positive rate of 0.05."""
    from ..metrics import aupro, segmentation_f1, validation_threshold
    if not raw.get("has_masks", True):
        return {}
    val = infer(model, validation, **kw)
    require_finite(val["scores"], val["maps"], val["paths"], what="validation images")
    thr = validation_threshold(val["maps"])
    return {"segf1": segmentation_f1(raw["maps"], raw["masks"], thr), "segf1_threshold": thr,
            "aupro_0.05": aupro(raw["maps"], raw["masks"], fpr_limit=0.05)}


def _cell(value: Any) -> str:
    """A metric for a table: 4 decimals, or a dash when it is absent or could not be computed."""
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _info_value(key: str, value: Any) -> str:
    """Run facts for people: times in seconds to 0.1 s, other floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.1f} s" if key.endswith("_seconds") else f"{value:.4g}"
    return str(value)


def write_results(out_dir: str | Path, rows: dict[str, dict[str, Any]], run_info: dict[str, Any]) -> Path:
    """``results.json`` (mean metrics at top level, per category, run info; strict JSON, a metric that
    cannot be computed is ``null``) + Markdown and CSV tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # every category NaN: the mean is NaN too, written as null
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {k: float(np.nanmean([r[k] for r in rows.values() if k in r])) for k in METRIC_KEYS
                if any(k in r for r in rows.values())}
    obj = {**mean, "categories": rows, "run": run_info}
    safe_io.write_json(out / "results.json", obj, default=str)
    keys = [k for k in METRIC_KEYS if k in mean]
    lines = ["| category | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in [*rows.items(), ("mean", mean)]:
        lines.append(f"| {name} | " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    notes = [f"{name}: pixel metrics absent: {r['pixel_metrics_absent']}" for name, r in rows.items()
             if r.get("pixel_metrics_absent")]
    info = ", ".join(f"{k}: {_info_value(k, v)}" for k, v in run_info.items() if not isinstance(v, dict))
    safe_io.write_text(out / "results.md", "\n".join(lines) + "".join(f"\n\n{n}" for n in notes) + f"\n\n{info}\n")
    safe_io.write_csv(out / "results.csv", ["category", *keys],  # a category name cannot run as a formula
                      ([name, *(r.get(k, "") for k in keys)] for name, r in [*rows.items(), ("mean", mean)]))
    return out / "results.json"
