"""Time AUPRO (and the full pixel-metric pass) on a realistic worst-case test set.

100 random 1024 x 1024 float32 anomaly maps with random blob-shaped defect masks (1e8
pixels). Requirement: aupro under 30 s and under 4 GiB peak memory on 2 CPU cores.

    .venv/bin/python scripts/bench_aupro.py [--images 100] [--size 1024]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
from scipy import ndimage

from nferd.metrics import aupro, compute_metrics


def peak_rss_gib() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def make_data(num_images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth noisy maps; blobs (thresholded smoothed noise) in 80% of the images score higher."""
    rng = np.random.default_rng(seed)
    maps = np.empty((num_images, size, size), dtype=np.float32)
    masks = np.zeros((num_images, size, size), dtype=np.uint8)
    small = size // 16
    for i in range(num_images):
        noise = rng.standard_normal((small, small)).astype(np.float32)
        field = ndimage.zoom(ndimage.gaussian_filter(noise, 2.0), 16, order=1)
        maps[i] = rng.random((size, size), dtype=np.float32)
        if i % 5:
            masks[i] = field > 2.0 * field.std()
            maps[i] += 0.8 * masks[i]
    return maps, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()

    maps, masks = make_data(args.images, args.size)
    defect_fraction = np.count_nonzero(masks) / masks.size
    print(f"data: {maps.shape} float32, {defect_fraction:.2%} defect pixels, peak RSS {peak_rss_gib():.2f} GiB")

    start = time.perf_counter()
    value = aupro(maps, masks)
    seconds = time.perf_counter() - start
    print(f"aupro = {value:.6f}: {seconds:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")

    start = time.perf_counter()
    image_scores = maps.reshape(len(maps), -1).max(axis=1)
    image_labels = masks.reshape(len(masks), -1).any(axis=1)
    results = compute_metrics(image_scores, image_labels, maps, masks)
    seconds = time.perf_counter() - start
    print(f"compute_metrics = {results}: {seconds:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
