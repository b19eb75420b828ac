"""The fast paths compute what the plain ones do: feature cache vs live teacher, bf16 vs fp32 maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nferd.datasets import MVTecDataset
from nferd.device import cpu_has_bf16
from nferd.evaluate import infer
from nferd.features import FeatureCache
from nferd.model import NFERD, ModelConfig
from nferd.teacher import build_teacher


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
