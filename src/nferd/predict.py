"""Prediction on new images: score, decision, anomaly map, mask and overlay per image.

Inputs are files, folders or glob patterns. A file that cannot be read is reported in the
summary and skipped; the others go on. Maps are computed at the model's resolution and
resized back to each image's own size for the saved map, mask and overlay.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .calibration import display_range, normalize
from .device import autocast, autocast_dtype, channels_last, place, resolve_device
from .images import ImageLoadError, is_image_file, list_images, load_image
from .model import NFERD
from .visualize import overlay


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (their images) and glob patterns, in the order given, without duplicates."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += list_images(p)
        elif any(ch in item for ch in "*?["):
            out += [Path(m) for m in sorted(glob.glob(item, recursive=True)) if is_image_file(m)]
        else:
            out.append(p)
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def output_names(paths: list[Path]) -> dict[Path, str]:
    """Unique output stems: the file stem, prefixed by parent folders only where stems collide."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    stems = [p.stem for p in paths]
    for p in paths:
        name = p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}_{p.stem}"
        base, i = name, 1
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        names[p] = name
    return names


class Predictor:
    """A loaded model plus its calibration, ready for batches of image files."""

    def __init__(self, model: NFERD, calibration: dict[str, Any] | None = None, device: str = "auto",
                 precision: str = "auto") -> None:
        self.device = resolve_device(device)
        self.model = place(model.eval(), self.device)
        self.amp = autocast_dtype(self.device, precision)
        self.calibration = calibration
        self.size = model.config.image_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "auto") -> "Predictor":
        from .checkpoint import load_checkpoint
        model, meta = load_checkpoint(path, device="cpu")
        return cls(model, meta.get("calibration"), device, precision)

    @torch.no_grad()
    def maps(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """[0, 1] images at the model size -> (maps N x S x S, scores N) as NumPy."""
        x = channels_last(images.to(self.device))
        with autocast(self.device, self.amp):
            t, s = self.model(x)
        m, sc = self.model.anomaly_maps(t, s, tuple(x.shape[-2:]))
        return m[:, 0].float().cpu().numpy(), sc.float().cpu().numpy()

    def decide(self, score: float) -> dict[str, Any]:
        if self.calibration is None:
            return {"score": score, "normalized_score": None, "decision": None}
        ns = float(normalize(score, self.calibration))
        return {"score": score, "normalized_score": ns,
                "decision": "NOK" if score > self.calibration["image_threshold"] else "OK"}

    def predict_paths(self, paths: list[Path], batch_size: int = 16) -> Iterator[dict[str, Any]]:
        """Yield one result dict per path (``error`` set for files that could not be read)."""
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            loaded: dict[Path, torch.Tensor] = {}
            errors: dict[Path, str] = {}
            for p in chunk:
                try:
                    loaded[p] = load_image(p, self.size)
                except (ImageLoadError, OSError, ValueError) as e:
                    errors[p] = str(e)
            results: dict[Path, tuple[np.ndarray, float]] = {}
            if loaded:
                maps, scores = self.maps(torch.stack(list(loaded.values())))
                results = {p: (m, float(s)) for p, m, s in zip(loaded, maps, scores)}
            for p in chunk:  # input order, failures included
                if p in errors:
                    yield {"path": str(p), "error": errors[p]}
                else:
                    m, s = results[p]
                    yield {"path": str(p), "map": m, **self.decide(s)}


def _resize_map(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(m)[None, None]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def save_outputs(result: dict[str, Any], out_dir: Path, calibration: dict[str, Any] | None,
                 map_format: str = "npy") -> dict[str, Any]:
    """Write map (.npy float32 or 16-bit PNG scaled to the display range), mask and overlay PNGs."""
    src = Path(result["path"])
    stem = result.get("name", src.stem)
    with Image.open(src) as im:
        rgb = np.asarray(im.convert("RGB"))
    amap = _resize_map(result["map"], rgb.shape[:2])
    vmin, vmax = display_range(calibration, amap)
    row = {k: v for k, v in result.items() if k != "map"}
    if map_format == "npy":
        np.save(out_dir / "maps" / f"{stem}.npy", amap.astype(np.float32))
    else:
        scaled = np.clip((amap - vmin) / (vmax - vmin), 0, 1) * 65535
        Image.fromarray(scaled.astype(np.uint16)).save(out_dir / "maps" / f"{stem}.png")
    mask = None
    if calibration is not None:
        mask = amap > calibration["pixel_threshold"]
        Image.fromarray((mask * 255).astype(np.uint8)).save(out_dir / "masks" / f"{stem}.png")
        row["defect_area_px"] = int(mask.sum())
        row["defect_area_fraction"] = float(mask.mean())
    Image.fromarray(overlay(rgb, amap, vmin, vmax, mask=mask)).save(out_dir / "overlays" / f"{stem}.png")
    return row


def predict_to_folder(predictor: Predictor, inputs: Iterable[str], out_dir: str | Path, batch_size: int = 16,
                      map_format: str = "npy", progress: bool = True) -> list[dict[str, Any]]:
    """Run ``predictor`` over inputs and write per-image files plus ``summary.csv`` / ``summary.json``."""
    inputs = list(inputs)
    paths = expand_inputs(inputs)
    if not paths:
        raise ValueError(f"no images found in {inputs}")
    names = output_names(paths)
    out = Path(out_dir)
    for sub in ("maps", "masks", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    it: Iterable[dict[str, Any]] = predictor.predict_paths(paths, batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(paths), desc="predict", unit="img")
    for res in it:
        if "error" in res:
            rows.append(res)
            continue
        res["name"] = names[Path(res["path"])]
        try:
            rows.append(save_outputs(res, out, predictor.calibration, map_format))
        except OSError as e:
            rows.append({"path": res["path"], "error": f"could not write outputs: {e}"})
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    cols = ["path", "score", "normalized_score", "decision", "defect_area_px", "defect_area_fraction", "error"]
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows
