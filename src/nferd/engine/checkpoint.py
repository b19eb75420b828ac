"""Checkpoints: safetensors weights with their JSON description in one atomically written file.

A checkpoint is either a folder holding ``model.safetensors`` (plus a readable copy of its
metadata as ``config.json``) or a single ``.safetensors`` file. The file's header metadata is
the authority: format and version, model config, teacher name and weight hash, normalisation,
calibration and the training config. The teacher's weights are included by default, so a
checkpoint runs on a machine that has neither the network nor the teacher file. Never pickle.

A checkpoint whose weights or calibration hold NaN or infinite values is refused when it is read
(and a calibration like that is never written): such a model scores a defective part NaN, and
``score > threshold`` is False for NaN, which would pass it as OK.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import NferdError
from ..models.nferd import NFERD, ModelConfig
from ..version import __version__
from . import safe_io
from .calibration import as_calibration
from .jsonio import NonFiniteJSONError, dumps
from .safe_io import write_json

FORMAT = "nferd-checkpoint"
VERSION = 1
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(NferdError, ValueError):
    """A checkpoint is missing, of another format or version, does not fit its config, or holds NaN or
    infinite weights or calibration values."""


def weights_file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / WEIGHTS_NAME


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file.

    The metadata is strict JSON with a valid calibration; a NaN or infinite value in it is refused.
    """
    _check_header(metadata, path, writing=True)
    try:
        header = dumps(metadata, nulls=False)
    except NonFiniteJSONError as e:
        raise CheckpointError(f"refusing to write checkpoint '{path}': its metadata entry {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    with safe_io.staged(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"nferd": header})


def model_metadata(model: NFERD, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    t = model.teacher
    return {
        "format": FORMAT, "version": VERSION, "nferd_version": __version__,
        "model": model.config.to_dict(),
        "teacher": {"name": t.name, "weights_sha256": t.weights_sha256, "stage_channels": list(t.stage_channels)},
        "normalization": {"mean": t.mean.flatten().tolist(), "std": t.std.flatten().tolist(),
                          "input_range": [0, 1], "image_size": model.config.image_size},
        **(extra or {}),
    }


def save_checkpoint(path: str | Path, model: NFERD, extra: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None, include_teacher: bool = True) -> Path:
    """Save weights (+ optional optimizer state for resuming) and metadata atomically."""
    meta = model_metadata(model, extra)
    meta["includes_teacher"] = include_teacher
    tensors = {k: v for k, v in model.state_dict().items() if include_teacher or not k.startswith("teacher.")}
    if optimizer is not None:
        sd = optimizer.state_dict()
        for pid, state in sd["state"].items():
            for name, value in state.items():
                tensors[f"optimizer.{pid}.{name}"] = torch.as_tensor(value)
        meta["optimizer"] = {"param_groups": sd["param_groups"]}
    out = weights_file(path)
    atomic_save(tensors, out, meta)
    write_config_json(out, meta)
    return out


def write_config_json(out: Path, meta: dict[str, Any]) -> None:
    """The readable copy of a folder checkpoint's metadata, replaced atomically."""
    if out.name == WEIGHTS_NAME:
        write_json(out.parent / "config.json", meta, nulls=False)


def update_metadata(path: str | Path, **changes: Any) -> dict[str, Any]:
    """Replace top-level metadata entries (e.g. ``calibration``) of a checkpoint, weights untouched.

    The old calibration is not checked, so a broken one can be replaced; the new metadata is.
    """
    meta = read_metadata(path, check=False)
    meta.update(changes)
    out = weights_file(path)
    with safe_open(str(out), framework="pt") as sf:
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    atomic_save(tensors, out, meta)
    write_config_json(out, meta)
    return meta


def _check_header(meta: dict[str, Any], f: str | Path, writing: bool = False) -> None:
    """A calibration that decisions cannot rest on (NaN, infinite, no image threshold) is an error."""
    try:
        as_calibration(meta.get("calibration"))
    except ValueError as e:
        if writing:
            raise CheckpointError(f"refusing to write checkpoint '{f}' with an unusable calibration: {e}") from e
        raise CheckpointError(f"checkpoint '{f}' has an unusable calibration: {e}. Its decisions cannot be trusted: "
                              "restore a copy, or train it again") from e


def check_finite(tensors: dict[str, torch.Tensor], f: str | Path) -> None:
    """Refuse NaN or infinite weights, naming the first tensor that holds them."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"checkpoint '{f}' has non-finite values in {bad[0]}{more}: it is broken, train it "
                              "again or restore a copy")


def read_metadata(path: str | Path, check: bool = True) -> dict[str, Any]:
    """The checkpoint's header metadata, checked for format and version and (``check``) for a usable
    calibration."""
    f = weights_file(path)
    if not f.is_file():
        raise CheckpointError(f"no checkpoint at '{path}' (looked for {f}). Pass the folder a training "
                              "wrote, or a .safetensors checkpoint file.")
    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = json.loads((sf.metadata() or {}).get("nferd", "null"))
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint '{f}': {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"'{f}' is a safetensors file but not an nferd checkpoint (no nferd metadata).")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"'{f}' has checkpoint format version {meta['version']}, newer than this nferd "
                              f"({__version__}, reads version {VERSION}): upgrade nferd.")
    if check:
        _check_header(meta, f)
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    teacher_weights: str | None = None, check_calibration: bool = True) -> tuple[NFERD, dict[str, Any]]:
    """Rebuild the model from its metadata and load the weights strictly; NaN or infinite weights or
    calibration values are refused (``CheckpointError``). ``check_calibration=False`` is for
    refitting the thresholds of a model whose stored calibration is unusable."""
    meta = read_metadata(path, check=check_calibration)
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' has an invalid model config: {e}") from e
    has_teacher = meta.get("includes_teacher", True)
    model = NFERD(config, teacher_weights="random" if has_teacher else teacher_weights)
    f = weights_file(path)
    with safe_open(str(f), framework="pt") as sf:
        tensors = {k: sf.get_tensor(k) for k in sf.keys() if not k.startswith("optimizer.")}
    if model.memory is not None and "memory.rows" in tensors:  # its size is known only from the file
        model.memory.resize(tensors["memory.rows"].shape[0])
        if "memory.position" not in tensors:  # saved before rows recorded their place: -1, unknown
            tensors["memory.position"] = torch.full((tensors["memory.rows"].shape[0],), -1, dtype=torch.long)
    own = model.state_dict()
    if config.fusion == "none":  # projections that nferd 0.2 saved for banks it never fused
        tensors = {k: v for k, v in tensors.items() if not (k.startswith("banks.") and k.endswith(".proj.weight"))}
    if not has_teacher:
        own = {k: v for k, v in own.items() if not k.startswith("teacher.")}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint '{f}' does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shapes {sorted(wrong)[:5]}")
    check_finite(tensors, f)
    model.load_state_dict(tensors, strict=has_teacher)
    for module in model.modules():  # index tensors against the shapes they index
        if hasattr(module, "check_loaded"):
            try:
                module.check_loaded()
            except ValueError as e:
                raise CheckpointError(f"checkpoint '{f}' is inconsistent: {e}. It was damaged or edited: "
                                      "restore a copy, or train it again") from e
    if has_teacher:
        model.teacher.weights_sha256 = meta["teacher"].get("weights_sha256")
    return model.to(device).eval(), meta


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer state saved by ``save_checkpoint(..., optimizer=...)``."""
    meta = read_metadata(path)
    if "optimizer" not in meta:
        raise CheckpointError(f"'{path}' holds no optimizer state, so training cannot resume from it.")
    state: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file(path)), framework="pt") as sf:
        for k in sf.keys():
            if k.startswith("optimizer."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = sf.get_tensor(k)
    check_finite({f"optimizer.{pid}.{name}": v for pid, s in state.items() for name, v in s.items()},
                 weights_file(path))
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    # The file holds contiguous tensors; give each moment buffer its parameter's layout again
    # (channels-last convolution weights): the fused Adam kernel walks parameter, gradient and
    # moments as one flat memory order, so a layout mismatch would pair the wrong elements.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)
