"""Render the result tables into the README and the docs, between their markers.

Repository tooling, not part of the package: the README's and docs' tables are rebuilt from the
result files that the benchmark commands wrote, so no figure is typed by hand.

    python benchmarks/render.py            # rewrite the tables
    python benchmarks/render.py --check    # exit 1 when a page is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from nferd.engine.benchmark import METRICS, load_results, load_speed_results
from nferd.engine.tables import (
    calibration_table,
    load_calibration_results,
    peers_table,
    provenance_table,
    screen_table,
    speed_table,
    summary_table,
    versus_table,
)

README_START = "<!-- results:start (rendered by `python benchmarks/render.py`; do not edit) -->"


README_END = "<!-- results:end -->"


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
        "Rendered by `python benchmarks/render.py` from the result files in `benchmarks/results/` (one JSON",
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


SPEED_START = "<!-- performance:start (rendered by `python benchmarks/render.py`; do not edit) -->"


SPEED_END = "<!-- performance:end -->"




PEERS_START = "<!-- peers:start (rendered by `python benchmarks/render.py`; do not edit) -->"


PEERS_END = "<!-- peers:end -->"


VERSUS_START = "<!-- versus-rd4ad:start (rendered by `python benchmarks/render.py`; do not edit) -->"


VERSUS_END = "<!-- versus-rd4ad:end -->"


SCREEN_START = "<!-- map-terms:start (rendered by `python benchmarks/render.py`; do not edit) -->"


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


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="render the result tables into the README and the docs")
    p.add_argument("--results", default="benchmarks/results", help="`nferd benchmark run` result files")
    p.add_argument("--docs", default="docs/results.md", help="the results page to write")
    p.add_argument("--readme", default="README.md", help="README whose results and performance tables are replaced")
    p.add_argument("--method", default="docs/method.md",
                   help="method page whose comparisons with the peers (and rescoring screen) are replaced")
    p.add_argument("--speed", default="benchmarks/speed", help="`nferd speed --save` result files")
    p.add_argument("--screen", default="benchmarks/screens/map_terms.json",
                   help="rescoring screen of the map's terms (written by benchmarks/map_terms.py)")
    p.add_argument("--calibration", default="benchmarks/calibration",
                   help="folder of `nferd test` results at calibrated thresholds")
    p.add_argument("--check", action="store_true", help="only say whether the pages match (exit 1 when not)")
    args = p.parse_args(argv)
    rows = load_results(Path(args.results))
    if not rows:
        print(f"no result files under '{args.results}'", file=sys.stderr)
        return 2
    outputs = render_all(rows, Path(args.docs), Path(args.readme), Path(args.method), Path(args.speed),
                         Path(args.screen), Path(args.calibration))
    if args.check:
        stale = [str(p) for p, text in outputs.items() if not p.is_file() or p.read_text() != text]
        if stale:
            print(f"out of date with {len(rows)} result files: {', '.join(stale)} (run python benchmarks/render.py)")
            return 1
        print(f"{', '.join(map(str, outputs))} match {len(rows)} result files")
        return 0
    for path, text in outputs.items():
        path.write_text(text)
    print(f"rendered {len(rows)} result files into {', '.join(map(str, outputs))}")
    return 0


def render_all(rows: list[dict[str, Any]], docs: Path, readme: Path, method: Path, speed_dir: Path, screen: Path,
               calibration: Path) -> dict[Path, str]:
    """Each page's new text: the results page, and the README and method page where they exist."""
    speed = load_speed_results(speed_dir)
    outputs = {docs: render_results_doc(rows, load_calibration_results(calibration), speed)}
    if readme.is_file():
        outputs[readme] = render_readme(readme.read_text(), rows, speed)
    if method.is_file():
        outputs[method] = render_method_doc(method.read_text(), rows,
                                            json.loads(screen.read_text()) if screen.is_file() else None)
    return outputs


if __name__ == "__main__":
    sys.exit(main())
