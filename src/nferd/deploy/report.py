"""Self-contained HTML test report: metrics table, ROC and PRO curves, score histogram, heatmap gallery.

One ``report.html`` with every image embedded as a base64 PNG, so it can be mailed or archived and
opens anywhere without the run folder. The gallery shows what an engineer has to look at: the
defective images with the lowest scores (where the misses are), the good images with the highest
scores (the false alarms) and the clearest detections, each as image, heatmap overlay and GT mask.

Memory stays bounded on big test sets: :func:`prepare_category` reduces one category's inference
results (all its anomaly maps) to curves, scores and a few downsampled thumbnails, so a
``--category all`` report holds one category's maps at a time. The PRO curve comes from the binned
code of :mod:`nferd.metrics`, the same thresholds as the reported AUPRO.

Decisions fail closed: an image whose score (or gallery map) is NaN or infinite is shown as ERROR,
never OK, and is left out of the curves and the histogram.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import ImageLoadError, load_image
from ..engine import safe_io
from ..engine.calibration import (
    Calibration,
    NonFiniteError,
    as_calibration,
    decision,
    display_range,
    mid_scale_range,
)
from ..engine.evaluate import METRIC_KEYS
from ..engine.jsonio import dumps
from ..metrics import pro_curve
from .explain import nearest_normal, side_by_side
from .report_plots import ReportError, fmt, histogram_plot, pro_plot, require_matplotlib, roc_plot
from .visualize import overlay

__all__ = ["ReportError", "prepare_category", "require_matplotlib", "write_report"]


#: Gallery groups, in display order: (kind, heading).
GALLERY_GROUPS = (
    ("miss", "Defective images with the lowest scores (misses are here)"),
    ("false_alarm", "Good images with the highest scores (false alarms are here)"),
    ("detection", "Defective images with the highest scores (clearest detections)"),
)


def _png_b64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _image_rgb(path: str, hw: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """The test image at ``hw`` as uint8 RGB; a grey placeholder (and the reason) if it cannot be read."""
    try:
        img = load_image(path, hw)
    except (ImageLoadError, OSError, ValueError) as e:
        return np.full((*hw, 3), 128, np.uint8), f"image not readable: {e}"
    return (img.numpy().transpose(1, 2, 0) * 255 + 0.5).clip(0, 255).astype(np.uint8), None


def _thumb_hw(hw: tuple[int, int], thumb_px: int) -> tuple[int, int]:
    scale = min(1.0, thumb_px / max(hw))
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


def _resize(arr: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if arr.shape[:2] == hw:
        return arr
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(arr).resize((hw[1], hw[0]), mode))


def _gallery_indices(scores: np.ndarray, labels: np.ndarray, k: int) -> list[tuple[str, int]]:
    """(kind, index) of the gallery entries: k lowest defective, k highest good, k highest other defective."""
    defective = np.flatnonzero(labels == 1)
    good = np.flatnonzero(labels == 0)
    by_score_d = defective[np.argsort(scores[defective], kind="stable")]
    by_score_g = good[np.argsort(-scores[good], kind="stable")]
    misses = list(by_score_d[:k])
    shown = set(misses)
    rest = [i for i in by_score_d[::-1] if i not in shown]
    return ([("miss", int(i)) for i in misses] + [("false_alarm", int(i)) for i in by_score_g[:k]]
            + [("detection", int(i)) for i in rest[:k]])


def _decision(score: float, cal: Calibration | None) -> str | None:
    """'OK' / 'NOK' at the calibrated threshold, None without calibration, 'ERROR' (never OK) for a
    NaN or infinite score or threshold."""
    try:
        return decision(float(score), cal)
    except NonFiniteError:
        return "ERROR"


def _gallery_entry(kind: str, i: int, prep: Mapping[str, Any], maps: Any, masks: Any,
                   vrange: tuple[float, float], thumb_px: int) -> dict[str, Any]:
    score, label, cal = float(prep["scores"][i]), int(prep["labels"][i]), prep["calibration"]
    entry: dict[str, Any] = {"kind": kind, "index": i, "path": prep["paths"][i], "score": score,
                             "label": label, "defect_type": prep["defect_types"][i]}
    amap = None if maps is None else np.asarray(maps[i], dtype=np.float32)
    dec = "ERROR" if amap is not None and not np.isfinite(amap).all() else _decision(score, cal)
    if dec is not None:
        entry["decision"] = dec
        entry["normalized_score"] = None if dec == "ERROR" or cal is None else float(cal.normalize(score))
    if dec == "ERROR":
        entry["problem"] = "non-finite score or anomaly map (NaN or infinite): no decision, the model is broken"
    if amap is None or dec == "ERROR":
        return entry
    hw = _thumb_hw(amap.shape, thumb_px)
    rgb, problem = _image_rgb(entry["path"], hw)
    small = _resize(amap, hw)
    vmin, vmax = display_range(cal, small) if cal is not None else vrange
    predicted = small > cal.pixel_threshold if cal is not None else None
    entry["image_png"] = _png_b64(rgb)
    entry["overlay_png"] = _png_b64(overlay(rgb, small, vmin, vmax, mask=predicted))
    if masks is not None:
        gt = _resize((np.asarray(masks[i]) > 0).astype(np.uint8) * 255, hw, nearest=True)
        entry["mask_png"] = _png_b64(gt)  # greyscale PNG: a few hundred bytes
    if problem:
        entry["problem"] = problem
    return entry


def _uncalibrated_range(maps: Any, labels: np.ndarray) -> tuple[float, float]:
    """Heatmap colours without a calibration: as :func:`display_range`, with the test set's good images
    standing in for the held-out ones (median at the bottom, their 99.9 % quantile mid-scale), so that
    red means "more than good images reach". Estimated on at most 200 images at about 128 x 128 px."""
    maps = np.asarray(maps)
    good = np.flatnonzero(labels == 0)[:200]
    if good.size == 0:
        return float(np.min(maps)), float(max(np.max(maps), np.min(maps) + 1e-6))
    step = max(1, round(max(maps.shape[1:]) / 128))
    sample = maps[:, ::step, ::step][good].astype(np.float32, copy=False)
    return mid_scale_range(float(np.median(sample)), float(np.quantile(sample, 0.999)))


def prepare_category(data: Mapping[str, Any], calibration: Calibration | Mapping[str, Any] | None = None,
                     gallery_size: int = 4, thumb_px: int = 256, fpr_limit: float = 0.3) -> dict[str, Any]:
    """Reduce one category's results to what the report shows (curves, scores, thumbnails).

    ``data``: ``metrics`` (dict), ``scores``, ``labels`` (1 = defective) and ``paths`` per image;
    optional ``maps`` and ``masks`` (N x H x W), ``defect_types``, ``has_masks`` (False: the masks
    are not ground truth, no PRO curve and no mask panel) and ``calibration`` (overrides the argument).
    A calibration is a ``Calibration`` or its JSON object (a checkpoint's or a user's file), checked here.
    The result no longer references the maps, so the caller can drop them.
    """
    from sklearn.metrics import roc_curve
    if gallery_size < 0:
        raise ValueError(f"gallery size must be >= 0, got {gallery_size}")
    scores = np.asarray(data["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(data["labels"]).astype(int).reshape(-1)
    if not (scores.size == labels.size == len(data["paths"])):
        raise ValueError(f"report data: {scores.size} scores, {labels.size} labels, {len(data['paths'])} paths")
    try:
        cal = as_calibration(data.get("calibration") or calibration)
    except ValueError as e:
        raise ReportError(f"unusable calibration, no decisions can be shown: {e}") from e
    maps = data.get("maps")
    masks = data.get("masks") if data.get("has_masks", True) else None
    out: dict[str, Any] = {"prepared": True, "metrics": dict(data["metrics"]), "scores": scores, "labels": labels,
                           "paths": [str(p) for p in data["paths"]], "calibration": cal, "fpr_limit": fpr_limit,
                           "defect_types": list(data.get("defect_types") or [""] * scores.size)}
    ok = np.isfinite(scores)  # non-finite scores are errors: shown as such, kept out of the curves
    out["roc"] = roc_curve(labels[ok], scores[ok])[:2] if 0 < labels[ok].sum() < ok.sum() else None
    out["pro"] = None
    if maps is not None and masks is not None and 0 < np.count_nonzero(masks) < np.asarray(masks).size:
        fpr, pro = pro_curve(maps, masks)
        end = int(np.searchsorted(fpr, fpr_limit, side="right")) + 1  # keep the first point past the limit
        out["pro"] = (fpr[:end].copy(), pro[:end].copy())
    use_good = maps is not None and cal is None and gallery_size > 0
    vrange = _uncalibrated_range(maps, labels) if use_good else (0.0, 1.0)
    out["gallery"] = [_gallery_entry(kind, i, out, maps, masks, vrange, thumb_px)
                      for kind, i in _gallery_indices(scores, labels, gallery_size)]
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}tr.mean{font-weight:bold;background:#f3f3f3}
.plots img{margin:.3em;border:1px solid #ddd}.gallery{display:flex;flex-wrap:wrap;gap:.8em}
figure.entry{margin:0;padding:.4em;border:1px solid #ddd;border-radius:4px}
figure.entry img{width:160px;image-rendering:pixelated;margin-right:2px}
figcaption{font-size:.8em;max-width:490px;word-break:break-all}.nok{color:#b00;font-weight:bold}
.ok{color:#070;font-weight:bold}.note{color:#666;font-size:.9em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _mean_row(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Mean over categories, exactly as results.json computes it (NaN-skipping)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: float(np.nanmean([r[k] for r in rows.values() if k in r])) for k in METRIC_KEYS
                if any(k in r for r in rows.values())}


def _metrics_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    keys = [k for k in METRIC_KEYS if any(k in r for r in rows.values())]
    head = "".join(f"<th>{_e(k)}</th>" for k in [*keys, "n_images"])
    body = []
    entries: list[tuple[str, Mapping[str, Any], str]] = [(n, r, "") for n, r in rows.items()]
    if len(rows) > 1:
        entries.append(("mean", _mean_row(rows), "mean"))
    for name, r, cls in entries:
        cells = "".join(f'<td data-key="{k}" data-value="{_e(repr(float(r[k])))}">{fmt(r[k])}</td>' if k in r
                        else f'<td data-key="{k}">n/a</td>' for k in keys)
        cells += f"<td>{fmt(r['n_images'])}</td>" if "n_images" in r else "<td></td>"
        body.append(f'<tr class="{cls}" data-category="{_e(name)}"><td>{_e(name)}</td>{cells}</tr>')
    notes = "".join(f'<p class="note" data-category="{_e(n)}">{_e(n)}: pixel metrics absent: '
                    f'{_e(r["pixel_metrics_absent"])}</p>' for n, r in rows.items() if r.get("pixel_metrics_absent"))
    return (f'<table id="metrics"><thead><tr><th>category</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>{notes}")


def _decision_html(entry: Mapping[str, Any]) -> str:
    if "decision" not in entry:
        return ""
    if entry["decision"] == "ERROR":
        return ' &middot; <span class="nok">ERROR</span> (no decision)'
    wrong = (entry["decision"] == "OK") == (entry["label"] == 1)
    tag = " (miss)" if wrong and entry["label"] == 1 else " (false alarm)" if wrong else ""
    cls = "nok" if entry["decision"] == "NOK" else "ok"
    return f' &middot; <span class="{cls}">{entry["decision"]}{tag}</span> ({entry["normalized_score"]:.3f})'


def add_explanations(prep: dict[str, Any], model: Any, memory_images: list[str] | None, maps: np.ndarray) -> None:
    """Beside each gallery entry, its highest-scoring region and the closest normal region in the
    model's memory (``deploy.explain``); ``maps`` are the category's maps at the model's size."""
    for g in prep["gallery"]:
        try:
            image = load_image(g["path"], model.config.image_size)
        except ImageLoadError:
            continue
        near = nearest_normal(model, image, np.asarray(maps[g["index"]]), memory_images)
        g["nearest_normal"] = near
        pair = side_by_side(g["path"], near, side=96)
        if pair is not None:
            g["nearest_png"] = _png_b64(pair)


