"""The banks' nearest-normal distance as a term of the anomaly map: the formula against a brute-force
search, its standardisation on normal images, training and checkpoints, and the ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nferd import ModelConfig, MVTecDataset, TrainConfig, load_checkpoint, train
from nferd.engine.evaluate import fit_map_norm
from nferd.models.anomaly_map import anomaly_map
from nferd.models.nferd import NFERD, search_dims

CAT = "synthetic_tiles"

def predict(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and scores through the one scoring path, as tensors."""
    from nferd.engine.scoring import score_batch
    return tuple(torch.from_numpy(a) for a in score_batch(model, images))  # type: ignore[return-value]



def filled(weight: float = 0.5, fusion: str = "none", teacher_weights: str | None = "random") -> NFERD:
    """A small model with filled banks (random teacher by default: fast, and enough for the formulas)."""
    torch.manual_seed(0)
    m = NFERD(ModelConfig(distance="bank", image_size=64, n_bank=4, top_k=2, fusion=fusion,
                          bank_distance_weight=weight),
              teacher_weights=teacher_weights)
    with torch.no_grad():
        m.fill_banks(m.teacher(torch.rand(4, 3, 64, 64)), torch.arange(4))
    return m.eval()


def test_the_default_scores_with_the_two_finest_banks_and_rd4ads_student() -> None:
    cfg = ModelConfig(distance="bank", image_size=64, n_bank=4, top_k=2)
    assert (cfg.fusion, cfg.bank_stages, cfg.bank_distance_weight) == ("none", (1, 2), 0.5)
    m = NFERD(cfg, teacher_weights="random")
    assert sorted(m.banks) == ["0", "1"] and hasattr(m, "map_norm")
    # a fusion, the paper's recall or no bank turn the distance off and bank every stage
    for kw in ({"fusion": "hafm"}, {"recall": "map"}, {"bank": False}):
        c = ModelConfig(**kw)
        assert c.bank_distance_weight == 0 and c.bank_stages == (1, 2, 3), kw
    assert ModelConfig(recall="map").fusion == "hafm"
    assert ModelConfig(fusion="hafm", bank_distance_weight=0.25).bank_distance_weight == 0.25


def test_a_config_saved_without_the_newer_fields_keeps_its_old_meaning() -> None:
    old = {k: v for k, v in ModelConfig(fusion="hafm").to_dict().items()
           if k not in ("fusion", "bank_stages", "bank_distance_weight")}
    assert ModelConfig.from_dict(old) == ModelConfig(fusion="hafm", bank_stages=(1, 2, 3), bank_distance_weight=0.0)
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()


def test_the_option_needs_the_patch_bank_and_a_sane_weight() -> None:
    with pytest.raises(ValueError, match="patch recall"):
        ModelConfig(bank=False, fusion="none", bank_distance_weight=0.5)
    with pytest.raises(ValueError, match="patch recall"):
        ModelConfig(recall="map", bank_distance_weight=0.5)
    with pytest.raises(ValueError, match="bank_distance_weight"):
        ModelConfig(bank_distance_weight=-1.0)
    assert not hasattr(NFERD(ModelConfig(distance="bank", image_size=64, n_bank=4, top_k=2, bank_distance_weight=0),
                             teacher_weights="random"), "map_norm")


def test_map_is_the_standardised_student_map_plus_the_weighted_nearest_normal_distance() -> None:
    m = filled(weight=0.5)
    m.map_norm.copy_(torch.tensor([0.3, 2.0, 0.1, 0.5]))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        t, s = m(x)
        got, score = m.anomaly_maps(t, s, (64, 64))
        student = anomaly_map(t, s, (64, 64))
        dist = 0
        for i, bank in m.banks.items():  # brute force: every searched bank row, plain cosine
            q = F.interpolate(t[int(i)], size=bank.out_size, mode="bilinear", align_corners=False)
            rows = bank.maps.permute(0, 2, 3, 1).reshape(-1, bank.maps.shape[1])[bank.patch_index]
            cos = F.cosine_similarity(q.permute(0, 2, 3, 1).unsqueeze(3), rows.view(1, 1, 1, *rows.shape), dim=4)
            d = (1 - cos.amax(3)).unsqueeze(1)
            dist = dist + F.interpolate(d, size=(64, 64), mode="bilinear", align_corners=True)
        want = m.blur((student - 0.3) / 2.0 + 0.5 * (dist - 0.1) / 0.5)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(score, want.flatten(1).amax(1), atol=1e-4)


def test_the_student_is_rd4ads_when_the_bank_only_scores() -> None:
    """With fusion none the recall is not computed and the student maps are RD4AD's."""
    m = filled(weight=0.5)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        t, s = m(x)
        rd = m.decoder(m.ocbe(t))
    assert all(torch.equal(a, b) for a, b in zip(s, rd))
    assert m.last_recalls == [None, None, None]


def test_standardisation_gives_each_term_mean_zero_and_unit_spread_on_its_normal_images(synth_root: Path) -> None:
    m = filled(weight=1.0)
    normals = MVTecDataset(synth_root, CAT, "train", 64)
    values = fit_map_norm(m, normals, device="cpu", precision="fp32")
    assert m.map_norm.tolist() == pytest.approx(values)
    terms = [[], []]
    with torch.no_grad():
        for i in range(len(normals)):
            t, s = m(normals[i]["image"][None])
            for k, term in enumerate(m.term_maps(t, s, (64, 64))):
                terms[k].append(term)
    for k in range(2):
        z = (torch.cat(terms[k]) - values[2 * k]) / values[2 * k + 1]
        assert abs(float(z.mean())) < 1e-4 and float(z.std()) == pytest.approx(1.0, abs=1e-3)


