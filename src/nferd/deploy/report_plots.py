"""The test report's plots (ROC, PRO curve, score histogram) as embedded PNGs, with matplotlib's
headless backend; matplotlib is optional (``nferd[report]``)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from ..errors import NferdError, option


class ReportError(NferdError, RuntimeError):
    """The report cannot be written (missing optional dependency, unusable input)."""


def require_matplotlib() -> None:
    """Fail early, before a long evaluation, when the optional plotting dependency is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ReportError("the HTML report needs matplotlib: pip install 'nferd[report]' "
                          f"(or test without {option('report')})") from e


def figure() -> Any:
    """A matplotlib Figure on its own Agg canvas (no pyplot: no global backend or state is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.4, 3.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_b64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def roc_plot(name: str, prep: dict[str, Any]) -> str:
    fpr, tpr = prep["roc"]
    fig = figure()
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {fmt(prep['metrics'].get('image_auroc', np.nan))}")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    cal = prep["calibration"]
    if cal is not None:
        ok = np.isfinite(prep["scores"])
        s, y = prep["scores"][ok], prep["labels"][ok]
        nok = s > cal.image_threshold
        ax.plot([nok[y == 0].mean()], [nok[y == 1].mean()], "o", c="tab:red", label="calibrated threshold")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate (good images)",
           ylabel="true positive rate (defective images)", title=f"{name}: image ROC")
    ax.legend(loc="lower right")
    return figure_b64(fig)


def pro_plot(name: str, prep: dict[str, Any]) -> str:
    fpr, pro = prep["pro"]
    limit = prep["fpr_limit"]
    fig = figure()
    ax = fig.add_subplot()
    ax.plot(fpr, pro, lw=2, label=f"AUPRO@{limit:g} {fmt(prep['metrics'].get('aupro', np.nan))}")
    ax.fill_between(fpr, pro, alpha=0.15)
    ax.set(xlim=(0, limit), ylim=(0, 1.01), xlabel="false positive rate (normal pixels)",
           ylabel="per-region overlap", title=f"{name}: PRO curve")
    ax.legend(loc="lower right")
    return figure_b64(fig)


def histogram_plot(name: str, prep: dict[str, Any]) -> str:
    ok = np.isfinite(prep["scores"])
    s, y = prep["scores"][ok], prep["labels"][ok]
    cal = prep["calibration"]
    lo, hi = (float(s.min()), float(s.max())) if s.size else (0.0, 1.0)
    if cal is not None:
        lo, hi = min(lo, cal.image_threshold), max(hi, cal.image_threshold)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, int(np.clip(2 * np.sqrt(s.size), 10, 50)) + 1)
    fig = figure()
    ax = fig.add_subplot()
    ax.hist(s[y == 0], bins=edges, alpha=0.6, color="tab:green", label=f"good ({int((y == 0).sum())})")
    ax.hist(s[y == 1], bins=edges, alpha=0.6, color="tab:red", label=f"defective ({int((y == 1).sum())})")
    if cal is not None:
        ax.axvline(cal.image_threshold, c="black", ls="--", label=f"threshold {cal.image_threshold:.4g}")
    ax.set(xlabel="image score", ylabel="images", title=f"{name}: score histogram")
    ax.legend(loc="upper right")
    return figure_b64(fig)


def fmt(v: Any) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "n/a" if not np.isfinite(v) else f"{float(v):.4f}"
    return html.escape(str(v))
