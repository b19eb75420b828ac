"""``nferd bench`` end to end on a tiny configuration (random weights, synthetic input): every
figure issue 4 names is there and sane. No timing assertions: speed is measured by the command."""

from __future__ import annotations

import json
import math

from nferd.cli.bench import run_bench
from nferd.cli import main


def test_bench_reports_every_figure_with_a_paired_reference() -> None:
    res = run_bench("efficientnet_lite0", 64, 2, device="cpu", reference=True, train_steps=1, infer_iters=2)
    for key in ("train_images_per_s", "infer_latency_ms_b1", "infer_latency_ms_b1_p95", "infer_images_per_s",
                "peak_rss_mib", "gflops_achieved", "peak_gflops_matmul", "speedup_train", "speedup_latency_b1"):
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    assert res["infer_latency_ms_b1_p95"] >= res["infer_latency_ms_b1"]
    assert res["gflops_per_image"] > 0 and res["reading"] == "E"
    ref = res["reference"]
    assert ref["precision"] == "torch.float32" and ref["train_images_per_s"] > 0
    # the ratios come from interleaved pairs; the fast side of those pairs is reported too
    paired = res["paired_fast"]
    assert paired["train_images_per_s"] > 0 and paired["infer_latency_ms_b1"] > 0


def test_bench_cli_prints_one_json_object(capsys) -> None:
    assert main(["bench", "--teacher", "efficientnet_lite0", "--image-size", "64", "--batch-size", "2",
                 "--train-steps", "1", "--infer-iters", "2", "--bank", "off", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bank"] is False and res["reading"] is None and "reference" not in res
    assert res["train_images_per_s"] > 0 and res["infer_images_per_s"] > 0