def _nearest_html(g: dict[str, Any]) -> str:
    near = g.get("nearest_normal")
    if not near:
        return ""
    if not near.get("available"):
        return f'<br><span class="note">no explanation: {_e(near["reason"])}</span>'
    where = f"training image {_e(near['normal_image'])}" if near.get("normal_image") else "a training image"
    return (f"<br>closest normal region: {where}, distance {near['distance']:.4g}"
            + ("" if "nearest_png" in g else f' <span class="note">({_e(near.get("normal_note", ""))})</span>'))


def _gallery_html(name: str, prep: dict[str, Any]) -> str:
    parts = []
    for kind, heading in GALLERY_GROUPS:
        entries = [g for g in prep["gallery"] if g["kind"] == kind]
        if not entries:
            continue
        figs = []
        for g in entries:
            imgs = "".join(f'<img data-panel="{p}" alt="{p} of {_e(Path(g["path"]).name)}" '
                           f'src="data:image/png;base64,{g[p + "_png"]}">'
                           for p in ("image", "overlay", "mask", "nearest") if p + "_png" in g)
            where = "/".join(Path(g["path"]).parts[-2:])
            cap = (f"{_e(where)}<br>{'defective' if g['label'] else 'good'}"
                   f"{' (' + _e(g['defect_type']) + ')' if g['label'] and g['defect_type'] else ''}"
                   f" &middot; score {g['score']:.4g}{_decision_html(g)}")
            cap += _nearest_html(g)
            if "problem" in g:
                cap += f'<br><span class="note">{_e(g["problem"])}</span>'
            figs.append(f'<figure class="entry" data-category="{_e(name)}" data-kind="{kind}" '
                        f'data-index="{g["index"]}" data-score="{g["score"]!r}" data-label="{g["label"]}">'
                        f"<div>{imgs}</div><figcaption>{cap}</figcaption></figure>")
        parts.append(f'<h4>{_e(heading)}</h4><div class="gallery" data-kind="{kind}">{"".join(figs)}</div>')
    if not parts:
        return ""
    legend = ("image, heatmap overlay" + (" (white outline: pixels above the calibrated pixel threshold)"
                                          if prep["calibration"] is not None else
                                          " (no calibration: colours scaled on this test set's good images)")
              + (", ground-truth mask" if any("mask_png" in g for g in prep["gallery"]) else "")
              + (", and the highest-scoring region (red) beside the closest normal region in the memory (green)"
                 if any("nearest_png" in g for g in prep["gallery"]) else ""))
    return f'<h3>Gallery</h3><p class="note">Each entry: {legend}.</p>' + "".join(parts)


