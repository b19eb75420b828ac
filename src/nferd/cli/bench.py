"""``nferd speed``: training and inference speed on synthetic input with random weights.

The fast path is what ``nferd train`` / ``predict`` run: cached fp16 teacher features during
training, bf16 autocast where the hardware has it, the map, blur and score on the model's
device, batched inference. ``--reference`` times the same model the way RD4AD's code runs it:
fp32, eager, the teacher recomputed every step through layer4 (which RD4AD computes and throws
away), its loss code (``F.cosine_similarity`` of the flattened maps), torch's default Adam,
batch 1 at test with the map blurred by SciPy on the CPU. It runs in the same process, its steps
interleaved with the fast path's, so the ratio is honest on a noisy machine.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..deploy.predict import Predictor
from ..engine.device import (
    autocast,
    autocast_dtype,
    channels_last,
    compile_dense,
    default_threads,
    inference_copy,
    place,
    resolve_device,
)
from ..engine.provenance import cpu_flags, cpu_model
from ..engine.train import make_adam
from ..errors import MissingDependency
from ..models.loss import distillation_loss
from ..models.nferd import NFERD, ModelConfig
from ..models.resnet import RESNET_SPECS, make_layer
from .info import forward_gflops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, iters: int, warmup: int = 1) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


@torch.no_grad()
def stage_times(model: NFERD, device: torch.device, size: int, precision: str = "auto",
                iters: int = 5) -> dict[str, float]:
    """Where a batch-1 PyTorch forward spends its time: median milliseconds of the teacher, the
    student (OCBE and decoder), and the map (cosines, memory or bank search, blur, score), each
    run alone on the previous part's output, at the precision the fast path runs."""
    amp = autocast_dtype(device, precision)
    runner = inference_copy(place(model.eval(), device), amp)
    x = channels_last(torch.rand(1, 3, size, size, device=device))
    with autocast(device, amp):
        t = runner.teacher(x)
        s = runner.student_features(t)

    def teacher() -> None:
        with autocast(device, amp):
            runner.teacher(x)

    def student() -> None:
        with autocast(device, amp):
            runner.student_features(t)

    parts = {"teacher": teacher, "student": student, "map": lambda: runner.anomaly_maps(t, s, (size, size))}
    return {k: 1000 * statistics.median(_timed(fn, device, iters, warmup=2)) for k, fn in parts.items()}


def peak_matmul_gflops(device: torch.device, dtype: torch.dtype | None, n: int = 2048) -> float:
    """Measured peak of a square matmul: the yardstick for achieved GFLOP/s."""
    dt = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    times = _timed(lambda: a @ b, device, 5, warmup=2)
    return 2 * n**3 / min(times) / 1e9


def _layer4(teacher_name: str) -> torch.nn.Module | None:
    """RD4AD's encoder also runs layer4 and discards it; rebuild it for the reference timing."""
    spec = RESNET_SPECS.get(teacher_name)
    if spec is None:
        return None
    return make_layer(spec.block, 256 * spec.block.expansion, 512, spec.layers[3], 2, spec.width_per_group).eval()


def rd4ad_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """RD4AD's ``loss_fucntion``: per stage 1 - cosine of the flattened maps, batch mean, summed."""
    return sum((1 - F.cosine_similarity(t.view(t.shape[0], -1), s.view(s.shape[0], -1))).mean()
               for t, s in zip(teacher, student))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss`` (every timed training path ends with it)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@dataclass
class BenchPath:
    """One way of running the model: a training step and inference calls, ready to time."""

    train_step: Callable[[], None] | None  # None: an exported graph, inference only
    infer_b1: Callable[[], None]
    infer_batch: Callable[[], None] | None
    precision: str


