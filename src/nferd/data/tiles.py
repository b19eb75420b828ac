"""Tiling: score images larger than the model input at full resolution, tile by tile.

A 2-5 MP image squashed to 256 x 256 shrinks a 10-pixel defect to one or two pixels, below what
the teacher's features resolve. With ``Tiling(size, overlap)`` the model is trained on, and
scores, ``size x size`` tiles cut from the full-resolution image on a grid whose neighbours
overlap by ``overlap`` of a tile; the tiles' anomaly maps are stitched back into one map of the
image's own size, overlaps blended with weights that fall towards each tile's border (where its
features see padding), and the image score is the stitched map's maximum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import OptionError, option


@dataclass(frozen=True)
class Tiling:
    """Square tiles of ``size`` pixels whose neighbours overlap by ``overlap`` (0 to 0.75) of a tile."""

    size: int
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.size < 64 or self.size % 32:
            raise ValueError(f"tile size must be a multiple of 32 and at least 64, got {self.size}")
        if not 0 <= self.overlap <= 0.75:
            raise ValueError(f"tile overlap must be from 0 to 0.75 of a tile, got {self.overlap}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Tiling | None:
        return None if not d else cls(int(d["size"]), float(d.get("overlap", 0.25)))

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "overlap": self.overlap}

    def starts(self, length: int) -> list[int]:
        """Tile origins along one side: a step of ``size * (1 - overlap)``, the last tile flush with
        the edge (one tile at 0 when the side is no longer than a tile)."""
        if length <= self.size:
            return [0]
        step = max(1, int(round(self.size * (1 - self.overlap))))
        out = list(range(0, length - self.size, step))
        return out + [length - self.size]

    def grid(self, height: int, width: int) -> list[tuple[int, int]]:
        return [(y, x) for y in self.starts(height) for x in self.starts(width)]

    def cut(self, image: torch.Tensor) -> torch.Tensor:
        """The tiles of a C x H x W image (N x C x size x size, in ``grid`` order); a side shorter
        than a tile is padded by reflection (edge replication where reflection cannot reach)."""
        image = self.padded(image)
        return torch.stack([image[:, y:y + self.size, x:x + self.size] for y, x in self.grid(*image.shape[-2:])])

    def padded(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        ph, pw = max(0, self.size - h), max(0, self.size - w)
        if not (ph or pw):
            return image
        mode = "reflect" if ph < h and pw < w else "replicate"
        return torch.nn.functional.pad(image[None], (0, pw, 0, ph), mode=mode)[0]

    def window(self) -> torch.Tensor:
        """Blending weights of one tile (size x size): 1 inside, falling linearly to a small floor
        over the overlap at each border, so that a position is decided mostly by the tiles that see
        it away from their borders, and the image's own borders (covered by one tile) keep weight."""
        ramp = max(1, int(self.size * self.overlap / 2))
        pos = torch.arange(self.size, dtype=torch.float32)
        edge = torch.minimum(pos + 1, self.size - pos) / (ramp + 1)
        one = edge.clamp(0.05, 1.0)
        return one[:, None] * one[None, :]

    def stitch(self, maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """One H x W map from the tiles' maps (N x size x size, in ``grid`` order)."""
        ph, pw = max(height, self.size), max(width, self.size)
        acc = torch.zeros(ph, pw, dtype=torch.float32)
        weight = torch.zeros(ph, pw, dtype=torch.float32)
        win = self.window()
        for m, (y, x) in zip(maps.float(), self.grid(ph, pw)):
            acc[y:y + self.size, x:x + self.size] += win * m
            weight[y:y + self.size, x:x + self.size] += win
        return (acc / weight)[:height, :width]

    def score(self, image: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float]:
        """The stitched map (H x W) and score (its maximum) of a C x H x W image; ``run`` maps a
        batch of tiles to their anomaly maps (N x size x size)."""
        h, w = image.shape[-2:]
        stitched = self.stitch(torch.as_tensor(run(self.cut(image))), h, w)
        return stitched, float(stitched.max())


def resolve_tiling(recorded: dict[str, Any] | None, size: int | None, overlap: float | None,
                   image_size: int) -> Tiling | None:
    """The tiling to score with: the model's recorded one (``recorded``, from its training), with
    ``size`` / ``overlap`` given on the command line taking precedence. Tiles are the model's
    input, so their size must be the model's image size."""
    base = Tiling.from_dict(recorded)
    if size is None and overlap is None:
        return base
    size = size or (base.size if base else None)
    if size is None:
        raise OptionError(f"{option('tile_overlap')} needs {option('tile')}: this model was not trained on tiles")
    if size != image_size:
        raise OptionError(f"{option('tile')} {size}: tiles are the model's input, which is {image_size} px; "
                          f"use {option('tile')} {image_size}")
    return Tiling(size, overlap if overlap is not None else (base.overlap if base else 0.25))


class TiledDataset(Dataset):
    """Every tile of every image of ``base`` (a dataset at native resolution) as a sample of its
    own, with its mask tile; consecutive tiles come from one image, which is decoded once."""

    def __init__(self, base: Dataset, tiling: Tiling) -> None:
        self.base, self.tiling = base, tiling
        self.index: list[tuple[int, int, int]] = []
        for i in range(len(base)):
            h, w = base[i]["image"].shape[-2:]
            self.index += [(i, y, x) for y, x in tiling.grid(max(h, tiling.size), max(w, tiling.size))]
        self._last: tuple[int, dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, y, x = self.index[k]
        if self._last is None or self._last[0] != i:
            self._last = (i, self.base[i])
        item, s = self._last[1], self.tiling.size
        image, mask = self.tiling.padded(item["image"]), self.tiling.padded(item["mask"])
        return {**item, "image": image[:, y:y + s, x:x + s].contiguous(),
                "mask": mask[:, y:y + s, x:x + s].contiguous(),
                "label": int(bool(mask[:, y:y + s, x:x + s].any())) if item["label"] else 0}
