"""Scale-out with PyTorch's own ``torch.distributed``, launched by ``torchrun``.

``torchrun`` starts one process per GPU (or per CPU slot) and tells each its place through the
environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Without
these variables every helper here is a no-op, so a plain ``nferd`` process takes the old path.

What the training and prediction code use from here:

* ``init`` / ``is_main`` / ``barrier`` / ``broadcast_tensors`` / ``shard``: the process group
  (NCCL on CUDA, gloo on CPU) and the contiguous, deterministic split of a list over ranks;
* ``build_feature_cache``: each rank runs the teacher over its own contiguous block of
  training images (in the same 16-image batches a single process uses, so the features are the
  same), then every block is broadcast from its owner, so every rank holds the full, identical
  cache and fills identical banks;
* ``SyncBatchNorm2d``: synchronised BatchNorm that also works on CPU/gloo (torch's own
  ``nn.SyncBatchNorm`` is CUDA-only and is used on GPUs);
* ``average_bn_stats``: without synchronised BatchNorm every rank keeps running statistics of
  its own part of the batch; they are averaged before a checkpoint is written, so the saved
  model does not depend on which rank wrote it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..errors import OptionError, option
from ..models.teacher import Teacher
from .device import default_threads, resolve_device
from .features import FeatureCache, cache_key

T = TypeVar("T")


# ------------------------------------------------------------------ environment (no process group)
def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer (torchrun sets it)") from None


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    return _env_int("RANK", 0)


def launched() -> bool:
    """True in a process started by torchrun with more than one process in the job."""
    return env_world_size() > 1


def local_device(device: str = "auto") -> torch.device:
    """``resolve_device``, but a bare 'cuda' means this process's GPU (cuda:LOCAL_RANK) under torchrun."""
    d = resolve_device(device)
    local = os.environ.get("LOCAL_RANK")
    if d.type == "cuda" and d.index is None and local is not None:
        d = torch.device("cuda", int(local) % max(1, torch.cuda.device_count()))
    return d


def local_threads() -> int:
    """CPU threads for this process: the cores shared by the processes torchrun put on this node."""
    return max(1, default_threads() // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))


# ------------------------------------------------------------------------------- process group
def init(device: torch.device | None = None, backend: str | None = None,
         timeout: timedelta | None = None) -> bool:
    """Join the torchrun job's process group (once); returns True when more than one process runs.

    ``backend``: None picks NCCL for CUDA devices and gloo otherwise.
    """
    if not launched():
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if dist.is_initialized():
        return dist.get_world_size() > 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start "
                         "distributed runs with torchrun (see docs/deploy.md, distributed training)")
    if backend is None:
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    kw: dict = {}
    if backend == "nccl":
        if device is None or device.type != "cuda":
            raise OptionError(f"the NCCL backend needs a CUDA device; use {option('device')} cuda or run on CPU (gloo)")
        n_local, n_gpus = _env_int("LOCAL_WORLD_SIZE", 1), torch.cuda.device_count()
        if n_local > n_gpus:
            raise ValueError(f"torchrun started {n_local} processes on this machine but {n_gpus} GPU(s) are "
                             f"visible: start it with `torchrun --nproc_per_node {n_gpus}` (one process per GPU)")
        torch.cuda.set_device(device)
        kw["device_id"] = device
    if timeout is not None:
        kw["timeout"] = timeout
    dist.init_process_group(backend, **kw)
    atexit.register(_shutdown)
    return dist.get_world_size() > 1


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """A process group with more than one member is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, logs and summaries."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device(fallback: torch.device) -> torch.device:
    """Where collective tensors must live: the GPU for NCCL, host memory for gloo."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback.type == "cpu" else torch.device("cpu")