def test_training_fits_the_standardisation_and_the_checkpoint_keeps_it(synth_root: Path, tmp_path: Path) -> None:
    ds = MVTecDataset(synth_root, CAT, "train", 64)
    cfg = ModelConfig(distance="bank", image_size=64, n_bank=4, top_k=2, fusion="none", bank_distance_weight=0.25)
    model, summary = train(ds, cfg, TrainConfig(epochs=1, batch_size=4, holdout=0.25, device="cpu"), tmp_path / "ck",
                           progress=False)
    norm = model.map_norm.tolist()
    assert norm != [0.0, 1.0, 0.0, 1.0] and all(np.isfinite(norm)) and norm[1] > 0 and norm[3] > 0
    back, meta = load_checkpoint(tmp_path / "ck")
    assert back.map_norm.tolist() == pytest.approx(norm)
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(predict(back, x)[0], predict(model.eval(), x)[0], atol=1e-5)
    assert meta["calibration"]["image_threshold"] == pytest.approx(summary["calibration"]["image_threshold"])


def test_the_exported_graph_computes_the_same_map(tmp_path: Path) -> None:
    """ONNX Runtime against PyTorch, with the ImageNet teacher (a random teacher's near-zero features
    make any two fp32 implementations of the cosine disagree)."""
    pytest.importorskip("onnxruntime")
    from nferd.deploy.export import check_export, export_onnx
    m = filled(weight=0.5, teacher_weights=None)
    m.map_norm.copy_(torch.tensor([0.3, 2.0, 0.1, 0.5]))
    path = export_onnx(m, tmp_path / "m.onnx")
    report = check_export(m, path)
    assert report["ok"], report


def test_a_scoring_bank_has_no_projection_and_older_checkpoints_with_one_still_load(tmp_path: Path) -> None:
    """nferd 0.2 saved 1x1 projections for banks it never fused; they are dropped on load, and the
    maps are the same."""
    from safetensors.torch import load_file, save_file

    from nferd.engine.checkpoint import save_checkpoint, weights_file
    m = filled(weight=0.5)
    assert not any(k.endswith("proj.weight") for k in m.state_dict())
    save_checkpoint(tmp_path / "ck", m)
    f = weights_file(tmp_path / "ck")
    from safetensors import safe_open
    with safe_open(str(f), framework="pt") as sf:
        metadata = sf.metadata()
    tensors = load_file(str(f))
    tensors["banks.0.proj.weight"] = torch.randn(8, 24, 1, 1)  # as 0.2 wrote them
    save_file(tensors, str(f), metadata=metadata)
    back, _ = load_checkpoint(tmp_path / "ck")
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(predict(back, x)[0], predict(m, x)[0], atol=1e-6)


def test_the_two_stage_search_is_on_where_the_teacher_has_the_channels_for_it() -> None:
    """Default reduction 4: WRN50-2's 256 and 512 channels are searched on 64 and 128 directions;
    EfficientNet-Lite0's 24 and 40 exactly (32 directions would leave nothing to save); a fused
    bank, which the distance does not use, gets no projection; old configs mean the exact search."""
    assert search_dims(256, 4) == 64 and search_dims(512, 4) == 128 and search_dims(64, 4) == 32
    assert search_dims(24, 4) is None and search_dims(40, 4) is None and search_dims(1024, 1) is None
    m = NFERD(ModelConfig(distance="bank", teacher="resnet18", image_size=64, n_bank=4, top_k=2),
              teacher_weights="random")
    assert [b.search_proj.shape for b in m.banks.values()] == [(64, 32), (128, 32)]
    fused = NFERD(ModelConfig(distance="bank", teacher="resnet18", image_size=64, n_bank=4, top_k=2, fusion="hafm"),
                  teacher_weights="random")
    assert all(b.search_proj is None for b in fused.banks.values())
    old = {k: v for k, v in ModelConfig().to_dict().items() if k != "search_reduction"}
    assert ModelConfig.from_dict(old).search_reduction == 1


def test_the_two_stage_search_scores_as_the_exact_search_and_exports_with_a_free_batch_axis(tmp_path: Path) -> None:
    """ResNet-18's banks (64 and 128 channels, 32 directions each; random weights, the only ones
    offline): the two-stage distance is never below the exact one and within 0.02 of it at 99 % of
    positions, and the exported graph reproduces it at batch 1 and 3 in one call."""
    pytest.importorskip("onnxruntime")
    from nferd.deploy.export import check_export, export_onnx
    torch.manual_seed(0)
    m = NFERD(ModelConfig(distance="bank", teacher="resnet18", image_size=64, n_bank=8, top_k=2),
              teacher_weights="random").eval()
    exact = NFERD(ModelConfig(distance="bank", teacher="resnet18", image_size=64, n_bank=8, top_k=2,
                              search_reduction=1),
                  teacher=m.teacher).eval()
    normals = torch.rand(8, 3, 64, 64)
    with torch.no_grad():
        for model in (m, exact):
            model.fill_banks(model.teacher(normals), torch.arange(8))
        t = m.teacher(torch.cat([normals[:2] * 0.9 + 0.05, torch.rand(2, 3, 64, 64)]))
        fast, full = m.bank_distance(t, (64, 64)), exact.bank_distance(t, (64, 64))
    assert bool((fast >= full - 1e-5).all())
    assert float((fast - full).flatten().quantile(0.99)) < 0.02
    m.map_norm.copy_(torch.tensor([0.3, 2.0, 0.1, 0.5]))
    path = export_onnx(m, tmp_path / "m.onnx")
    for batch in (1, 3):
        report = check_export(m, path, batch=batch)
        assert report["ok"], report