def _threshold_html(prep: dict[str, Any]) -> str:
    cal = prep["calibration"]
    if cal is None:
        return '<p class="note">The checkpoint has no calibration: no decision threshold to show.</p>'
    y = prep["labels"]
    dec = np.array([_decision(s, cal) for s in prep["scores"]], dtype=object)
    n_good, n_bad, n_err = int((y == 0).sum()), int((y == 1).sum()), int((dec == "ERROR").sum())
    desc = _e(cal.describe())
    errors = (f" <b>{n_err}</b> images have a NaN or infinite score: ERROR, no decision." if n_err else "")
    return (f'<p class="threshold">At the calibrated threshold: <b>{int((dec[y == 0] == "NOK").sum())} of {n_good}'
            f"</b> good images flagged (false alarms), <b>{int((dec[y == 1] == 'OK').sum())} of {n_bad}</b> "
            f"defective images passed (misses).{errors}<br><span class=\"note\">calibration: {desc}</span></p>")


def _scores_table(name: str, prep: dict[str, Any]) -> str:
    cal = prep["calibration"]
    order = np.argsort(-prep["scores"], kind="stable")
    rows = []
    for i in order:
        dec = _decision(prep["scores"][i], cal) or ""
        rows.append(f'<tr data-index="{i}" data-label="{prep["labels"][i]}" data-score="{float(prep["scores"][i])!r}">'
                    f"<td>{_e('/'.join(Path(prep['paths'][i]).parts[-2:]))}</td>"
                    f"<td>{'defective' if prep['labels'][i] else 'good'}</td><td>{prep['scores'][i]:.6g}</td>"
                    f"<td>{dec}</td></tr>")
    return (f"<details><summary>All {len(order)} test images of {_e(name)} by score</summary>"
            f'<table class="scores" data-category="{_e(name)}"><thead><tr><th>image</th><th>label</th>'
            f"<th>score</th><th>decision</th></tr></thead><tbody>{''.join(rows)}</tbody></table></details>")


