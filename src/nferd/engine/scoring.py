"""The one scoring path: images in, anomaly maps and image scores out.

Evaluation, calibration, cross-fitting, prediction, the service (through the predictor), tiled
scoring and the export check all score a batch with :func:`score_batch`, so a change to how an
image is scored is made once and reaches every command. The network runs under autocast at the
chosen precision; the map (cosines, distances, blur, standardisation) is computed outside it, in
fp32, where thresholds are fitted.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .device import autocast, channels_last, micro_batch

Scores = tuple[np.ndarray, np.ndarray]


@torch.no_grad()
def score_batch(model: torch.nn.Module, images: torch.Tensor, device: torch.device | None = None,
                amp: torch.dtype | None = None, exclude: torch.Tensor | None = None) -> Scores:
    """Blurred anomaly maps (N x H x W float32) and image scores (N) of ``images`` (N x 3 x H x W
    in [0, 1]) by ``model`` on ``device`` (default: the model's), the network under ``amp``.
    ``exclude``: the images' ids in the memory, whose own rows are left out (training images)."""
    device = device if device is not None else next(model.parameters()).device
    x = channels_last(images.to(device))
    with autocast(device, amp):
        t, s = model(x)
    m, sc = model.anomaly_maps(t, s, tuple(x.shape[-2:]), exclude=exclude)
    return m[:, 0].float().cpu().numpy(), sc.float().cpu().numpy()


def in_micro_batches(score: Callable[[torch.Tensor], Scores], images: torch.Tensor,
                     step: int | None) -> Scores:
    """``score`` over ``images`` ``step`` at a time (``engine.device.micro_batch``; None: all at once)."""
    if step is None or len(images) <= step:
        return score(images)
    parts = [score(images[a:a + step]) for a in range(0, len(images), step)]
    return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts])


def cpu_step(device: torch.device, images: torch.Tensor) -> int | None:
    """The micro-batch for ``images`` on ``device``."""
    return micro_batch(device, int(images.shape[-2]) * int(images.shape[-1]))