def broadcast_tensors(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (in place, on every rank) with rank ``src``'s values."""
    if active():
        for t in tensors:
            dist.broadcast(t, src)


def agree(flag: bool) -> tuple[bool, bool]:
    """(any rank, every rank) has ``flag``: for decisions that must be the same on all ranks."""
    if not active():
        return flag, flag
    t = torch.tensor([float(flag), float(not flag)], device=_comm_device(torch.device("cpu")))
    dist.all_reduce(t)
    return bool(t[0] > 0), bool(t[1] == 0)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum a few numbers over ranks (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(torch.device("cpu")))
    dist.all_reduce(t)
    return t.tolist()


def shard(indices: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s contiguous part of ``indices``: sizes differ by at most one, earlier ranks larger.

    Deterministic and order-preserving, so concatenating the shards of ranks 0..world-1
    gives ``indices`` back.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    n = len(indices)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(indices[start:start + base + (1 if rank < extra else 0)])


# ------------------------------------------------------------------------------ feature cache
def build_feature_cache(teacher: Teacher, dataset: Dataset, device: torch.device, batch_size: int = 16,
                        cache_dir: str | Path | None = None, progress: bool = False,
                        store_dtype: torch.dtype = torch.float16) -> FeatureCache:
    """The full teacher feature cache on every rank, each rank computing only its own block.

    Blocks are whole ``batch_size`` batches of the single-process order, so each image goes
    through the teacher in the same batch as in a single process. With ``cache_dir`` the
    memory-mapped files of ``FeatureCache.build`` are read when every rank sees them, and
    written (by one process per node) when they are computed here.
    """
    n = len(dataset)
    files = None
    if cache_dir is not None:
        key = cache_key(dataset, teacher, dataset[0]["image"].shape[-1], store_dtype)
        files = [Path(cache_dir) / f"features-{key}-stage{i}.npy" for i in range(3)]
        if agree(all(f.is_file() for f in files))[1]:
            return FeatureCache([torch.from_numpy(np.load(f, mmap_mode="c")) for f in files])
    starts = list(range(0, n, batch_size))
    spans = []
    for r in range(world()):
        own = shard(starts, r, world())
        spans.append((own[0], min(own[-1] + batch_size, n)) if own else (0, 0))
    lo, hi = spans[rank()]
    local = None
    if hi > lo:
        local = FeatureCache.build(teacher, Subset(dataset, list(range(lo, hi))), device, batch_size=batch_size,
                                   dtype=None, progress=progress and is_main(), store_dtype=store_dtype)
    size = tuple(dataset[0]["image"].shape[-2:])
    comm = _comm_device(torch.device("cpu"))
    stages = [torch.empty((n, c, size[0] // (4 << i), size[1] // (4 << i)), dtype=store_dtype, device=comm)
              for i, c in enumerate(teacher.stage_channels)]
    if local is not None:
        for full, part in zip(stages, local.stages):
            if tuple(part.shape[1:]) != tuple(full.shape[1:]):
                raise RuntimeError(f"teacher maps of shape {tuple(part.shape[1:])}, expected {tuple(full.shape[1:])}")
            full[lo:hi].copy_(part)
    for r, (a, b) in enumerate(spans):
        if b > a:
            broadcast_tensors([s[a:b] for s in stages], src=r)
    if files is None:
        return FeatureCache(stages)
    if _env_int("LOCAL_RANK", rank()) == 0:  # one writer per node (nodes may not share the folder)
        files[0].parent.mkdir(parents=True, exist_ok=True)
        for f, s in zip(files, stages):
            tmp = f.with_name(f"{f.stem}.rank{rank()}.tmp.npy")
            np.save(tmp, s.cpu().numpy())
            tmp.replace(f)
    barrier()
    return FeatureCache([torch.from_numpy(np.load(f, mmap_mode="c")) for f in files])


# ---------------------------------------------------------------------------------- BatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients (every rank uses the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        g = g.clone()
        dist.all_reduce(g)
        return g


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch, on any device.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d`` (checkpoints do not
    change); outside training or a multi-process group it is plain BatchNorm. Mean and biased
    variance normalise, the unbiased variance goes into ``running_var``, as in ``F.batch_norm``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = (0, 2, 3)
        xf = x.float()
        count = torch.full((1,), float(xf.numel() // xf.shape[1]), device=xf.device)
        sums = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = xf - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Synchronise every trainable BatchNorm of ``module`` (frozen ones, like the teacher's, stay).

    The new layers take over the old parameter and buffer tensors, so an optimizer built on
    them keeps working and state-dict keys stay the same.
    """
    gpu = device.type in ("cuda", "xpu", "hpu")
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and child.weight is not None and child.weight.requires_grad:
            new: nn.BatchNorm2d
            if gpu:
                new = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            else:
                new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module


@contextlib.contextmanager
def local_batchnorm(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Synchronised BatchNorm layers act as plain BatchNorm inside the block.

    For a batch every rank holds whole (``batch_part``'s replicated last batch), the local
    statistics are the batch's statistics; synchronising would count each sample once per rank.
    """
    layers = [m for m in module.modules() if isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm2d))] if enabled else []
    for m in layers:
        m.forward = functools.partial(nn.BatchNorm2d.forward, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in layers:
            del m.forward


@torch.no_grad()
def average_bn_stats(module: nn.Module) -> None:
    """Average the running statistics of trainable BatchNorm layers over ranks (in place).

    Running statistics only matter in eval mode, so this does not change training; it makes
    the saved model the same whichever rank writes it.
    """
    if not active():
        return
    bufs = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.weight is not None and m.weight.requires_grad and m.track_running_stats
            for b in (m.running_mean, m.running_var)]
    if not bufs:
        return
    flat = torch.cat([b.flatten().double() for b in bufs]).to(_comm_device(bufs[0].device))
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for b in bufs:
        b.copy_(flat[i:i + b.numel()].view_as(b).to(b.device, b.dtype))
        i += b.numel()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the whole model: only parameters that require gradients
    (OCBE, decoder, fusions, bank projections; not the frozen teacher) are all-reduced.

    ``static_graph``: the same parameters are used every step, so DDP need not search for
    unused ones each step. Buffers are not broadcast every step: the banks and the teacher
    are identical on all ranks already, and BatchNorm statistics are averaged at checkpoints.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    kw: dict = {"device_ids": [device.index] if device.type == "cuda" else None, "static_graph": True}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kw["forward_sync_buffers"] = False  # newer torch's name for the same (buffers still synced once, at init)
    else:
        kw["broadcast_buffers"] = False
    return DistributedDataParallel(model, **kw)


def check_batch_size(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise OptionError(f"{option('batch_size')} {batch_size} is the global batch and must be divisible by the "
                          f"{world_size} processes (each takes batch_size / processes); choose e.g. "
                          f"{max(world_size, batch_size - batch_size % world_size)}")


def batch_part(batch: Tensor, rank: int, world: int) -> tuple[Tensor, float, bool]:
    """This rank's part of one global batch, the weight of its loss, and whether it is replicated.

    Even split (every full batch): weight 1, DDP's gradient average is the batch mean. An
    uneven last batch is split as evenly as possible and each rank's mean loss is weighted by
    its share x world, so the average is still the mean over the batch. A last batch smaller
    than the world is computed whole by every rank (same gradient everywhere).
    """
    m = len(batch)
    if m < world:
        return batch, 1.0, True
    own = shard(range(m), rank, world)
    part = batch[own[0]:own[-1] + 1]
    return part, (1.0 if m % world == 0 else len(part) * world / m), False
