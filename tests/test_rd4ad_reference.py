"""The RD4AD configuration (no bank, no fusion) against an independent, plainly written RD forward.

The reference below is written from RD4AD's published structure with nothing but
``torch.nn.functional``: it reads the student's weights by their state-dict names and never calls
a module of the package. OCBE: teacher stage 1 through two strided 3x3 convs and stage 2 through
one, both to stage 3's size and channels, concatenated with stage 3 and squeezed by a ResNet
layer of basic blocks whose first block has stride 2. Decoder: three stages mirroring the
teacher (stage 3, 2, 1), each opening with a block whose 3x3 conv and shortcut are 2x2 stride-2
transposed convolutions. Map: per stage 1 - cosine over channels, bilinear upsampling, sum,
SciPy's Gaussian blur; score: the map's maximum.

BatchNorm parameters and running statistics are randomised, so a reference or a model that
skipped or misplaced one normalisation would not agree by accident (fresh statistics are the
identity).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from nferd.models.nferd import NFERD, ModelConfig

SIZE = 64
BN_EPS = 1e-5  # the student's BatchNorm (the EfficientNet-Lite teacher's own 1e-3 is not used here)
SIGMA = 4.0


class Weights:
    """The state dict, recording every key the reference reads."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = {k: v.detach().float().contiguous() for k, v in sd.items()}
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self.sd[key]


def bn(w: Weights, p: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"], w[f"{p}.bias"],
                        training=False, eps=BN_EPS)


