"""The benchmark runner: one result file per grid cell with its provenance, done runs skipped,
and the README / docs tables equal to what the renderer makes of the committed result files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks.render import README_END, README_START, render_method_doc, render_readme, render_results_doc
from benchmarks.render import main as render_main
from nferd.cli import main
from nferd.engine.benchmark import Run, few_images, load_results, load_speed_results, run_grid
from nferd.engine.tables import load_calibration_results, summary_table, versus_table

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = ("date", "git_commit", "nferd_version", "torch_version", "cpu_model", "cpu_flags", "threads",
              "device", "precision", "command")


def test_grid_writes_one_result_per_run_and_skips_done_runs(synth_root: Path, tmp_path: Path) -> None:
    cat = next(p.name for p in synth_root.iterdir() if p.is_dir())
    runs = [Run(str(synth_root), cat, model, "efficientnet_lite0", 64, 1, 0) for model in ("nferd", "rd4ad")]
    logs: list[str] = []
    written = run_grid(runs, tmp_path / "results", tmp_path / "work", threads=2, log=logs.append,
                       argv=["benchmark", "run", "--epochs", "1"])
    assert written == [r.result_path(tmp_path / "results") for r in runs] and all(p.is_file() for p in written)
    for path, run in zip(written, runs):
        res = json.loads(path.read_text())
        assert (res["model"], res["category"], res["epochs"], res["seed"]) == (run.model, cat, 1, 0)
        assert all(res["provenance"].get(k) not in (None, "") for k in PROVENANCE if k != "git_commit")
        assert res["provenance"]["command"] == "nferd benchmark run --epochs 1"
        assert res["config"]["model"]["bank"] == (run.model == "nferd")
        assert 0.0 <= res["metrics"]["pixel_auroc"] <= 1.0 and res["n_test"] > 0
    again = run_grid(runs, tmp_path / "results", tmp_path / "work", threads=2, log=logs.append)
    assert again == [] and "2 done before, 0 to run" in logs[-1]
    # RD4AD's student is the default's: the second run took the first one's instead of training it
    nferd, rd = (json.loads(p.read_text()) for p in written)
    assert "student_from" not in nferd and rd["student_from"].endswith(runs[0].key)
    assert rd["metrics"] != nferd["metrics"]
    for res in (nferd, rd):  # what the calibrated threshold did on the test split, beside its promise
        at = res["at_threshold"]
        assert at["good"] + at["defective"] == res["n_test"] and 0 < at["promised_false_alarm_bound"] < 1


def test_a_few_image_run_trains_on_a_seeded_subset_and_names_it(synth_root: Path, tmp_path: Path) -> None:
    cat = next(p.name for p in synth_root.iterdir() if p.is_dir())
    run = Run(str(synth_root), cat, "patchcore", "efficientnet_lite0", 64, 1, 3, train_images=10)
    assert run.key.endswith("-1ep-10img-seed3")
    res = json.loads(run_grid([run], tmp_path / "r", tmp_path / "w", threads=2, log=lambda _: None)[0].read_text())
    assert res["n_train"] == 10 and res["train_images"] == 10
    assert few_images(12, 10, 3) != few_images(12, 10, 4) and len(set(few_images(12, 10, 3))) == 10
    with pytest.raises(ValueError, match="more than"):
        few_images(12, 13, 0)


def fake(model: str, seed: int, auroc: float) -> dict:
    return {"dataset": "d", "category": "c", "teacher": "t", "image_size": 64, "epochs": 5, "model": model,
            "seed": seed, "metrics": {"image_auroc": auroc, "pixel_auroc": auroc, "aupro": auroc, "pixel_ap": auroc},
            "timing": {"inference_ms_per_image": 10.0, "train_seconds": 1.0},
            "provenance": {"date": "2026-01-01T00:00:00", "git_commit": "abc", "cpu_model": "cpu", "cpu_flags": [],
                           "threads": 1, "torch_version": "x", "precision": "fp32"}}


def test_summary_is_mean_and_sample_spread_over_seeds() -> None:
    rows = [fake("nferd", 0, 0.9), fake("nferd", 1, 0.8), fake("nferd", 2, 0.7), fake("rd4ad", 0, 0.5)]
    table = summary_table(rows)
    spread = statistics.stdev([0.9, 0.8, 0.7])
    assert f"| 3 | 0.8000 ± {spread:.4f} |" in table
    assert "| rd4ad | 1 | 0.5000 |" in table  # one seed: its value alone
    readme = f"intro\n{README_START}\nold table\n{README_END}\noutro\n"
    new = render_readme(readme, rows)
    assert "old table" not in new and new.startswith("intro\n") and new.endswith("outro\n") and table in new
    with pytest.raises(ValueError, match="markers"):
        render_readme("no markers", rows)


def test_committed_results_carry_provenance_and_match_the_readme_and_docs() -> None:
    results = ROOT / "benchmarks" / "results"
    rows = load_results(results)
    if not rows:
        pytest.skip("no committed result files")
    for r in rows:
        missing = [k for k in PROVENANCE if not r["provenance"].get(k)]
        assert not missing, f"{r['dataset']}/{r['category']}/{r['model']} seed {r['seed']}: no {missing}"
    calibration = load_calibration_results(ROOT / "benchmarks" / "calibration")
    speed = load_speed_results(ROOT / "benchmarks" / "speed")
    assert (ROOT / "docs" / "results.md").read_text() == render_results_doc(rows, calibration, speed)
    readme = (ROOT / "README.md").read_text()
    assert render_readme(readme, rows, speed) == readme
    screen = json.loads((ROOT / "benchmarks" / "screens" / "map_terms.json").read_text())
    method = (ROOT / "docs" / "method.md").read_text()
    assert render_method_doc(method, rows, screen) == method
    assert render_main(["--check", "--results", str(results),
                        "--calibration", str(ROOT / "benchmarks" / "calibration"), "--docs",
                        str(ROOT / "docs" / "results.md"), "--readme", str(ROOT / "README.md"),
                        "--method", str(ROOT / "docs" / "method.md"),
                        "--screen", str(ROOT / "benchmarks" / "screens" / "map_terms.json"),
                        "--speed", str(ROOT / "benchmarks" / "speed")]) == 0


def test_versus_table_pairs_seeds_with_the_baseline() -> None:
    def row(model: str, seed: int, auroc: float, aupro: float | None) -> dict:
        return {"dataset": "d", "category": "c", "teacher": "t", "image_size": 64, "epochs": 1, "model": model,
                "seed": seed, "metrics": {"image_auroc": auroc, "pixel_auroc": 0.5, "aupro": aupro}}
    rows = [row("rd4ad", 0, 0.80, 0.90), row("rd4ad", 1, 0.70, 0.92), row("rd4ad", 2, 0.75, 0.91),
            row("nferd", 0, 0.85, 0.93), row("nferd", 1, 0.71, None)]  # seed 2 not run; seed 1 has no AUPRO
    line = [ln for ln in versus_table(rows).splitlines() if "| nferd |" in ln][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "0,1"  # only the seeds both models ran
    assert cells[3] == "+0.0300 (+0.0100 … +0.0500)"  # mean, smallest and largest per-seed difference
    assert cells[4] == "+0.0000 (+0.0000 … +0.0000)" and cells[5] == "–"  # a missing metric is a dash


def test_benchmark_table_prints_the_tables_of_a_results_folder(tmp_path, capsys) -> None:
    folder = tmp_path / "results" / "d" / "c"
    folder.mkdir(parents=True)
    for r in (fake("nferd", 0, 0.9), fake("nferd", 1, 0.8), fake("rd4ad", 0, 0.5)):
        (folder / f"{r['model']}-seed{r['seed']}.json").write_text(json.dumps(r))
    assert main(["benchmark", "table", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert f"| 0.8500 ± {statistics.stdev([0.9, 0.8]):.4f} |" in out and "| rd4ad | 1 | 0.5000 |" in out
    assert main(["benchmark", "table", "--results", str(tmp_path / "none")]) == 2