def _category_html(name: str, prep: dict[str, Any]) -> str:
    plots = []
    for kind, make, missing in (("roc", roc_plot, "no ROC curve: the test set needs good and defective images"),
                                ("pro", pro_plot, "no PRO curve: no ground-truth defect masks"),
                                ("histogram", histogram_plot, "")):
        if kind != "histogram" and prep[kind] is None:
            plots.append(f'<p class="note">{_e(missing)}</p>')
            continue
        plots.append(f'<img class="plot" data-kind="{kind}" data-category="{_e(name)}" alt="{kind} of {_e(name)}" '
                     f'src="data:image/png;base64,{make(name, prep)}">')
    return (f'<section class="category" data-category="{_e(name)}"><h2>{_e(name)}</h2>'
            f'<div class="plots">{"".join(plots)}</div>{_threshold_html(prep)}{_gallery_html(name, prep)}'
            f"{_scores_table(name, prep)}</section>")


def _run_html(run_info: Mapping[str, Any]) -> str:
    flat = [(k, v) for k, v in run_info.items() if not isinstance(v, (dict, list))]
    items = "".join(f"<li>{_e(k)}: {fmt(v)}</li>" for k, v in flat)
    full = _e(dumps(dict(run_info), indent=2, default=str))
    return f'<ul class="run">{items}</ul><details><summary>run details</summary><pre>{full}</pre></details>'


