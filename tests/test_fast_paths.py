"""The fast paths compute what the plain ones do: feature cache vs live teacher, bf16 vs fp32 maps."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from nferd.data.datasets import MVTecDataset
from nferd.engine.device import cpu_has_bf16
from nferd.engine.evaluate import infer
from nferd.engine.features import FeatureCache
from nferd.models.nferd import NFERD, ModelConfig
from nferd.models.teacher import build_teacher


def predict(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and scores through the one scoring path, as tensors."""
    from nferd.engine.scoring import score_batch
    return tuple(torch.from_numpy(a) for a in score_batch(model, images))  # type: ignore[return-value]



def test_cache_returns_the_live_teacher_features(synth_root, tmp_path) -> None:
    ds = MVTecDataset(synth_root, "synthetic_tiles", "train", 64)
    teacher = build_teacher("efficientnet_lite0")
    idx = torch.tensor([3, 0, 7])
    live = teacher(torch.stack([ds[i]["image"] for i in idx.tolist()]))
    for cache_dir in (None, tmp_path):
        cache = FeatureCache.build(teacher, ds, torch.device("cpu"), batch_size=5, cache_dir=cache_dir)
        got = cache.get(idx, torch.device("cpu"))
        for a, b in zip(live, got):
            assert a.shape == b.shape
            # fp16 storage: relative error ~ 2^-11 of the value
            assert torch.allclose(a, b, rtol=2e-3, atol=2e-3 * a.abs().max().item())
    files = sorted(tmp_path.glob("features-*.npy"))
    assert len(files) == 3
    again = FeatureCache.build(teacher, ds, torch.device("cpu"), cache_dir=tmp_path)  # reuses the files
    assert isinstance(again.stages[0], torch.Tensor) and again.stages[0].shape[0] == len(ds)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_bf16_maps_agree_with_fp32(synth_root) -> None:
    ds = MVTecDataset(synth_root, "synthetic_tiles", "test", 64)
    torch.manual_seed(0)
    model = NFERD(ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2))
    with torch.no_grad():
        model.fill_banks(model.teacher(torch.rand(4, 3, 64, 64)), torch.arange(4))
    a = infer(model, ds, precision="fp32")
    b = infer(model, ds, precision="bf16")
    rng = a["maps"].max() - a["maps"].min()
    assert np.abs(a["maps"] - b["maps"]).max() < 0.05 * rng
    from scipy.stats import spearmanr
    assert spearmanr(a["scores"], b["scores"]).statistic > 0.9


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own import
def test_compiled_model_computes_the_eager_maps_and_keeps_its_weight_names() -> None:
    from nferd.engine.device import compile_dense
    torch.manual_seed(0)
    model = NFERD(ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2, fusion="hafm")).eval()
    with torch.no_grad():
        model.fill_banks(model.teacher(torch.rand(4, 3, 64, 64)), torch.arange(4))
        for f in model.fusions:
            f.scale.fill_(1.0)  # let the fused recall reach the output
        x = torch.rand(2, 3, 64, 64)
        want, want_scores = predict(model, x)
        keys = list(model.state_dict())
        compile_dense(model)
        got, got_scores = predict(model, x)
    assert list(model.state_dict()) == keys  # checkpoints of a compiled run load anywhere
    assert model.ocbe._compiled_call_impl is not None  # really compiled, not silently skipped
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-3, atol=1e-4)


def test_heap_trim_waits_for_resident_memory_to_creep(monkeypatch) -> None:
    import nferd.engine.device as dev
    calls: list[int] = []
    rss = iter([100, 105, 109, 111, 100, 104, 200])  # resident bytes at the end of successive steps
    monkeypatch.setattr(dev, "_libc_malloc_trim", lambda: calls.append)
    monkeypatch.setattr(dev, "_resident_bytes", lambda: next(rss))
    monkeypatch.setattr(dev, "_reference", 0)
    trimmed = [dev.release_free_memory(growth=1.1) for _ in range(7)]
    # step 1 sets the reference (100); 105 and 109 are under 110; 111 trims; the next step sets a new
    # reference (100), 104 is under it; 200 trims
    assert trimmed == [False, False, False, True, False, False, True] and calls == [0, 0]
    monkeypatch.setattr(dev, "_resident_bytes", lambda: 0)  # memory unreadable: trim every step, as before
    assert dev.release_free_memory() and dev.release_free_memory()
    monkeypatch.setattr(dev, "_libc_malloc_trim", lambda: None)  # not glibc: never
    assert not dev.release_free_memory()


