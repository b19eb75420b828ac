"""The assembled model: shapes, RD equivalence, fusion variants, loss, anomaly map and blur."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from nferd.cli.info import model_info
from nferd.models.anomaly_map import GaussianBlur, anomaly_map
from nferd.models.bank import RECALLS
from nferd.models.hafm import FUSIONS
from nferd.models.loss import distillation_loss
from nferd.models.nferd import NFERD, ModelConfig


def predict(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and scores through the one scoring path, as tensors."""
    from nferd.engine.scoring import score_batch
    return tuple(torch.from_numpy(a) for a in score_batch(model, images))  # type: ignore[return-value]



def filled(model: NFERD, n: int | None = None, size: int | None = None) -> NFERD:
    n = n or model.config.n_bank
    size = size or model.config.image_size
    if model.config.bank:
        with torch.no_grad():
            feats = model.teacher(torch.rand(n, 3, size, size))
        model.fill_banks(feats, torch.arange(n))
    return model


@pytest.mark.parametrize("teacher", ["wide_resnet50_2", "efficientnet_lite0", "resnet18"])
@pytest.mark.parametrize("size", [256, 320])
def test_full_model_shapes(teacher: str, size: int) -> None:
    torch.manual_seed(0)
    m = filled(NFERD(ModelConfig(teacher=teacher, image_size=size, n_bank=4, top_k=2), teacher_weights="random"))
    m.eval()
    x = torch.rand(2, 3, size, size)
    t, s = m(x)
    assert [a.shape for a in t] == [b.shape for b in s]
    maps, scores = m.anomaly_maps(t, s)
    assert maps.shape == (2, 1, size, size) and scores.shape == (2,)


def test_rd_configuration_is_exactly_rd4ad() -> None:
    torch.manual_seed(0)
    m = NFERD(ModelConfig(teacher="resnet18", image_size=64, bank=False, fusion="none"), teacher_weights="random")
    assert len(m.banks) == 0 and sum(p.numel() for p in m.fusions.parameters()) == 0
    m.eval()
    x = torch.rand(2, 3, 64, 64)
    t, s = m(x)
    rd = m.decoder(m.ocbe(m.teacher(x)))  # RD4AD: decoder(bottleneck(encoder(x)))
    for a, b in zip(s, rd):
        assert torch.equal(a, b)


def test_rd_without_bank_refuses_a_fusion() -> None:
    with pytest.raises(ValueError, match="needs the bank"):
        ModelConfig(bank=False, fusion="hafm")


@pytest.mark.parametrize("recall", RECALLS)
@pytest.mark.parametrize("fusion", [f for f in FUSIONS if f != "none"])
def test_fusion_variants_keep_shapes_and_pass_gradients(recall: str, fusion: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(teacher="efficientnet_lite0", image_size=64, recall=recall, fusion=fusion, n_bank=4, top_k=2)
    m = filled(NFERD(cfg, teacher_weights="random"))
    m.train()
    x = torch.rand(2, 3, 64, 64)
    t, s = m(x, exclude_ids=torch.tensor([0, 1]))
    assert [a.shape for a in t] == [b.shape for b in s]
    if fusion in ("hafm", "cbam"):  # the residual scale starts at 0: give it a value so gradients flow inside
        for f in m.fusions:
            f.scale.data.fill_(0.5)
        t, s = m(x, exclude_ids=torch.tensor([0, 1]))
    distillation_loss(t, s).backward()
    assert m.decoder.layer3[0].conv1.weight.grad.abs().sum() > 0
    assert m.ocbe.conv1.weight.grad.abs().sum() > 0
    if fusion != "add":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.fusions.parameters())
    for bank in m.banks.values():
        assert bank.proj.weight.grad is not None and bank.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())


def test_hafm_scale_gets_gradient_from_zero() -> None:
    torch.manual_seed(0)
    m = filled(NFERD(ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2, fusion="hafm"),
                     teacher_weights="random"))
    t, s = m(torch.rand(2, 3, 64, 64), exclude_ids=torch.tensor([0, 1]))
    distillation_loss(t, s).backward()
    assert any(f.scale.grad.abs().item() > 0 for f in m.fusions)