def fast_path(model: NFERD, device: torch.device, size: int, batch: int, compile: bool = False,
              precision: str = "auto") -> BenchPath:
    """What ``nferd train`` / ``predict`` run: cached fp16 teacher maps, bf16 autocast where the
    hardware has it (``precision``), channels_last, fused Adam, weights pre-cast for inference, map,
    blur and score on the device, one image per network call on a CPU."""
    amp = autocast_dtype(device, precision)
    place(model, device)
    if compile:
        compile_dense(model)
    x = channels_last(torch.rand(batch, 3, size, size, device=device))
    with torch.no_grad():  # the "cache": fp16 teacher maps, as FeatureCache stores them
        cache = [channels_last(f.to(torch.float16)) for f in model.teacher(x)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adam(params, 1e-4, (0.5, 0.999)) if params else None  # as nferd train (nothing to train: no student)
    ids = torch.arange(batch, device=device) + 10_000  # never in the bank: no masking cost difference
    runner: list[Predictor] = []

    def step() -> None:
        model.train()
        feats = [f.float() for f in cache]
        with autocast(device, amp):
            t, s = model(None, exclude_ids=ids, teacher_feats=feats)
        loss = distillation_loss(t, s, model.config.loss)
        _update(opt, loss)
        runner.clear()  # the weights changed: the next inference takes a fresh pre-cast copy

    def infer(inp: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            if not runner:  # what predict runs: weights pre-cast, map, blur and score, micro-batches
                runner.append(Predictor(model.eval(), None, str(device), precision))
            runner[0].maps(inp)
        return run

    return BenchPath(step if opt is not None else None, infer(x[:1]), infer(x), str(amp or torch.float32))


def file_path(model: NFERD, backend: str, size: int, batch: int, folder: str, int8: bool = False,
              precision: str = "fp32") -> BenchPath:
    """The same model exported to ``folder`` and run by ONNX Runtime or OpenVINO on the CPU (fp32;
    OpenVINO also bf16 with ``precision``, or with ``int8`` the IR quantised as ``nferd export
    --int8`` does, with statistics of random images: a speed figure only); inference only (an
    exported graph does not train)."""
    if int8:
        from ..deploy.openvino_runtime import export_openvino
        from ..deploy.quantize import quantised_predictor
        g = torch.Generator().manual_seed(0)
        pred: Any = quantised_predictor(export_openvino(model, f"{folder}/bench.xml"),
                                        [torch.rand(1, 3, size, size, generator=g).numpy() for _ in range(8)],
                                        default_threads())[0]
    elif backend == "onnx":
        from ..deploy.export import export_onnx
        from ..deploy.onnx_runtime import OnnxPredictor
        pred = OnnxPredictor.from_file(export_onnx(model, f"{folder}/bench.onnx"), threads=default_threads())
    else:
        import openvino as ov

        from ..deploy.openvino_runtime import (
            OpenVinoPredictor,
            compile_cpu,
            cpu_has_bf16,
            export_openvino,
            read_metadata,
        )
        xml = export_openvino(model, f"{folder}/bench.xml")
        core = ov.Core()
        ir = core.read_model(str(xml))
        # auto: bf16 where the CPU runs it natively, as `nferd export --precision auto`
        precision = "bf16" if precision == "bf16" or (precision == "auto" and cpu_has_bf16(core)) else "fp32"
        pred = OpenVinoPredictor(compile_cpu(core, ir, default_threads(), "bf16" if precision == "bf16" else "f32"),
                                 read_metadata(ir, xml))
    x = torch.rand(batch, 3, size, size)

    def infer(inp: torch.Tensor) -> Callable[[], None]:
        return lambda: pred.maps(inp)

    return BenchPath(None, infer(x[:1]), infer(x), "int8" if int8 else "bfloat16" if precision == "bf16" else "float32")


def reference_path(model: NFERD, device: torch.device, size: int, batch: int) -> BenchPath:
    """The same model the way RD4AD's code runs it: fp32, eager, the teacher recomputed every step
    through layer4, RD4AD's loss, torch's default Adam, batch 1 at test, SciPy's blur on the CPU."""
    from scipy.ndimage import gaussian_filter

    from ..models.anomaly_map import anomaly_map
    model.to(device)
    layer4 = _layer4(model.config.teacher)
    if layer4 is not None:
        layer4.to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.5, 0.999))

    def teacher(inp: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            feats = model.teacher(inp)
            if layer4 is not None:
                layer4(feats[-1])
        return feats

    def step() -> None:
        model.train()
        t = teacher(x)
        s = model.student_features(t)
        loss = rd4ad_loss(t, s) if model.config.loss == "flat" else distillation_loss(t, s, model.config.loss)
        _update(opt, loss)

    def infer_one() -> None:
        model.eval()
        with torch.no_grad():
            t = teacher(x[:1])
            s = model.student_features(t)
            amap = anomaly_map(t, s, (size, size))[0, 0].cpu().numpy()
        gaussian_filter(amap, sigma=4).max()

    return BenchPath(step, infer_one, None, "torch.float32")


def peer_path(teacher: str, size: int, batch: int) -> tuple[BenchPath, str]:
    """anomalib's ReverseDistillationModel with the same backbone (random weights), timed the way
    its Lightning module runs it: fp32, eager, its loss, Adam on bottleneck and decoder, batch 1 at
    test with its own map. Needs anomalib importable (a separate environment with PyPI's torch and
    torchvision); returns the path and anomalib's version."""
    try:
        import anomalib
        from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
        from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel
    except ImportError as e:
        raise MissingDependency(f"--peer anomalib needs anomalib, which is not importable here ({e}); run nferd "
                                "speed in an environment with PyPI's torch, torchvision and anomalib "
                                "(pip install anomalib)") from e
    try:
        model = ReverseDistillationModel(backbone=teacher, input_size=(size, size),
                                         layers=["layer1", "layer2", "layer3"], anomaly_map_mode="add",
                                         pre_trained=False)
    except Exception as e:  # anomalib raises its own errors for backbones it has no decoder for
        raise ValueError(f"anomalib's reverse distillation has no model for the teacher '{teacher}' ({e}); "
                         "use --teacher wide_resnet50_2 with --peer anomalib") from e
    x = torch.rand(batch, 3, size, size)
    loss_fn = ReverseDistillationLoss()
    opt = torch.optim.Adam(list(model.decoder.parameters()) + list(model.bottleneck.parameters()),
                           lr=0.005, betas=(0.5, 0.99))

    def step() -> None:
        model.train()
        loss = loss_fn(*model(x))
        _update(opt, loss)

    def infer_one() -> None:
        model.eval()
        with torch.no_grad():
            model(x[:1]).pred_score.cpu()

    return BenchPath(step, infer_one, None, "torch.float32"), str(anomalib.__version__)


def peer_openvino_path(teacher: str, size: int, folder: str) -> BenchPath:
    """anomalib's reverse distillation (random weights) exported the way its users deploy it
    (``AnomalibModule.to_openvino``: its ONNX export converted by OpenVINO) and compiled with
    OpenVINO's CPU defaults (which run bf16 on CPUs that have it), timed at batch 1."""
    import openvino as ov
    from anomalib.models import ReverseDistillation
    module = ReverseDistillation(backbone=teacher, layers=["layer1", "layer2", "layer3"], pre_trained=False)
    xml = module.to_openvino(folder, input_size=(size, size))
    core = ov.Core()
    compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": int(default_threads())})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return BenchPath(None, lambda: request.infer({0: x}), None, f"openvino {precision}")


def _paired(a: Callable[[], None], b: Callable[[], None], device: torch.device, iters: int,
            warmup: int = 1) -> tuple[list[float], list[float]]:
    """Times of ``a`` and ``b`` run alternately, so both see the same machine: this CPU's speed
    drifts by up to 1.5x within minutes, and timing one path after the other put ratios of one
    code state anywhere between 3.3x and 4.6x."""
    for _ in range(warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(iters):
        ta += _timed(a, device, 1, warmup=0)
        tb += _timed(b, device, 1, warmup=0)
    return ta, tb


def _bench_model(cfg: ModelConfig) -> NFERD:
    from .info import full_memory
    torch.manual_seed(0)
    model = NFERD(cfg, teacher_weights="random")
    if len(model.banks):
        with torch.no_grad():
            feats = model.teacher(torch.rand(cfg.n_bank, 3, cfg.image_size, cfg.image_size))
        model.fill_banks(feats, torch.arange(cfg.n_bank), memory=False)
    full_memory(model)  # as many rows as a 200-image training set leaves: the search's full cost
    return model


def run_bench(teacher: str, image_size: int, batch_size: int, device: str = "auto", reference: bool = False,
              train_steps: int = 6, infer_iters: int = 10, bank: bool = True, compile: bool = False,
              recall: str = "patch", fusion: str | None = None, backend: str = "torch", int8: bool = False,
              precision: str = "auto", peer: str | None = None, preset: str | None = None,
              stages: bool = False) -> dict[str, Any]:
    """Training and inference speed of one configuration on random input. ``backend`` "onnx" or
    "openvino" times the same model exported and run by that runtime (CPU, fp32, inference only);
    ``int8`` the OpenVINO IR quantised. ``precision`` is the torch path's (auto: bf16 where the
    CPU has it). ``peer`` "anomalib" also times anomalib's RD model, interleaved with this one.
    ``preset``: a design of ``PRESETS`` to time instead of ``bank`` / ``recall`` / ``fusion``."""
    dev = resolve_device(device)
    if backend != "torch" and (dev.type != "cpu" or reference or compile):
        raise ValueError("--backend onnx or openvino runs on the CPU, without --reference or --compile")
    if int8 and backend != "openvino":
        raise ValueError("--int8 times the quantised OpenVINO IR: add --backend openvino")
    torch.set_num_threads(default_threads())
    torch.manual_seed(0)
    cfg = (ModelConfig.preset(preset, teacher=teacher, image_size=image_size) if preset else
           ModelConfig(teacher=teacher, image_size=image_size, bank=bank, recall=recall, fusion=fusion))
    bank = cfg.bank
    model = _bench_model(cfg)
    gflops = forward_gflops(model, image_size)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        if backend == "torch":
            fast = fast_path(model, dev, image_size, batch_size, compile=compile, precision=precision)
        else:
            fast = file_path(model.eval(), backend, image_size, batch_size, tmp, int8=int8,
                             precision=precision if backend == "openvino" else "fp32")
        train_t = (_timed(fast.train_step, dev, train_steps, warmup=2)  # the first steps fill the memo, the heap
                   if fast.train_step is not None else None)
        b1 = _timed(fast.infer_b1, dev, infer_iters, warmup=2)
        bb = _timed(fast.infer_batch, dev, max(2, infer_iters // 4), warmup=1)
    infer_ips = batch_size / statistics.median(bb)
    res: dict[str, Any] = {"backend": backend, "teacher": teacher, "image_size": image_size, "batch_size": batch_size,
                           "device": str(dev), "threads": torch.get_num_threads(), "bank": bank,
                           "recall": cfg.recall if bank else None, "fusion": cfg.fusion,
                           "design": cfg.describe(), "compile": compile, **({"preset": preset} if preset else {}),
                           "train_images_per_s": batch_size / statistics.median(train_t) if train_t else None,
                           **_latency(b1), "infer_images_per_s": infer_ips, "precision": fast.precision,
                           "gflops_per_image": gflops, "gflops_achieved": gflops * infer_ips,
                           "peak_gflops_matmul": peak_matmul_gflops(  # at the precision the path runs (fp32 for int8)
                               dev, autocast_dtype(dev, precision) if backend == "torch" else
                               torch.bfloat16 if fast.precision == "bfloat16" else None),
                           "peak_rss_mib": _rss_mib(),  # before the reference model exists
                           "cpu_model": cpu_model(), "cpu_flags": cpu_flags()}
    if dev.type == "cuda":
        res["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if stages:  # the PyTorch forward's parts, timed alone (whatever --backend timed above)
        res["stages_ms_b1"] = stage_times(model, dev, image_size, precision, max(3, infer_iters // 2))
    if peer == "anomalib":
        other, version = peer_path(teacher, image_size, batch_size)
        fl, pl = _paired(fast.infer_b1, other.infer_b1, dev, max(3, infer_iters // 2))
        res["peer"] = {"name": "anomalib", "version": version, **_latency(pl), "precision": other.precision,
                       "paired_latency_ms_b1": 1000 * statistics.median(fl),
                       "latency_ratio_b1": statistics.median(f / q for f, q in zip(fl, pl))}
        if fast.train_step is not None:
            ft, pt = _paired(fast.train_step, other.train_step, dev, train_steps)
            res["peer"]["train_images_per_s"] = batch_size / statistics.median(pt)
        with tempfile.TemporaryDirectory() as tmp:  # anomalib's own deployment path: its OpenVINO export
            ov_peer = peer_openvino_path(teacher, image_size, tmp)
            fl, ol = _paired(fast.infer_b1, ov_peer.infer_b1, dev, max(3, infer_iters // 2))
        res["peer"]["openvino"] = {**_latency(ol), "precision": ov_peer.precision,
                                   "paired_latency_ms_b1": 1000 * statistics.median(fl),
                                   "latency_ratio_b1": statistics.median(f / q for f, q in zip(fl, ol))}
        best = min((res["peer"], res["peer"]["openvino"]), key=lambda p: p["infer_latency_ms_b1"])
        res["peer"]["best_path"] = "openvino" if best is not res["peer"] else "torch"
        res["peer"]["latency_ratio_b1_best"] = best["latency_ratio_b1"]
    if reference:
        ref = reference_path(_bench_model(cfg), dev, image_size, batch_size)  # the same model, run RD4AD's way
        ft, rt = _paired(fast.train_step, ref.train_step, dev, train_steps)
        fl, rl = _paired(fast.infer_b1, ref.infer_b1, dev, max(3, infer_iters // 2))
        res["reference"] = {"train_images_per_s": batch_size / statistics.median(rt), **_latency(rl),
                            "infer_images_per_s": 1 / statistics.median(rl), "precision": ref.precision}
        # ratios of neighbouring (interleaved) runs, then their median: robust on a noisy machine
        res["speedup_train"] = statistics.median(r / f for f, r in zip(ft, rt))
        res["speedup_latency_b1"] = statistics.median(r / f for f, r in zip(fl, rl))
        res["paired_fast"] = {"train_images_per_s": batch_size / statistics.median(ft), **_latency(fl)}
    return res


def _latency(times: list[float]) -> dict[str, float]:
    return {"infer_latency_ms_b1": 1000 * statistics.median(times),
            "infer_latency_ms_b1_p95": 1000 * float(np.percentile(times, 95))}
