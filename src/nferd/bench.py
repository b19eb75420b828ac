"""``nferd bench``: training and inference speed on synthetic input with random weights.

The fast path is what ``nferd train`` / ``predict`` run: cached fp16 teacher features during
training, bf16 autocast where the hardware has it, the map, blur and score on the model's
device, batched inference. ``--reference`` times the same model the way RD4AD's code runs it,
in the same process so the ratio is honest on a noisy machine: fp32, eager, the teacher
recomputed every step through layer4 (which RD4AD computes and throws away), its loss code
(``F.cosine_similarity`` of the flattened maps), torch's default Adam, batch 1 at test with the
map blurred by SciPy on the CPU.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import numpy as np
import torch

from .device import (autocast, autocast_dtype, channels_last, compile_dense, default_threads, inference_copy, place,
                     resolve_device)
from .info import forward_gflops
from .loss import distillation_loss
from .train import make_adam
from .model import NFERD, ModelConfig
from .resnet import RESNET_SPECS, make_layer


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
    import torch.nn.functional as F
    return sum((1 - F.cosine_similarity(t.view(t.shape[0], -1), s.view(s.shape[0], -1))).mean()
               for t, s in zip(teacher, student))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_fast(model: NFERD, device: torch.device, size: int, batch: int, steps: int, iters: int,
               compile: bool = False) -> dict[str, Any]:
    amp = autocast_dtype(device, "auto")
    place(model, device)
    if compile:
        compile_dense(model)
    x = channels_last(torch.rand(batch, 3, size, size, device=device))
    with torch.no_grad():  # the "cache": fp16 teacher maps, as FeatureCache stores them
        cache = [channels_last(f.to(torch.float16)) for f in model.teacher(x)]
    opt = make_adam([p for p in model.parameters() if p.requires_grad], 1e-4, (0.5, 0.999))  # as nferd train
    ids = torch.arange(batch, device=device) + 10_000  # never in the bank: no masking cost difference

    def step() -> None:
        model.train()
        feats = [f.float() for f in cache]
        with autocast(device, amp):
            t, s = model(None, exclude_ids=ids, teacher_feats=feats)
        loss = distillation_loss(t, s, model.config.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_t = _timed(step, device, steps, warmup=2)  # the first steps fill the recall memo and the heap
    runner = inference_copy(model.eval(), amp)  # what Predictor runs: weights pre-cast to bf16

    def infer(inp: torch.Tensor):  # type: ignore[no-untyped-def]
        def run() -> None:
            with torch.no_grad(), autocast(device, amp):
                t, s = runner(inp)
                maps, scores = runner.anomaly_maps(t, s)
            scores.float().cpu()
        return run

    b1 = _timed(infer(x[:1]), device, iters, warmup=2)
    bb = _timed(infer(x), device, max(2, iters // 4), warmup=1)
    return {"train_images_per_s": batch / statistics.median(train_t),
            "infer_latency_ms_b1": 1000 * statistics.median(b1),
            "infer_latency_ms_b1_p95": 1000 * float(np.percentile(b1, 95)),
            "infer_images_per_s": batch / statistics.median(bb), "precision": str(amp or torch.float32)}


def bench_reference(model: NFERD, device: torch.device, size: int, batch: int, steps: int,
                    iters: int) -> dict[str, Any]:
    from scipy.ndimage import gaussian_filter
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_t = _timed(step, device, steps, warmup=2)
    model.eval()

    def infer_one() -> None:
        with torch.no_grad():
            t = teacher(x[:1])
            s = model.student_features(t)
            from .anomaly_map import anomaly_map
            amap = anomaly_map(t, s, (size, size))[0, 0].cpu().numpy()
        gaussian_filter(amap, sigma=4).max()

    b1 = _timed(infer_one, device, max(3, iters // 2), warmup=1)
    return {"train_images_per_s": batch / statistics.median(train_t),
            "infer_latency_ms_b1": 1000 * statistics.median(b1),
            "infer_latency_ms_b1_p95": 1000 * float(np.percentile(b1, 95)),
            "infer_images_per_s": 1 / statistics.median(b1),
            "precision": "torch.float32"}


def _bench_model(cfg: ModelConfig) -> NFERD:
    torch.manual_seed(0)
    model = NFERD(cfg, teacher_weights="random")
    if cfg.bank:
        with torch.no_grad():
            feats = model.teacher(torch.rand(cfg.n_bank, 3, cfg.image_size, cfg.image_size))
        model.fill_banks(feats, torch.arange(cfg.n_bank))
    return model


def run_bench(teacher: str, image_size: int, batch_size: int, device: str = "auto", reference: bool = False,
              train_steps: int = 6, infer_iters: int = 10, bank: bool = True, compile: bool = False,
              reading: str | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    torch.set_num_threads(default_threads())
    torch.manual_seed(0)
    extra = {"reading": reading} if reading else {}
    cfg = ModelConfig(teacher=teacher, image_size=image_size, bank=bank, fusion="hafm" if bank else "none", **extra)
    model = _bench_model(cfg)
    gflops = forward_gflops(model, image_size)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fast = bench_fast(model, dev, image_size, batch_size, train_steps, infer_iters, compile=compile)
    res: dict[str, Any] = {"teacher": teacher, "image_size": image_size, "batch_size": batch_size,
                           "device": str(dev), "threads": torch.get_num_threads(), "bank": bank,
                           "reading": cfg.reading if bank else None, "compile": compile,
                           **fast, "gflops_per_image": gflops,
                           "gflops_achieved": gflops * fast["infer_images_per_s"],
                           "peak_gflops_matmul": peak_matmul_gflops(dev, autocast_dtype(dev, "auto")),
                           "peak_rss_mib": _rss_mib()}
    if dev.type == "cuda":
        res["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if reference:
        ref_model = _bench_model(cfg)  # the same model: only the way it is run differs
        ref = bench_reference(ref_model, dev, image_size, batch_size, train_steps, infer_iters)
        res["reference"] = ref
        res["speedup_train"] = fast["train_images_per_s"] / ref["train_images_per_s"]
        res["speedup_latency_b1"] = ref["infer_latency_ms_b1"] / fast["infer_latency_ms_b1"]
    return res