def test_identical_features_give_zero_map() -> None:
    feats = [torch.randn(2, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))]
    amap = anomaly_map(feats, [f.clone() for f in feats], (64, 64))
    assert amap.shape == (2, 1, 64, 64)
    assert amap.abs().max() < 1e-5
    flipped = anomaly_map(feats, [-f for f in feats], (64, 64))
    assert torch.allclose(flipped, torch.full_like(flipped, 6.0), atol=1e-4)  # 3 stages x (1 - (-1))


def test_blur_matches_scipy_away_from_the_border() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((100, 120)).astype(np.float32)
    ours = GaussianBlur(4.0)(torch.from_numpy(x)[None, None])[0, 0].numpy()
    ref = gaussian_filter(x.astype(np.float64), sigma=4)
    r = 17
    assert np.abs(ours[r:-r, r:-r] - ref[r:-r, r:-r]).max() < 1e-5
    assert ours.shape == x.shape


def test_loss_variants() -> None:
    t = [torch.randn(2, 4, 8, 8)]
    assert distillation_loss(t, [t[0].clone()], "flat").item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(t, [t[0].clone()], "pixel").item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(t, [-t[0]], "flat").item() == pytest.approx(2.0, abs=1e-5)
    # flat compares whole maps: a per-location sign flip of half the map cancels out for it, not for pixel
    s = t[0].clone()
    s[:, :, :4] *= -1
    assert distillation_loss(t, [s], "pixel").item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        distillation_loss(t, t, "l2")


@pytest.mark.parametrize("layouts", [("std", "std"), ("cl", "cl"), ("cl", "std"), ("std", "cl")])
def test_flat_loss_is_the_whole_map_cosine_with_its_gradient(layouts: tuple[str, str]) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 8, 8), (3, 8, 4, 4), (3, 16, 2, 2)]
    fmt = {"std": torch.contiguous_format, "cl": torch.channels_last}
    t = [torch.randn(*sh, generator=g, dtype=torch.float64).contiguous(memory_format=fmt[layouts[0]]) for sh in shapes]
    s = [(x + 0.7 * torch.randn(x.shape, generator=g, dtype=torch.float64)).contiguous(memory_format=fmt[layouts[1]])
         .requires_grad_() for x in t]
    ours = distillation_loss(t, s, "flat")
    ours.backward()
    ref_s = [x.detach().clone().requires_grad_() for x in s]
    ref = sum((1 - torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()
              for a, b in zip(t, ref_s))
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)  # computed in fp32 by design
    for a, b in zip(s, ref_s):
        assert torch.allclose(a.grad, b.grad, atol=1e-7, rtol=1e-5)
    half = t[0].detach().to(torch.bfloat16).requires_grad_()  # a bf16 student map gets a bf16 gradient
    distillation_loss(t[:1], [half], "flat").backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()


def test_info_counts_and_bank_cost_within_ten_percent() -> None:
    rd = model_info(ModelConfig(teacher="wide_resnet50_2", bank=False, fusion="none"))
    nf = model_info(ModelConfig(teacher="wide_resnet50_2", fusion="hafm"))
    default = model_info(ModelConfig(teacher="wide_resnet50_2"))
    # the default bank only scores: RD4AD's trainable parameters exactly, plus the search of two banks
    assert default["params"]["trainable"] == rd["params"]["trainable"] and default["params"]["fusion"] == 0
    assert rd["gflops"] < default["gflops"] < nf["gflops"]
    for key in ("teacher", "ocbe", "decoder", "bank", "fusion", "trainable"):
        assert key in rd["params"] and key in nf["params"]
    assert abs(rd["params"]["ocbe"] - 58.9e6) < 0.1e6  # RD4AD's OCBE without conv4/bn4
    assert abs(rd["params"]["decoder"] - 24.9e6) < 0.1e6
    assert rd["params"]["fusion"] == 0 and nf["params"]["fusion"] > 0
    # the default's memory search (bounded by its size) stays within the 10 % budget; so does the
    # banks' two-stage search, and their exact search does not
    assert default["gflops"] <= 1.10 * rd["gflops"]
    banked = model_info(ModelConfig(teacher="wide_resnet50_2", distance="bank"))
    exact = model_info(ModelConfig(teacher="wide_resnet50_2", distance="bank", search_reduction=1))
    assert rd["gflops"] < banked["gflops"] <= 1.10 * rd["gflops"] < exact["gflops"]
    # a bigger memory costs more, in proportion to its rows
    big = model_info(ModelConfig(teacher="wide_resnet50_2", memory_mib=32))
    assert big["gflops"] - rd["gflops"] > 3 * (default["gflops"] - rd["gflops"])
    # whole-map recall stays within the 10 % budget; the fused patch recall costs its similarity
    # search, within 10 % only with a 2048-position search
    c = model_info(ModelConfig(teacher="wide_resnet50_2", recall="map"))
    small = model_info(ModelConfig(teacher="wide_resnet50_2", fusion="hafm", patch_limit=2048))
    assert rd["gflops"] < c["gflops"] <= 1.10 * rd["gflops"]
    assert rd["gflops"] < small["gflops"] <= 1.10 * rd["gflops"] < nf["gflops"] <= 1.30 * rd["gflops"]


