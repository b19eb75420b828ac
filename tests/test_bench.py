"""``nferd speed`` end to end on a tiny configuration (random weights, synthetic input): every
figure is reported, and each is computed from the measured times and the model's FLOP count as
documented. No assertions on the speed itself: that is what the command measures."""

from __future__ import annotations

import json
import math

import pytest

from nferd.cli import bench, main
from nferd.cli.bench import run_bench
from nferd.cli.info import model_info
from nferd.models.nferd import ModelConfig


def test_bench_reports_every_figure_with_a_paired_reference() -> None:
    """Every figure is there and finite; the GFLOPs are the count ``nferd info`` gives for the same
    configuration, and achieved GFLOP/s are that count times the measured throughput."""
    res = run_bench("efficientnet_lite0", 64, 2, device="cpu", reference=True, train_steps=1, infer_iters=2)
    for key in ("train_images_per_s", "infer_latency_ms_b1", "infer_latency_ms_b1_p95", "infer_images_per_s",
                "peak_rss_mib", "gflops_achieved", "peak_gflops_matmul", "speedup_train", "speedup_latency_b1"):
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    cfg = ModelConfig(teacher="efficientnet_lite0", image_size=64)  # the default design
    assert res["gflops_per_image"] == pytest.approx(model_info(cfg)["gflops"], rel=1e-9)
    assert res["gflops_achieved"] == pytest.approx(res["gflops_per_image"] * res["infer_images_per_s"])
    assert res["recall"] == "patch" and res["bank"] is True and res["fusion"] == "none"
    assert res["design"] == cfg.describe()
    from nferd.engine.provenance import cpu_flags
    assert res["cpu_model"] and res["cpu_flags"] == cpu_flags()  # which ISA the figures were measured on
    ref = res["reference"]
    assert ref["precision"] == "torch.float32" and ref["infer_images_per_s"] == pytest.approx(
        1000 / ref["infer_latency_ms_b1"])  # the reference infers one image at a time
    # the ratios come from interleaved pairs; the fast side of those pairs is reported too
    paired = res["paired_fast"]
    assert paired["train_images_per_s"] > 0 and paired["infer_latency_ms_b1"] > 0


def test_bench_figures_follow_from_the_measured_times(monkeypatch) -> None:
    """With a scripted clock (the k-th timed run of a call takes k ms, a reference run three times
    as long), every rate, latency, percentile and ratio is its formula applied to those times."""
    def scripted(fn, device, iters, warmup=1):  # type: ignore[no-untyped-def]
        fn()  # the timed code still runs once
        slower = 3 if "reference_path" in fn.__qualname__ else 1
        return [slower * 0.001 * (i + 1) for i in range(iters)]

    monkeypatch.setattr(bench, "_timed", scripted)
    res = run_bench("efficientnet_lite0", 64, 2, device="cpu", reference=True, bank=False, train_steps=3,
                    infer_iters=4)
    assert res["train_images_per_s"] == pytest.approx(2 / 0.002)  # batch 2 over the median of 1, 2, 3 ms
    assert res["infer_latency_ms_b1"] == pytest.approx(2.5)  # median of 1, 2, 3, 4 ms
    assert res["infer_latency_ms_b1_p95"] == pytest.approx(3.85)  # 95th percentile, linear interpolation
    assert res["infer_images_per_s"] == pytest.approx(2 / 0.0015)  # batched: max(2, 4 // 4) runs of 1, 2 ms
    assert res["gflops_achieved"] == pytest.approx(res["gflops_per_image"] * 2 / 0.0015)
    assert res["peak_gflops_matmul"] == pytest.approx(2 * 2048**3 / 0.001 / 1e9)  # best of its runs: 1 ms
    # interleaved pairs: every run is a first run (1 ms fast, 3 ms reference), so the reference is 3x slower
    assert res["speedup_train"] == pytest.approx(3.0) and res["speedup_latency_b1"] == pytest.approx(3.0)
    assert res["reference"]["train_images_per_s"] == pytest.approx(2 / 0.003)
    assert res["reference"]["infer_latency_ms_b1"] == pytest.approx(3.0)
    assert res["paired_fast"]["train_images_per_s"] == pytest.approx(2 / 0.001)


