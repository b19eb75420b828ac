"""Device and precision choices: bf16 where the hardware has it, fp32 where accuracy needs it."""

from __future__ import annotations

import contextlib
import copy
import functools
import os

import torch

from ..errors import OptionError, option

CPU_PIXELS_PER_CALL = 256 * 256  # a 256-px image: one image's activations stay in cache


def micro_batch(device: torch.device, image_pixels: int) -> int | None:
    """Images per network call at inference: on a CPU as many as hold ``CPU_PIXELS_PER_CALL``
    pixels (one 256-px image, sixteen 64-px ones), whose activations stay in cache where a larger
    batch's spill to memory and cost more per image on every backend (docs/decisions.md); the
    whole batch on a GPU (None)."""
    return max(1, CPU_PIXELS_PER_CALL // max(1, image_pixels)) if device.type == "cpu" else None


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"{option('device')} {device} was asked for but no CUDA GPU is visible to torch; "
                          f"use {option('device')} cpu")
    return torch.device(device)


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX-512 BF16 or AMX), where autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` ('auto', 'bf16', 'fp16', 'fp32'); None means fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision '{precision}'; choose auto, bf16, fp16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC layout: oneDNN (CPU) and cuDNN run bf16 convolutions faster on it."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to ``device`` in the layout its inputs get from ``channels_last``."""
    return model.to(device, memory_format=torch.channels_last)


def inference_copy(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """The model for autocast inference: a copy whose convolution (plain and transposed) and linear
    weights are already stored in the autocast ``dtype``. Autocast would cast them again on every
    call, a sizeable share of a batch-1 forward; the cast is the same rounding, so the outputs are
    identical. Norm layers, banks and buffers stay fp32."""
    if dtype is None or any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
        return model  # fp32, or compiled modules (a deep copy would keep calling the originals)
    runner = copy.deepcopy(model).eval()
    for m in runner.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            m.to(dtype)
    for p in runner.parameters():
        p.requires_grad_(False)
    return runner


def default_threads() -> int:
    """Physical cores available to this process (torch's default may count hyperthreads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def compile_dense(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` the dense parts of an NFERD model in place (teacher, OCBE, decoder stages,
    fusion modules), leaving the bank recall (a data-dependent top-K with a Python-side cache) eager.

    ``nn.Module.compile`` keeps the parameter names, so checkpoints are unchanged. The first
    batches of each new shape pay the compilation (tens of seconds on a small CPU); CPU inductor
    needs a C++ compiler on PATH.
    """
    parts = [getattr(model, name, None) for name in ("teacher", "ocbe")]
    parts += list(getattr(getattr(model, "decoder", None), "stages", []))
    parts += list(getattr(model, "fusions", []))
    parts = [p for p in parts if isinstance(p, torch.nn.Module)]
    # Dynamo counts recompilations per code object, and the three decoder stages (and the three
    # fusions) are instances of one class: with training, batch-1 and batch-B inference each
    # instance needs its own graphs, so the default limit (8) would silently fall back to eager.
    import torch._dynamo.config as dynamo_config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 8 * len(parts)))
    for part in parts:
        part.compile()
    return model


@functools.cache
def _libc_malloc_trim():  # type: ignore[no-untyped-def]
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return None


def _resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


_reference = 0  # resident bytes at the end of the first step after the last trim


def release_free_memory(growth: float = 1.1) -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``) once resident memory
    at the end of a step has crept ``growth`` above where it stood one step after the last trim;
    returns whether it trimmed (never, off glibc).

    A CPU training step allocates and frees many activation-sized blocks below glibc's mmap
    threshold; the freed pages stay in the process, so resident memory creeps up step after step
    (about twice the peak of a trimmed run for a WRN50 epoch). Trimming every step makes the next
    step fault all those pages in again, so the trim waits until the creep is worth it.
    """
    global _reference
    trim = _libc_malloc_trim()
    if trim is None:
        return False
    rss = _resident_bytes()
    if rss and not _reference:
        _reference = rss
        return False
    if rss and rss < growth * _reference:
        return False
    trim(0)
    _reference = 0
    return True