def test_bank_stages_leave_the_other_stages_as_rd4ad(tmp_path) -> None:
    """--bank-stages 2,3: no bank and no fusion parameters at stage 1, the same state-dict keys as the
    full model for the stages that keep theirs, and a checkpoint that comes back with the same maps."""
    from nferd.engine.checkpoint import load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    full = NFERD(ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2, fusion="hafm"),
                 teacher_weights="random")
    part = filled(NFERD(ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2, fusion="hafm",
                                    bank_stages=[3, 2]), teacher_weights="random"))
    assert part.config.bank_stages == (2, 3) and part.config.to_dict()["bank_stages"] == [2, 3]
    assert sorted(part.banks) == ["1", "2"]
    assert sum(p.numel() for p in part.fusions[0].parameters()) == 0
    keys = {k for k in part.state_dict() if k.startswith(("banks.", "fusions."))}
    assert keys and keys < set(full.state_dict())  # same names as the full model, stage 1's missing
    assert not any(k.startswith(("banks.0.", "fusions.0.")) for k in keys)
    for f in part.fusions[1:]:
        f.scale.data.fill_(0.5)
    part.eval()
    x = torch.rand(2, 3, 64, 64)
    maps, _ = predict(part, x)
    assert part.last_recalls[0] is None and part.last_recalls[1] is not None
    save_checkpoint(tmp_path / "ckpt", part)
    back, _ = load_checkpoint(tmp_path / "ckpt")
    assert back.config.bank_stages == (2, 3)
    assert torch.allclose(predict(back, x)[0], maps, atol=1e-6)


@pytest.mark.parametrize("stages", [(), (0, 1), (4,)])
def test_bank_stages_outside_1_to_3_are_refused(stages) -> None:
    with pytest.raises(ValueError, match="bank stages"):
        ModelConfig(bank_stages=stages)


@pytest.mark.parametrize("size", [8, 7])
def test_strided_pointwise_conv_is_a_strided_conv(size: int) -> None:
    from nferd.models.resnet import StridedPointwise, conv1x1
    plain = torch.nn.Conv2d(6, 4, 1, stride=2, bias=False)
    ours = conv1x1(6, 4, stride=2)
    assert isinstance(ours, StridedPointwise)
    ours.load_state_dict(plain.state_dict())  # same keys and shapes as torchvision's
    x = torch.randn(2, 6, size, size, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    plain.double(), ours.double()
    a, b = plain(x), ours(y)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
    (a * a).sum().backward()
    (b * b).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-12)
    assert torch.allclose(plain.weight.grad, ours.weight.grad, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [False, True])