def write_report(out_dir: str | Path, categories: Mapping[str, Mapping[str, Any]], run_info: Mapping[str, Any],
                 calibration: Calibration | Mapping[str, Any] | None = None, gallery_size: int = 4) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    ``categories``: name -> the results of :func:`prepare_category` or its raw input (``metrics``,
    ``scores``, ``labels``, ``paths``, optional ``maps``, ``masks``, ``defect_types``,
    ``calibration``). ``calibration`` applies to raw categories that bring none of their own.
    """
    require_matplotlib()
    if not categories:
        raise ValueError("write_report needs at least one category")
    prepared = {name: (dict(d) if d.get("prepared") else prepare_category(d, calibration, gallery_size))
                for name, d in categories.items()}
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>nferd test report</title>'
           f"<style>{_CSS}</style></head><body><h1>nferd test report</h1>"
           f'<p class="note">generated {stamp}</p>{_run_html(run_info)}<h2>Metrics</h2>'
           f"{_metrics_table({n: d['metrics'] for n, d in prepared.items()})}"
           f"{''.join(_category_html(n, d) for n, d in prepared.items())}</body></html>\n")
    out = Path(out_dir)  # the folder the user names may be a link (safe_io's policy); the file never is
    out.mkdir(parents=True, exist_ok=True)
    return safe_io.write_text(out / "report.html", doc)