@pytest.mark.parametrize("fusion", ["none", "hafm"])
def test_inference_copy_gives_the_autocast_maps_with_weights_cast_once(fusion: str) -> None:
    from nferd.engine.device import inference_copy
    torch.manual_seed(0)
    model = NFERD(ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2, fusion=fusion))
    with torch.no_grad():
        model.fill_banks(model.teacher(torch.rand(4, 3, 64, 64)), torch.arange(4))
    for f in model.fusions:
        if hasattr(f, "scale"):
            f.scale.data.fill_(0.5)
    model.eval()
    runner = inference_copy(model, torch.bfloat16)
    assert inference_copy(model, None) is model  # fp32: nothing to cast
    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in runner.modules())  # the decoder's upsampling
    assert all(m.weight.dtype == torch.bfloat16 for m in runner.modules() if isinstance(m, convs))
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, convs))
    assert all(m.weight.dtype == torch.float32 for m in runner.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any(p.requires_grad for p in runner.parameters())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.anomaly_maps(*model(x))[0]
        got = runner.anomaly_maps(*runner(x))[0]
    assert torch.equal(got, want)  # autocast rounds the fp32 weights the same way on every call


@pytest.mark.parametrize("preset", ["nferd", "nferd_fusion", "nferd_paper", "rd4ad"])
def test_a_batch_gives_each_image_the_map_it_gets_alone(preset: str) -> None:
    """Batching is a speed choice only: every design scores an image the same alone or among others
    in one network call (per-sample bank search, BatchNorm in eval mode, per-image blur and score),
    so the CPU's one-image micro-batches and a GPU's whole batches give the same maps."""
    from nferd.deploy.predict import Predictor
    torch.manual_seed(0)
    model = NFERD(ModelConfig.preset(preset, teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2))
    if model.config.bank:
        with torch.no_grad():
            model.fill_banks(model.teacher(torch.rand(4, 3, 64, 64)), torch.arange(4))
    for f in model.fusions:
        if hasattr(f, "scale"):
            f.scale.data.fill_(0.5)  # let a fused recall reach the maps
    predictor = Predictor(model.eval(), None, device="cpu", precision="fp32")
    images = torch.rand(5, 3, 64, 64)
    maps, scores = predictor.run(images)  # one call for the whole batch
    alone = [predictor.run(images[i:i + 1]) for i in range(len(images))]
    span = float(maps.max() - maps.min())
    for i, (m, s) in enumerate(alone):
        assert np.abs(maps[i] - m[0]).max() <= 1e-5 * span, (preset, i)
        assert abs(float(scores[i]) - float(s[0])) <= 1e-5 * span, (preset, i)


def test_a_cpu_batch_runs_one_image_per_network_call_and_keeps_the_order() -> None:
    """On a CPU one 256-px image's activations stay in cache and a batch's do not, so ``maps``
    runs the network on that many pixels at a time there, and once per batch where
    ``micro_batch`` is None (a GPU)."""
    from nferd.deploy.predict import BasePredictor

    class Counting(BasePredictor):
        def __init__(self, micro: int | None) -> None:
            self.micro_batch, self.calls = micro, []

        def run(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            self.calls.append(len(images))
            return images[:, 0].numpy(), images[:, 0].flatten(1).amax(1).numpy()

    images = torch.rand(5, 3, 4, 4)
    for micro, calls in ((1, [1] * 5), (2, [2, 2, 1]), (None, [5])):
        p = Counting(micro)
        maps, scores = p.maps(images)
        assert p.calls == calls
        assert np.array_equal(maps, images[:, 0].numpy())
        assert np.array_equal(scores, images[:, 0].flatten(1).amax(1).numpy())
    from nferd.engine.device import micro_batch
    cpu = torch.device("cpu")
    assert micro_batch(cpu, 256 * 256) == 1 and micro_batch(cpu, 512 * 512) == 1 and micro_batch(cpu, 64 * 64) == 16
    assert micro_batch(torch.device("cuda"), 256 * 256) is None
