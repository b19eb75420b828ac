"""Why is it NOK: the image's highest-scoring region beside the closest normal region in memory.

The memory keeps, for every normal position it holds, the training image it came from and where.
At the position where an image's anomaly map peaks, the memory row its distance was measured to
is a real region of a real good part: shown side by side, an operator sees "this scratch, against
what a good part looks like here" and can trust the decision or overrule it. The region is the
3 x 3 cells of the memory's grid around the position: the neighbourhood its feature averages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.images import ImageLoadError, open_image

REGION_CELLS = 3
NEEDS_MEMORY = ("needs the memory of normal features, which this model does not have (RD4AD has no bank; "
                "the bank-distance preset keeps 64 images' maps, not every position)")


def cell_box(cell: tuple[int, int], grid: tuple[int, int], size: tuple[int, int]) -> list[int]:
    """Pixel box [x0, y0, x1, y1] of the ``REGION_CELLS`` x ``REGION_CELLS`` cells around ``cell``
    of a ``grid`` (rows, columns) laid over an image of ``size`` (width, height)."""
    (gy, gx), (h, w), (width, height) = cell, grid, size
    r = REGION_CELLS // 2
    return [int(np.floor(max(gx - r, 0) * width / w)), int(np.floor(max(gy - r, 0) * height / h)),
            int(np.ceil(min(gx + r + 1, w) * width / w)), int(np.ceil(min(gy + r + 1, h) * height / h))]


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of an image file from its header, or None when it cannot be read."""
    try:
        with open_image(path) as im:
            return im.size
    except (OSError, ValueError):
        return None


@torch.no_grad()
def nearest_normal(model: Any, image: torch.Tensor, amap: np.ndarray, memory_images: list[str] | None
                   ) -> dict[str, Any]:
    """The ``nearest_normal`` entry of one scored image: ``image`` (3 x S x S, as loaded) and its
    anomaly map ``amap`` (S x S). ``input_box`` is in the model's S x S pixels; writers that know
    the image's own size place it there with :func:`cell_box` (``input_cell``, ``grid``).

    Returns ``available`` False with a ``reason`` for a model without a memory; otherwise the
    distance at the map's peak, the box there in the input, and the memory row's training image
    (``normal_image``, its path and box, when the checkpoint records its images)."""
    memory = getattr(model, "memory", None)
    if memory is None or memory.size == 0:
        return {"available": False, "reason": NEEDS_MEMORY}
    s = int(amap.shape[-1])
    py, px = np.unravel_index(int(np.argmax(amap)), amap.shape)
    device = next(model.teacher.parameters()).device
    feats = memory.features(model.teacher(image[None].to(device).float()))
    h, w = feats.shape[-2:]
    cell = (min(h - 1, int(py) * h // s), min(w - 1, int(px) * w // s))
    row, distance = memory.nearest_row(feats[0, :, cell[0], cell[1]])
    if int(memory.position[row]) < 0:
        return {"available": False, "reason": "this checkpoint's memory does not record where its rows come from "
                                              "(saved by an earlier nferd): train it again to get explanations"}
    image_id, (sy, sx) = int(memory.source[row]), divmod(int(memory.position[row]), w)
    entry: dict[str, Any] = {"available": True, "distance": distance, "memory_row": row, "grid": [h, w],
                             "input_cell": list(cell), "input_box": cell_box(cell, (h, w), (s, s)),
                             "normal_image_id": image_id, "normal_cell": [sy, sx]}
    if memory_images is not None and 0 <= image_id < len(memory_images):
        path = memory_images[image_id]
        size = image_size(path)
        entry.update(normal_image=Path(path).name, normal_path=path,
                     normal_box=cell_box((sy, sx), (h, w), size) if size else None)
        if size is None:
            entry["normal_note"] = "the training image is not readable here: its box is not shown"
    else:
        entry["normal_note"] = "this checkpoint does not record its training images"
    return entry


def side_by_side(image: str | Path | np.ndarray, entry: dict[str, Any], side: int = 192) -> np.ndarray | None:
    """The input's region at the peak beside the closest normal region (both enlarged to ``side``
    px), with their boxes drawn on small copies of the whole images; None when the entry has no
    readable normal image. ``image``: the input's file, or its pixels (H x W x 3 uint8, any scale:
    the box is placed by the cell)."""
    if not entry.get("available") or not entry.get("normal_box") or not entry.get("normal_path"):
        return None
    try:
        if isinstance(image, np.ndarray):
            a = Image.fromarray(image)
        else:
            with open_image(image) as im:
                a = im.convert("RGB")
        with open_image(entry["normal_path"]) as im:
            b = im.convert("RGB")
    except (OSError, ValueError, ImageLoadError):
        return None
    a_box = cell_box(tuple(entry["input_cell"]), tuple(entry["grid"]), a.size)
    tiles = []
    for im, box, colour in ((a, a_box, (220, 40, 40)), (b, entry["normal_box"], (40, 170, 70))):
        crop = im.crop(tuple(box)).resize((side, side), Image.Resampling.NEAREST)
        whole = im.copy()
        whole.thumbnail((side, side))
        sx, sy = whole.width / im.width, whole.height / im.height
        ImageDraw.Draw(whole).rectangle([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], outline=colour, width=2)
        pane = Image.new("RGB", (side, 2 * side + 4), (255, 255, 255))
        pane.paste(crop, (0, 0))
        pane.paste(whole, ((side - whole.width) // 2, side + 4))
        tiles.append(pane)
    out = Image.new("RGB", (2 * side + 8, 2 * side + 4), (255, 255, 255))
    out.paste(tiles[0], (0, 0))
    out.paste(tiles[1], (side + 8, 0))
    return np.asarray(out)
