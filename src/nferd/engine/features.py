"""Teacher feature cache: the teacher is frozen and training has no random augmentation, so each
training image's three teacher maps are computed once and reused every epoch (and to fill the
banks). Stored in fp16 (three significant digits more than bf16, same 2 bytes), in memory, or in
memory-mapped ``.npy`` files under ``cache_dir`` when asked, keyed by the data, the teacher's
weights and the image size so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..models.teacher import Teacher
from .device import autocast


def cache_key(dataset: Dataset, teacher: Teacher, image_size: int, dtype: torch.dtype = torch.float16) -> str:
    """Hash of the image files (path, size, mtime), the teacher and its weights, the size and,
    when it is not the default fp16, the stored dtype."""
    h = hashlib.sha256()
    h.update(json.dumps([teacher.name, teacher.weights_sha256, image_size]).encode())
    if dtype != torch.float16:
        h.update(str(dtype).encode())
    for p in getattr(dataset, "paths", []) or [item_path(dataset, i) for i in range(len(dataset))]:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def item_path(dataset: Dataset, i: int) -> str:
    return str(dataset[i]["path"])


class FeatureCache:
    """Three tensors (N x C x H x W), one per teacher stage, indexed by dataset index; fp16 (half the
    memory; the maps are normalised by the cosine loss anyway) unless fp32 is asked for."""

    def __init__(self, stages: list[Tensor]) -> None:
        self.stages = stages

    def __len__(self) -> int:
        return self.stages[0].shape[0]

    def get(self, idx: Tensor, device: torch.device) -> list[Tensor]:
        """Float32 maps of the samples ``idx`` on ``device``."""
        return [s[idx].to(device, torch.float32, non_blocking=True, memory_format=torch.channels_last)
                for s in self.stages]

    def to(self, device: torch.device) -> FeatureCache:
        """Keep the whole cache on a GPU when it fits: no host-to-device copy per step."""
        return FeatureCache([s.to(device) for s in self.stages])

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.stages)

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: Teacher, dataset: Dataset, device: torch.device, batch_size: int = 16,
              dtype: torch.dtype | None = None, cache_dir: str | Path | None = None,
              num_workers: int = 0, progress: bool = False,
              store_dtype: torch.dtype = torch.float16) -> FeatureCache:
        """Run the teacher once over ``dataset`` (autocast to ``dtype``; None = fp32) and keep its
        maps as ``store_dtype``; reuse ``cache_dir`` files when the key matches."""
        files = None
        if cache_dir is not None:
            key = cache_key(dataset, teacher, dataset[0]["image"].shape[-1], store_dtype)
            files = [Path(cache_dir) / f"features-{key}-stage{i}.npy" for i in range(3)]
            if all(f.is_file() for f in files):
                return cls([torch.from_numpy(np.load(f, mmap_mode="c")) for f in files])
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        chunks: list[list[Tensor]] = [[], [], []]
        it = loader
        if progress:
            from tqdm import tqdm
            it = tqdm(loader, desc="teacher features", unit="batch", leave=False)
        for batch in it:
            with autocast(device, dtype):
                feats = teacher(batch["image"].to(device))
            for i, f in enumerate(feats):
                chunks[i].append(f.to(store_dtype).cpu())
        stages = [torch.cat(c) for c in chunks]
        if files is not None:
            files[0].parent.mkdir(parents=True, exist_ok=True)
            for f, s in zip(files, stages):
                tmp = f.with_suffix(".tmp.npy")
                np.save(tmp, s.numpy())
                tmp.replace(f)
            stages = [torch.from_numpy(np.load(f, mmap_mode="c")) for f in files]
        return cls(stages)