def test_bench_cli_prints_one_json_object(capsys) -> None:
    assert main(["speed", "--teacher", "efficientnet_lite0", "--image-size", "64", "--batch-size", "2",
                 "--train-steps", "1", "--infer-iters", "2", "--bank", "off", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bank"] is False and res["recall"] is None and "reference" not in res
    assert res["train_images_per_s"] > 0 and res["infer_images_per_s"] > 0
    cfg = ModelConfig(teacher="efficientnet_lite0", image_size=64, bank=False, fusion="none")
    assert res["gflops_per_image"] == pytest.approx(model_info(cfg)["gflops"], rel=1e-9)


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_bench_times_an_exported_model_with_the_same_keys(backend: str) -> None:
    pytest.importorskip("onnxruntime")
    if backend == "openvino":
        pytest.importorskip("openvino")
    torch_res = run_bench("efficientnet_lite0", 64, 2, device="cpu", train_steps=1, infer_iters=2)
    res = run_bench("efficientnet_lite0", 64, 2, device="cpu", infer_iters=2, backend=backend, precision="fp32")
    assert set(res) == set(torch_res)  # one JSON shape for every backend
    assert res["backend"] == backend and res["train_images_per_s"] is None and res["precision"] == "float32"
    if backend == "openvino":  # auto: bf16 exactly where the CPU runs it natively, as `nferd export --precision auto`
        from nferd.deploy.openvino_runtime import cpu_has_bf16
        auto = run_bench("efficientnet_lite0", 64, 2, device="cpu", infer_iters=2, backend=backend)
        assert auto["precision"] == ("bfloat16" if cpu_has_bf16() else "float32")
        assert auto["peak_gflops_matmul"] > 0
    assert res["gflops_per_image"] == torch_res["gflops_per_image"]  # the same model, counted once
    assert res["infer_latency_ms_b1"] > 0 and res["infer_images_per_s"] > 0
    with pytest.raises(ValueError, match="CPU"):
        run_bench("efficientnet_lite0", 64, 2, device="cpu", reference=True, backend=backend)


def test_the_anomalib_peer_is_timed_in_the_same_run_or_refused_with_the_way_to_get_it(monkeypatch, capsys) -> None:
    """Where anomalib is importable, its RD model is timed interleaved with nferd's; elsewhere (this
    project's own environment) --peer anomalib is a one-line error that says what to install."""
    try:
        import anomalib  # noqa: F401
    except ImportError:
        assert main(["speed", "--teacher", "wide_resnet50_2", "--image-size", "64", "--batch-size", "1",
                     "--peer", "anomalib", "--json"]) != 0
        assert "pip install anomalib" in capsys.readouterr().err
        return
    res = run_bench("wide_resnet50_2", 64, 1, device="cpu", train_steps=1, infer_iters=2, bank=False,
                    precision="fp32", peer="anomalib")
    assert res["peer"]["name"] == "anomalib" and res["peer"]["infer_latency_ms_b1"] > 0
    assert res["peer"]["latency_ratio_b1"] > 0 and res["peer"]["train_images_per_s"] > 0
    ov = res["peer"]["openvino"]  # anomalib's own OpenVINO export, timed in the same run
    assert ov["infer_latency_ms_b1"] > 0 and ov["latency_ratio_b1"] > 0
    best = min(res["peer"]["infer_latency_ms_b1"], ov["infer_latency_ms_b1"])
    assert res["peer"]["latency_ratio_b1_best"] == (ov if best == ov["infer_latency_ms_b1"] else res["peer"])[
        "latency_ratio_b1"]


def test_speed_files_with_a_peer_are_named_and_shown_apart(tmp_path) -> None:
    from nferd.engine.benchmark import save_speed_result
    from nferd.engine.tables import speed_table
    res = run_bench("efficientnet_lite0", 64, 2, device="cpu", train_steps=1, infer_iters=2, bank=False)
    plain = save_speed_result(res, tmp_path)
    peer = {"name": "anomalib", "version": "2.7.0", "infer_latency_ms_b1": 12.5, "infer_latency_ms_b1_p95": 13.0,
            "latency_ratio_b1": 0.5}
    with_peer = save_speed_result({**res, "peer": peer}, tmp_path)
    assert plain != with_peer and with_peer.name.endswith("-vs-anomalib.json")
    table = speed_table([json.loads(p.read_text()) for p in (plain, with_peer)])
    assert "torch 12.5 (ratio 0.50); anomalib 2.7.0" in table and table.count("| – |") >= 1
    ov = {"infer_latency_ms_b1": 6.25, "latency_ratio_b1": 1.0, "precision": "openvino <Type: 'bfloat16'>"}
    table = speed_table([{**json.loads(with_peer.read_text()), "peer": {**peer, "openvino": ov}}])
    assert "torch 12.5 (ratio 0.50); OpenVINO bf16 6.2 (ratio 1.00); anomalib 2.7.0" in table


def test_bench_int8_json_is_the_only_output_on_stdout(capsys) -> None:
    """NNCF draws progress bars while it quantises; they go to stderr, so `--json` stays parseable."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    assert main(["speed", "--teacher", "efficientnet_lite0", "--image-size", "64", "--batch-size", "2",
                 "--infer-iters", "2", "--backend", "openvino", "--int8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["precision"] == "int8" and res["backend"] == "openvino"


def test_bench_is_the_old_name_of_speed(capsys) -> None:
    from nferd.cli.parser import parse_args
    assert parse_args(["bench", "--image-size", "64"]).image_size == 64
    assert main(["bench", "--image-size", "63"]) == 2  # the same options and checks under either name
    assert "multiple of 32" in capsys.readouterr().err


def test_stage_times_split_the_forward_into_its_parts() -> None:
    res = run_bench("efficientnet_lite0", 64, 1, device="cpu", train_steps=1, infer_iters=4, stages=True,
                    precision="fp32")
    parts = res["stages_ms_b1"]
    assert set(parts) == {"teacher", "student", "map"} and all(v > 0 for v in parts.values())
    # the parts of one forward, timed alone, add up to about the whole forward (timing noise aside)
    assert 0.3 < sum(parts.values()) / res["infer_latency_ms_b1"] < 3
