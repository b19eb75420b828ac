"""Experiment tracking in MLflow, beside the JSONL log every run writes.

Asked for with ``--mlflow`` (or ``mlflow: true`` in a ``--config`` file), a training or test
run becomes an MLflow run: its parameters (model, training, data), the loss of every epoch, the
test metrics and the checkpoint path. MLflow is optional (``pip install nferd[mlflow]``); nothing
imports it unless a run asks.

The default store is a local folder (``--mlflow-dir``, ``mlruns``), so it works offline; view it
with ``mlflow ui --backend-store-uri mlruns``. MLflow 3 keeps its file store in maintenance mode
behind ``MLFLOW_ALLOW_FILE_STORE``; nferd sets that for its own default store only. ``--mlflow-uri``
sends runs anywhere else MLflow can (a tracking server, a database), exactly as given.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import NferdError

DEFAULT_DIR = "mlruns"
DEFAULT_EXPERIMENT = "nferd"


class TrackingUnavailable(NferdError, RuntimeError):
    """MLflow was asked for and is not installed."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as MLflow's flat ``a.b`` keys (lists as text)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return out


class MLflowRun:
    """One MLflow run; a context manager that ends it (FAILED when the block raised).

    Only finite metrics are logged (MLflow would store NaN; an absent metric stays absent).
    """

    def __init__(self, run_name: str, uri: str | None = None, directory: str | Path = DEFAULT_DIR,
                 experiment: str = DEFAULT_EXPERIMENT) -> None:
        try:
            import mlflow
        except ImportError as e:
            raise TrackingUnavailable("MLflow tracking needs MLflow: pip install 'nferd[mlflow]' "
                                      "(or mlflow-skinny)") from e
        self.mlflow = mlflow
        if uri is None:
            path = Path(directory).resolve()
            path.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = path.as_uri()
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name)
        self.run_id = self.run.info.run_id

    def params(self, params: dict[str, Any]) -> None:
        flat = {k: v for k, v in _flat(params).items() if v is not None}
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 parameters per call
            self.mlflow.log_params(dict(list(flat.items())[i:i + 100]))

    def epoch(self, record: dict[str, Any]) -> None:
        """One line of the training log: loss and throughput at its epoch."""
        step = int(record["epoch"])
        self.metrics({k: record[k] for k in ("loss", "images_per_s", "seconds") if k in record}, step=step)

    def metrics(self, values: dict[str, Any], prefix: str = "", step: int | None = None) -> None:
        finite = {f"{prefix}{k}": float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if finite:
            self.mlflow.log_metrics(finite, step=step)

    def tag(self, key: str, value: Any) -> None:
        self.mlflow.set_tag(key, str(value))

    def __enter__(self) -> MLflowRun:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.mlflow.end_run(status="FAILED" if exc_type is not None else "FINISHED")