def conv3x3(w: Weights, p: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    return F.conv2d(x, w[f"{p}.weight"], stride=stride, padding=1)


def deconv2x2(w: Weights, p: str, x: torch.Tensor) -> torch.Tensor:
    return F.conv_transpose2d(x, w[f"{p}.weight"], stride=2)


def encoder_block(w: Weights, p: str, x: torch.Tensor, stride: int) -> torch.Tensor:
    """ResNet basic block; the first block of the OCBE layer has a strided 1x1 projection shortcut."""
    out = F.relu(bn(w, f"{p}.bn1", conv3x3(w, f"{p}.conv1", x, stride)))
    out = bn(w, f"{p}.bn2", conv3x3(w, f"{p}.conv2", out))
    identity = x
    if f"{p}.downsample.0.weight" in w.sd:
        identity = bn(w, f"{p}.downsample.1", F.conv2d(x, w[f"{p}.downsample.0.weight"], stride=stride))
    return F.relu(out + identity)


def decoder_block(w: Weights, p: str, x: torch.Tensor, up: bool, final_relu: bool) -> torch.Tensor:
    """RD4AD's de-basic block: with ``up`` the first conv and the shortcut are transposed 2x2, stride 2."""
    first = deconv2x2(w, f"{p}.conv1", x) if up else conv3x3(w, f"{p}.conv1", x)
    out = F.relu(bn(w, f"{p}.bn1", first))
    out = bn(w, f"{p}.bn2", conv3x3(w, f"{p}.conv2", out))
    identity = bn(w, f"{p}.upsample.1", deconv2x2(w, f"{p}.upsample.0", x)) if up else x
    out = out + identity
    return F.relu(out) if final_relu else out


def reference_student(w: Weights, t: list[torch.Tensor], blocks: int, linear_stages: bool) -> list[torch.Tensor]:
    """RD4AD's OCBE and reverse decoder; returns the student maps in teacher order (stage 1, 2, 3).

    ``linear_stages``: the teacher's stage outputs are linear (EfficientNet-Lite), so the last
    block of each decoder stage leaves out its final ReLU; ResNet teachers keep RD4AD's ReLU.
    """
    l1 = F.relu(bn(w, "ocbe.bn1", conv3x3(w, "ocbe.conv1", t[0], 2)))
    l1 = F.relu(bn(w, "ocbe.bn2", conv3x3(w, "ocbe.conv2", l1, 2)))
    l2 = F.relu(bn(w, "ocbe.bn3", conv3x3(w, "ocbe.conv3", t[1], 2)))
    x = torch.cat([l1, l2, t[2]], dim=1)
    for b in range(blocks):
        x = encoder_block(w, f"ocbe.bn_layer.{b}", x, 2 if b == 0 else 1)
    outs = []
    for stage in ("layer1", "layer2", "layer3"):  # rebuilds teacher stage 3, then 2, then 1
        for b in range(blocks):
            last = b == blocks - 1
            x = decoder_block(w, f"decoder.{stage}.{b}", x, up=b == 0, final_relu=not (last and linear_stages))
        outs.append(x)
    return outs[::-1]


def reference_map(t: list[torch.Tensor], s: list[torch.Tensor], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unblurred sum of upsampled 1 - cosine maps, blurred per image by SciPy: (maps, scores).

    The model pads with torch's 'reflect', which repeats no edge pixel: SciPy calls that 'mirror'."""
    total = 0
    for a, b in zip(t, s):
        d = 1 - F.cosine_similarity(a, b, dim=1).unsqueeze(1)
        total = total + F.interpolate(d, size=(size, size), mode="bilinear", align_corners=True)
    raw = total[:, 0].double().numpy()
    blurred = np.stack([gaussian_filter(m, sigma=SIGMA, mode="mirror", truncate=4.0) for m in raw])
    return blurred, blurred.reshape(len(blurred), -1).max(axis=1)


def randomise_batchnorm(model: torch.nn.Module) -> None:
    """Student BatchNorm layers get random affine parameters and running statistics."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d) and not name.startswith("teacher."):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)


# teacher -> (OCBE and decoder blocks per stage, linear teacher stages): RD4AD's resnet18 student,
# and the basic-block student the project sizes for EfficientNet-Lite
CASES = {"efficientnet_lite0": (2, True), "resnet18": (2, False)}


def rd_model(teacher: str) -> NFERD:
    torch.manual_seed(0)
    model = NFERD(ModelConfig(teacher=teacher, image_size=SIZE, bank=False, fusion="none"),
                  teacher_weights="random")
    randomise_batchnorm(model)
    return model.eval()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("teacher", list(CASES))
def test_rd_student_maps_and_anomaly_map_match_a_plain_reference(teacher: str, layout: str) -> None:
    """Student maps, blurred map and image score equal the plain forward's to 1e-4. channels_last
    input (what inference runs) takes the decoder's matmul form of the transposed convolution."""
    blocks, linear = CASES[teacher]
    model = rd_model(teacher)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t, s = model(images)
        maps, scores = model.anomaly_maps(t, s)
        t_plain = [f.contiguous() for f in t]
        w = Weights(model.state_dict())
        ref_s = reference_student(w, t_plain, blocks, linear)
        ref_maps, ref_scores = reference_map(t_plain, ref_s, SIZE)

    sizes = [SIZE // 4, SIZE // 8, SIZE // 16]
    assert [tuple(x.shape[-2:]) for x in ref_s] == [(h, h) for h in sizes]
    for got, want in zip(s, ref_s):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(maps[:, 0].double().numpy(), ref_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores.double().numpy(), ref_scores, rtol=1e-4, atol=1e-4)
    # every student weight and statistic is read by the reference: no module works outside it
    student = {k for k in w.sd if not k.startswith("teacher.") and not k.endswith("num_batches_tracked")}
    assert student == w.read


def test_reference_tells_a_wrong_student_apart() -> None:
    """The comparison has teeth: a student whose ReLU placement differs from the reference's
    (a linear-teacher stage read as a ResNet stage) is far outside the tolerance."""
    model = rd_model("efficientnet_lite0")
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t, s = model(images)
        wrong = reference_student(Weights(model.state_dict()), t, blocks=2, linear_stages=False)
    assert max((a - b).abs().max().item() for a, b in zip(s, wrong)) > 1e-2
