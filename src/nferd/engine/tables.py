"""Markdown tables of benchmark result files: mean and spread over seeds, the default against
both peers, thresholds on the test split, speed and provenance.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from .benchmark import METRICS

SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "neon")


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


def _peer_cell(peer: dict[str, Any] | None) -> str:
    """anomalib's latency timed in the same run (``nferd speed --peer anomalib``), with this row's
    latency over it measured pairwise."""
    if not peer:
        return "–"
    cell = f"torch {peer['infer_latency_ms_b1']:.1f} (ratio {peer['latency_ratio_b1']:.2f})"
    ov = peer.get("openvino")
    if ov:  # anomalib's own OpenVINO export, compiled with OpenVINO's defaults
        precision = "bf16" if "bfloat16" in str(ov["precision"]) else "fp32"
        cell += f"; OpenVINO {precision} {ov['infer_latency_ms_b1']:.1f} (ratio {ov['latency_ratio_b1']:.2f})"
    return f"{cell}; anomalib {peer['version']}"


def speed_table(rows: list[dict[str, Any]]) -> str:
    """``nferd speed`` result files: latency, throughput and achieved GFLOP/s against the measured
    matmul peak, with the machine each was measured on."""
    head = ["teacher", "model", "backend", "precision", "threads", "batch-1 latency ms (p95)", "batch img/s",
            "training img/s", "GFLOPs / image", "GFLOP/s (peak)", "anomalib RD, same run: batch-1 ms (this row / it)",
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
