"""The HTML test report: ``nferd test --report`` end to end on a tiny run, write_report on hand-made data,
and the PRO curve the report plots against metrics.aupro."""

from __future__ import annotations

import base64
import io
import json
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nferd import metrics
from nferd.cli import main
from nferd.deploy.report import prepare_category, write_report


class ReportParser(HTMLParser):
    """Collects the metrics table cells, plot images, gallery entries (with their panels) and score rows."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, tuple[str, str]]] = {}  # category -> key -> (data-value, text)
        self.plots: list[dict[str, str]] = []
        self.entries: list[dict[str, Any]] = []
        self.score_rows: list[dict[str, str]] = []
        self.sections: list[str] = []
        self.text: list[str] = []
        self._row: str | None = None
        self._cell: dict[str, str] | None = None
        self._in_metrics = False
        self._score_category: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table" and a.get("id") == "metrics":
            self._in_metrics = True
        elif tag == "table" and "scores" in a.get("class", ""):
            self._score_category = a["data-category"]
        elif tag == "tr" and self._in_metrics and "data-category" in a:
            self._row = a["data-category"]
            self.rows[self._row] = {}
        elif tag == "td" and self._row is not None and "data-key" in a:
            self._cell = {"key": a["data-key"], "value": a.get("data-value", ""), "text": ""}
        elif tag == "tr" and self._score_category is not None and "data-index" in a:
            self.score_rows.append({**a, "category": self._score_category})
        elif tag == "section":
            self.sections.append(a["data-category"])
        elif tag == "figure" and "entry" in a.get("class", ""):
            self.entries.append({**a, "panels": {}})
        elif tag == "img" and "plot" in a.get("class", ""):
            self.plots.append(a)
        elif tag == "img" and "data-panel" in a:
            self.entries[-1]["panels"][a["data-panel"]] = a["src"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            cells = self.rows[self._row]  # type: ignore[index]
            cells[self._cell["key"]] = (self._cell["value"], self._cell["text"].strip())
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._in_metrics, self._score_category = False, None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data


def parse(path: Path) -> ReportParser:
    p = ReportParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def decode_png(src: str) -> tuple[np.ndarray, int]:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    raw = base64.b64decode(src[len(prefix):], validate=True)
    with Image.open(io.BytesIO(raw)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")), len(raw)


def assert_real_plot(src: str) -> None:
    rgb, nbytes = decode_png(src)
    assert nbytes > 5000 and rgb.shape[0] >= 250 and rgb.shape[1] >= 350
    gray = rgb.mean(axis=2)
    assert (gray < 200).mean() > 0.01, "the plot is (almost) blank"  # axes, labels and curves are drawn


def expected_gallery(n_good: int, n_bad: int, k: int) -> dict[str, int]:
    misses = min(k, n_bad)
    return {"miss": misses, "false_alarm": min(k, n_good), "detection": min(k, n_bad - misses)}


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_checkpoint(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    (category,) = [d.name for d in synth_root.iterdir() if (d / "train" / "good").is_dir()]
    ckpt = tmp_path_factory.mktemp("report") / "ckpt"
    assert main(["train", "--data", str(synth_root), "--category", category, "--teacher", "efficientnet_lite0",
                 "--image-size", "64", "--epochs", "1", "--n-bank", "4", "--top-k", "2", "--batch-size", "4",
                 "--holdout", "0.2", "--out", str(ckpt)]) == 0
    return synth_root, category, ckpt


def test_nferd_test_report_matches_results_and_shows_curves_and_gallery(tiny_checkpoint, tmp_path, capsys) -> None:
    data, category, ckpt = tiny_checkpoint
    out = tmp_path / "test"
    assert main(["test", "--checkpoint", str(ckpt), "--data", str(data), "--category", category,
                 "--out", str(out), "--report", "--report-gallery", "2"]) == 0
    report = out / "report.html"
    assert f"report: {report}" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    p = parse(report)

    # metrics table: the numbers of results.json; one category, so no mean row
    assert list(p.rows) == [category]
    row, expected = p.rows[category], results["categories"][category]
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_ap"):
        value, text = row[key]
        assert float(value) == pytest.approx(expected[key], rel=1e-12, abs=1e-12)
        assert text == f"{expected[key]:.4f}"

    # ROC, PRO and histogram images, real PNGs with something drawn
    assert sorted(pl["data-kind"] for pl in p.plots) == ["histogram", "pro", "roc"]
    for pl in p.plots:
        assert pl["data-category"] == category
        assert_real_plot(pl["src"])

    # the checkpoint is calibrated: its threshold is reported
    calibration = json.loads((ckpt / "config.json").read_text())["calibration"]
    text = "".join(p.text)
    assert "At the calibrated threshold" in text and f"image threshold {calibration['image_threshold']:.4g}" in text
    assert "false-alarm rate on new good parts at most" in text  # what the threshold promises, in words

    # gallery: K per group, the right images, each with image, overlay and GT mask
    test_dir = data / category / "test"
    n_good = len(list((test_dir / "good").glob("*.png")))
    n_bad = sum(len(list(d.glob("*.png"))) for d in test_dir.iterdir() if d.name != "good")
    assert len(p.score_rows) == n_good + n_bad == expected["n_images"]
    kinds = [e["data-kind"] for e in p.entries]
    assert {k: kinds.count(k) for k in ("miss", "false_alarm", "detection")} == expected_gallery(n_good, n_bad, 2)
    score = {int(r["data-index"]): float(r["data-score"]) for r in p.score_rows}
    label = {int(r["data-index"]): int(r["data-label"]) for r in p.score_rows}
    bad_by_score = sorted((i for i in score if label[i] == 1), key=lambda i: score[i])
    good_by_score = sorted((i for i in score if label[i] == 0), key=lambda i: -score[i])
    shown = {k: [int(e["data-index"]) for e in p.entries if e["data-kind"] == k]
             for k in ("miss", "false_alarm", "detection")}
    assert shown["miss"] == bad_by_score[:2]
    assert shown["false_alarm"] == good_by_score[:2]
    assert shown["detection"] == bad_by_score[::-1][:2]
    for e in p.entries:
        assert set(e["panels"]) == {"image", "overlay", "mask", "nearest"}  # and why: the closest normal region
        pair, _ = decode_png(e["panels"]["nearest"])
        assert pair.shape[1] > pair.shape[0] and pair.shape[2] == 3  # two panes side by side
        image, _ = decode_png(e["panels"]["image"])
        overlay, _ = decode_png(e["panels"]["overlay"])
        mask, _ = decode_png(e["panels"]["mask"])
        assert image.shape == overlay.shape == mask.shape == (64, 64, 3)
        assert not np.array_equal(image, overlay)
        assert (mask.max() > 0) == (e["data-label"] == "1")  # synthetic defects all have a mask
    assert "closest normal region: training image" in text


def test_category_all_report_has_every_category_and_the_mean(tiny_checkpoint, tmp_path) -> None:
    data, category, ckpt = tiny_checkpoint
    (tmp_path / "data").mkdir()
    (tmp_path / "ck").mkdir()
    for name in ("part_a", "part_b"):  # two categories that reuse the tiny dataset and checkpoint
        (tmp_path / "data" / name).symlink_to(data / category, target_is_directory=True)
        (tmp_path / "ck" / name).symlink_to(ckpt, target_is_directory=True)
    out = tmp_path / "res"
    assert main(["test", "--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "data"),
                 "--category", "all", "--out", str(out), "--report"]) == 0
    results = json.loads((out / "results.json").read_text())
    p = parse(out / "report.html")
    assert list(p.rows) == ["part_a", "part_b", "mean"] and p.sections == ["part_a", "part_b"]
    for name in ("part_a", "part_b", "mean"):
        expected = results if name == "mean" else results["categories"][name]
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_ap"):
            assert float(p.rows[name][key][0]) == pytest.approx(expected[key], rel=1e-12, abs=1e-12)
    assert len(p.plots) == 6


def test_report_without_matplotlib_fails_before_evaluating(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    rc = main(["test", "--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path), "--category", "x",
               "--out", str(tmp_path / "o"), "--report"])
    err = capsys.readouterr().err
    assert rc == 2 and "nferd[report]" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- write_report on hand-made data


def _category(tmp: Path, name: str, seed: int, n_good: int, n_bad: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    n = n_good + n_bad
    labels = np.array([0] * n_good + [1] * n_bad)
    masks = np.zeros((n, 32, 32), np.uint8)
    masks[n_good:, 8:14, 10:20] = 1
    maps = (rng.random((n, 32, 32)) + 0.6 * masks).astype(np.float32)
    scores = maps.reshape(n, -1).max(axis=1)
    paths = []
    for i in range(n):
        path = tmp / f"{name}_{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    m = metrics.compute_metrics(scores, labels, maps, masks)
    return {"metrics": {**m, "n_images": n}, "scores": scores, "labels": labels, "maps": maps, "masks": masks,
            "paths": paths}


def test_write_report_mean_row_calibration_and_missing_masks(tmp_path) -> None:
    a = _category(tmp_path, "a", seed=1, n_good=5, n_bad=4)
    b = _category(tmp_path, "b", seed=2, n_good=2, n_bad=7)
    b["has_masks"] = False  # e.g. a folder dataset without masks: no PRO curve, no mask panel
    b["metrics"]["aupro"] = float("nan")
    cal = {"image_threshold": float(np.median(a["scores"])), "pixel_threshold": 0.9, "pixel_median": 0.5,
           "score_min": float(a["scores"].min()), "method": "normal_quantile"}
    path = write_report(tmp_path / "out", {"a": a, "b": prepare_category(b, gallery_size=3)},
                        {"checkpoint": "ck"}, calibration=cal, gallery_size=3)
    p = parse(path)
    assert list(p.rows) == ["a", "b", "mean"]
    for key in ("image_auroc", "pixel_auroc"):
        mean = (a["metrics"][key] + b["metrics"][key]) / 2
        assert float(p.rows["mean"][key][0]) == pytest.approx(mean, rel=1e-12)
    assert p.rows["mean"]["aupro"][0] == repr(a["metrics"]["aupro"])  # NaN-skipping mean, as results.json
    assert p.rows["b"]["aupro"][1] == "n/a"
    assert sorted((pl["data-category"], pl["data-kind"]) for pl in p.plots) == [
        ("a", "histogram"), ("a", "pro"), ("a", "roc"), ("b", "histogram"), ("b", "roc")]
    for cat, (n_good, n_bad) in {"a": (5, 4), "b": (2, 7)}.items():
        kinds = [e["data-kind"] for e in p.entries if e["data-category"] == cat]
        assert {k: kinds.count(k) for k in ("miss", "false_alarm", "detection")} == expected_gallery(n_good, n_bad, 3)
    assert all(set(e["panels"]) == {"image", "overlay", "mask"} for e in p.entries if e["data-category"] == "a")
    assert all(set(e["panels"]) == {"image", "overlay"} for e in p.entries if e["data-category"] == "b")
    text = "".join(p.text)
    flagged = int((a["scores"] > cal["image_threshold"])[:5].sum())
    assert f"{flagged} of 5 good" in text  # only "a" got the calibration (b was prepared without it)
    assert "no PRO curve" in text


# --------------------------------------------------------------------------- the PRO curve


def test_pro_curve_in_report_is_monotone_and_integrates_to_aupro() -> None:
    # Three 6 x 6 images: one defect-free, one with a 2 x 2 region and a 1-pixel region, one with a 3 x 3 region.
    masks = np.zeros((3, 6, 6), np.uint8)
    masks[1, 0:2, 0:2] = 1
    masks[1, 4, 4] = 1
    masks[2, 2:5, 1:4] = 1
    background = (np.arange(36).reshape(6, 6) * 7 % 11) / 11.0  # 11 distinct normal scores
    maps = np.stack([background, background[::-1], background.T]).astype(np.float64)
    maps[1, 0:2, 0:2] += [[0.9, 0.2], [0.5, 0.05]]
    maps[1, 4, 4] += 0.3
    maps[2, 2:5, 1:4] += 0.15
    prep = prepare_category({"metrics": {}, "scores": maps.reshape(3, -1).max(1), "labels": [0, 1, 1],
                             "paths": ["a.png", "b.png", "c.png"], "maps": maps, "masks": masks}, gallery_size=0)
    fpr, pro = prep["pro"]
    assert fpr[0] == 0.0 and pro[0] == 0.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert fpr[-2] <= 0.3 < fpr[-1]  # cut just past the AUPRO limit: the plotted range, nothing more
    # trapezoid to exactly fpr 0.3 (linear interpolation of the last segment)
    y_cut = pro[-2] + (pro[-1] - pro[-2]) * (0.3 - fpr[-2]) / (fpr[-1] - fpr[-2])
    area = np.trapezoid(np.r_[pro[:-1], y_cut], np.r_[fpr[:-1], 0.3])
    expected = metrics.aupro(maps, masks)
    assert 0.2 < expected < 0.95  # a case with partial overlap, not a trivial perfect / empty map
    assert area / 0.3 == pytest.approx(expected, abs=1e-3)