def test_deconv_as_a_matrix_product_is_the_transposed_conv(layout: str, bias: bool) -> None:
    from nferd.models.decoder import Deconv2x2
    torch.manual_seed(0)
    plain = torch.nn.ConvTranspose2d(6, 5, kernel_size=2, stride=2, bias=bias).double()
    ours = Deconv2x2(6, 5, bias=bias).double()
    ours.load_state_dict(plain.state_dict())  # same keys and shapes as torch's
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ours.to(memory_format=fmt)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    y = x.detach().clone().requires_grad_()
    a, b = plain(x), ours(y)
    assert a.shape == b.shape == (2, 5, 6, 8) and torch.allclose(a, b, atol=1e-12)
    assert b.is_contiguous(memory_format=fmt)  # the layout a convolution would give
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert torch.allclose(x.grad, y.grad, atol=1e-12)
    assert torch.allclose(plain.weight.grad, ours.weight.grad, atol=1e-12)
    if bias:
        assert torch.allclose(plain.bias.grad, ours.bias.grad, atol=1e-12)


@pytest.mark.parametrize("recall", RECALLS)
def test_each_recall_is_keyed_by_its_own_query(recall: str) -> None:
    """Patch recall searches by the input's teacher map of the bank's stage; map recall by the
    student's map entering the fused decoder stage."""
    torch.manual_seed(0)
    m = filled(NFERD(ModelConfig(image_size=64, recall=recall, fusion="hafm", n_bank=4, top_k=2),
                     teacher_weights="random")).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        t, s = m(x)
        first = m.last_recalls[0]
        query = t[0] if recall == "patch" else s[1]  # s[1]: the student's map entering the last stage
        assert torch.allclose(first.value, m.banks["0"](query).value, atol=1e-6)
        for p in m.ocbe.parameters():  # change the student, not the teacher
            p.add_(0.5 * torch.randn_like(p))
        m(x)
    moved = not torch.allclose(m.last_recalls[0].similarity, first.similarity, atol=1e-4)
    assert moved == (recall == "map")


def old_metadata(model: NFERD, **changes) -> dict:
    """The model config as an earlier version wrote it (lettered readings and since-removed options)."""
    d = model.config.to_dict()
    d.pop("recall")
    d.update({"reading": "E", "weighting": "softmax", "patch_sampling": "random", "student_act": "auto",
              "student_width": None, "rebuild_key_stages": [1]}, **changes)
    return d


@pytest.mark.parametrize("reading,recall", [("E", "patch"), ("A", "map")])
def test_checkpoints_of_the_kept_readings_still_load(tmp_path, reading: str, recall: str) -> None:
    from nferd.engine.checkpoint import load_checkpoint, save_checkpoint, update_metadata
    torch.manual_seed(0)
    m = filled(NFERD(ModelConfig(image_size=64, recall=recall, fusion="hafm", n_bank=4, top_k=2),
                     teacher_weights="random")).eval()
    save_checkpoint(tmp_path / "old", m)
    update_metadata(tmp_path / "old", model=old_metadata(m, reading=reading))
    back, _ = load_checkpoint(tmp_path / "old")
    assert back.config == m.config
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(predict(back, x)[0], predict(m, x)[0], atol=1e-6)


@pytest.mark.parametrize("changes,named", [({"reading": "G"}, "reading 'G'"), ({"reading": "C"}, "reading 'C'"),
                                           ({"weighting": "linear"}, "weighting"),
                                           ({"patch_sampling": "coreset"}, "patch_sampling")])
def test_checkpoints_of_removed_designs_are_refused_with_the_version_that_reads_them(tmp_path, changes,
                                                                                      named) -> None:
    from nferd.engine.checkpoint import load_checkpoint, save_checkpoint, update_metadata
    m = filled(NFERD(ModelConfig(image_size=64, n_bank=4, top_k=2), teacher_weights="random"))
    save_checkpoint(tmp_path / "old", m)
    update_metadata(tmp_path / "old", model=old_metadata(m, **changes))
    with pytest.raises(ValueError, match=f"{named}.*nferd 0.1.0 is the last version"):
        load_checkpoint(tmp_path / "old")


def test_one_default_teacher_everywhere() -> None:
    from nferd.cli.parser import build_parser
    from nferd.models.nferd import DEFAULT_TEACHER
    assert ModelConfig().teacher == DEFAULT_TEACHER
    parser = build_parser()
    for verb in ("train", "info", "speed", "benchmark"):
        args = parser.parse_args([verb, "run"] if verb == "benchmark" else
                                 [verb, "--data", "d", "--out", "o"] if verb == "train" else [verb])
        assert args.teacher == DEFAULT_TEACHER, verb
