"""One scoring path: evaluation, prediction and the service all score through
``engine.scoring.score_batch``, so a change there reaches every command."""

from __future__ import annotations

import io

import numpy as np
import pytest

from nferd.data.datasets import MVTecDataset
from nferd.deploy.predict import Predictor
from nferd.engine import scoring
from nferd.engine.checkpoint import load_checkpoint
from nferd.engine.evaluate import infer

CAT = "synthetic_tiles"


def test_evaluate_predict_and_serve_all_score_through_score_batch(tiny_checkpoint, synth_root, monkeypatch) -> None:
    calls: list[str] = []
    real = scoring.score_batch

    def counted(model, images, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(caller)
        maps, scores = real(model, images, *a, **k)
        return maps + 1.0, scores + 1.0  # visible downstream: the callers use what it returns

    monkeypatch.setattr(scoring, "score_batch", counted)
    model, meta = load_checkpoint(tiny_checkpoint)
    test = MVTecDataset(synth_root, CAT, "test", 64)
    caller = "evaluate"
    res = infer(model, test, device="cpu", precision="fp32")
    monkeypatch.setattr(scoring, "score_batch", real)
    plain = infer(model, test, device="cpu", precision="fp32")
    assert calls and np.allclose(res["scores"], plain["scores"] + 1.0)
    monkeypatch.setattr(scoring, "score_batch", counted)

    caller = "predict"
    pred = Predictor(model, meta["calibration"], device="cpu", precision="fp32")
    path = test.samples[0].path
    (row,) = pred.predict_paths([path])
    assert row["score"] == pytest.approx(float(plain["scores"][0]) + 1.0, rel=1e-5)

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from nferd.deploy.serve import create_app
    caller = "serve"
    with TestClient(create_app(pred, warmup=False)) as client, open(path, "rb") as f:
        answer = client.post("/predict", files={"file": ("x.png", io.BytesIO(f.read()), "image/png")}).json()
    assert answer["score"] == pytest.approx(float(plain["scores"][0]) + 1.0, rel=1e-5)
    assert {"evaluate", "predict", "serve"} <= set(calls)
