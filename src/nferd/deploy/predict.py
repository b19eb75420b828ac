"""Prediction on new images: score, decision, anomaly map, mask and overlay per image.

Inputs are files, folders or glob patterns. A file that cannot be read is reported in the
summary and skipped; the others go on. Maps are computed at the model's resolution and
resized back to each image's own size for the saved map, mask and overlay.

``predict_to_folder`` records every finished image in ``OUT/progress/rank-R.jsonl`` (appended
and flushed per image), so a run that stops early is continued by running it again; under
torchrun each process scores its own share of the batches and rank 0 writes the summary.

Every output file is written through ``engine.safe_io``: never through a symbolic link planted
in the output folder, and text cells of ``summary.csv`` that a spreadsheet would run as a
formula are neutralised.
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import ImageLoadError, is_image_file, list_images, load_image, open_image
from ..data.tiles import Tiling
from ..engine import distributed as ddp
from ..engine import jsonio, scoring
from ..engine.calibration import Calibration, NonFiniteError, as_calibration, calibration_dict, decision, display_range
from ..engine.device import autocast_dtype, inference_copy, micro_batch, place, resolve_device
from ..engine.safe_io import make_dir, open_append, remove_own_temps, save_image, save_npy, write_dict_csv, write_json
from ..errors import OptionError, option
from ..models.nferd import NFERD
from .explain import cell_box, nearest_normal, side_by_side
from .visualize import captioned, overlay


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


class BasePredictor:
    """What ``predict_to_folder`` needs from a backend: ``maps`` plus the calibration; batching,
    file loading and decisions are shared by the PyTorch ``Predictor`` and ``onnx_backend.OnnxPredictor``."""

    calibration: Calibration | None = None
    size: int
    #: Images per network call (``engine.device.micro_batch``): on a CPU one 256-px image's worth
    #: of pixels, None (the whole batch) on a GPU.
    micro_batch: int | None = 1
    #: Score full-resolution images tile by tile (``data.tiles``); None: resize to the model size.
    tiling: Tiling | None = None

    def maps(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """[0, 1] images at the model size -> (maps N x S x S, scores N) as NumPy, run
        ``micro_batch`` images at a time; each image's result does not depend on the others."""
        return scoring.in_micro_batches(self.run, images, self.micro_batch)

    def run(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One network call of the backend (what ``maps`` splits a batch into)."""
        raise NotImplementedError

    def explain(self, image: torch.Tensor, amap: np.ndarray) -> dict[str, Any]:
        """The ``nearest_normal`` entry of one scored image (``deploy.explain``): the closest normal
        region in the memory at the map's peak. Exported graphs do not carry the memory's sources."""
        return {"available": False, "reason": "the exported model does not carry the memory's training images: "
                                              "explanations come from the checkpoint (torch backend)"}

    def load(self, path: Path) -> torch.Tensor:
        """One image file as the backend's input (float 3 x S x S in [0, 1] by default; at its own
        size when tiled)."""
        return load_image(path, None if self.tiling else self.size)

    def batch_maps(self, images: list[torch.Tensor]) -> tuple[Any, np.ndarray]:
        """Maps and scores of loaded images (``load``): one array of maps, or with tiling a list of
        maps at each image's own size."""
        if self.tiling is None:
            return self.maps(torch.stack(images))
        tiling = self.tiling
        done = [tiling.score(im, lambda tiles: torch.from_numpy(self.maps(tiles)[0])) for im in images]
        return [m.numpy() for m, _ in done], np.array([s for _, s in done], dtype=np.float32)

    def decide(self, score: float) -> dict[str, Any]:
        """Score, normalised score and decision ('OK', 'NOK', or None without calibration) of one image.

        Fails closed: a NaN or infinite score or threshold raises ``NonFiniteError``, never OK.
        """
        cal = self.calibration
        dec = decision(score, cal)
        ns = None if cal is None else float(cal.normalize(score))
        return {"score": score, "normalized_score": ns, "decision": dec}

    def image_result(self, path: Path, amap: np.ndarray, score: float) -> dict[str, Any]:
        """One image's result, or an error row (``path``, ``error``) when its map or score is not finite."""
        bad = int(np.size(amap) - np.count_nonzero(np.isfinite(amap)))
        if bad:
            return {"path": str(path), "error": f"the anomaly map has {bad} non-finite values (NaN or infinite), so "
                                                "no decision can be made (a broken model or checkpoint)"}
        try:
            return {"path": str(path), "map": amap, **self.decide(score)}
        except NonFiniteError as e:
            return {"path": str(path), "error": str(e)}

    def predict_paths(self, paths: list[Path], batch_size: int = 16) -> Iterator[dict[str, Any]]:
        """Yield one result dict per path (``error`` set for files that could not be read and for images
        whose map or score is NaN or infinite: those get no decision)."""
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            loaded: dict[Path, torch.Tensor] = {}
            errors: dict[Path, str] = {}
            for p in chunk:
                try:
                    loaded[p] = self.load(p)
                except (ImageLoadError, OSError, ValueError) as e:
                    errors[p] = str(e)
            results: dict[Path, tuple[np.ndarray, float]] = {}
            if loaded:
                maps, scores = self.batch_maps(list(loaded.values()))
                results = {p: (m, float(s)) for p, m, s in zip(loaded, maps, scores)}
            for p in chunk:  # input order, failures included
                if p in errors:
                    yield {"path": str(p), "error": errors[p]}
                    continue
                res = self.image_result(p, *results[p])
                if "error" not in res:
                    res["nearest_normal"] = self.explain(loaded[p], results[p][0])
                yield res


class Predictor(BasePredictor):
    """A loaded model plus its calibration, ready for batches of image files."""

    def __init__(self, model: NFERD, calibration: Calibration | Mapping[str, Any] | None = None, device: str = "auto",
                 precision: str = "auto", tiling: Tiling | None = None,
                 memory_images: list[str] | None = None) -> None:
        self.device = resolve_device(device)
        self.model = place(model.eval(), self.device)
        self.amp = autocast_dtype(self.device, precision)
        self.runner = inference_copy(self.model, self.amp)  # weights pre-cast for autocast
        self.calibration = as_calibration(calibration)  # a JSON object (a user's file) is checked here
        self.size = model.config.image_size
        self.micro_batch = micro_batch(self.device, self.size ** 2)
        self.tiling = tiling
        self.memory_images = memory_images  # the training image behind each memory id (checkpoint metadata)

    def explain(self, image: torch.Tensor, amap: np.ndarray) -> dict[str, Any]:
        if self.tiling is not None:
            return {"available": False, "reason": "a tiled model's explanation is not computed yet"}
        return nearest_normal(self.model, image, amap, self.memory_images)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "auto",
                        tiling: Tiling | None = None) -> Predictor:
        """The checkpoint's model and calibration; tiled as it was trained unless ``tiling`` is given."""
        from ..engine.checkpoint import load_checkpoint
        model, meta = load_checkpoint(path, device="cpu")
        return cls(model, meta.get("calibration"), device, precision, tiling or Tiling.from_dict(meta.get("tiling")),
                   memory_images=meta.get("memory_images"))

    def run(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return scoring.score_batch(self.runner, images, self.device, self.amp)


def resize_map(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(m)[None, None]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def save_outputs(result: dict[str, Any], out_dir: Path, calibration: Calibration | None,
                 map_format: str = "npy") -> dict[str, Any]:
    """Write map (.npy float32 or 16-bit PNG scaled to the display range), mask and overlay PNGs."""
    src = Path(result["path"])
    stem = result.get("name", src.stem)
    with open_image(src) as im:
        rgb = np.asarray(im.convert("RGB"))
    amap = resize_map(result["map"], rgb.shape[:2])
    vmin, vmax = display_range(calibration, amap)
    row = {k: v for k, v in result.items() if k != "map"}
    if map_format == "npy":
        save_npy(out_dir / "maps" / f"{stem}.npy", amap.astype(np.float32))
    else:
        scaled = np.clip((amap - vmin) / (vmax - vmin), 0, 1) * 65535
        save_image(out_dir / "maps" / f"{stem}.png", Image.fromarray(scaled.astype(np.uint16)))
    mask = None
    if calibration is not None:
        mask = amap > calibration.pixel_threshold
        save_image(out_dir / "masks" / f"{stem}.png", Image.fromarray((mask * 255).astype(np.uint8)))
        row["defect_area_px"] = int(mask.sum())
        row["defect_area_fraction"] = float(mask.mean())
    shown = captioned(overlay(rgb, amap, vmin, vmax, mask=mask), result.get("decision"), float(result["score"]),
                      None if calibration is None else float(calibration.image_threshold))
    save_image(out_dir / "overlays" / f"{stem}.png", Image.fromarray(shown))
    near = row.get("nearest_normal") or {}
    if near.get("available"):  # the box in the input's own pixels
        near["input_box"] = cell_box(tuple(near["input_cell"]), tuple(near["grid"]), (rgb.shape[1], rgb.shape[0]))
        if row.get("decision") == "NOK":
            pair = side_by_side(src, near)
            if pair is not None:
                save_image(out_dir / "explanations" / f"{stem}.png", Image.fromarray(pair))
                row["explanation"] = f"explanations/{stem}.png"
    return row


PROGRESS_DIR = "progress"
_PROGRESS_FORMAT = "nferd-predict-progress"


def _model_key(predictor: BasePredictor) -> str:
    """Digest of what the results depend on: backend, calibration, input size, and every weight
    (torch backend) or the model file's identity (a backend with a ``path``, e.g. ONNX)."""
    h = hashlib.sha256(json.dumps([type(predictor).__name__, calibration_dict(predictor.calibration), predictor.size],
                                  sort_keys=True, default=str).encode())
    src = getattr(predictor, "path", None)
    if src is not None and Path(src).is_file():
        st = Path(src).stat()
        h.update(f"{Path(src).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    model = getattr(predictor, "model", None)
    if isinstance(model, torch.nn.Module):
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_progress(folder: Path) -> dict[str, dict[str, Any]]:
    """Finished rows of every rank's JSONL file, by path (a killed writer may leave a partial last line)."""
    rows: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "path" in row:
                rows.setdefault(row["path"], row)
    return rows


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def predict_to_folder(predictor: BasePredictor, inputs: Iterable[str], out_dir: str | Path, batch_size: int = 16,
                      map_format: str = "npy", progress: bool = True, resume: bool = True) -> list[dict[str, Any]]:
    """Run ``predictor`` over inputs and write per-image files plus ``summary.csv`` / ``summary.json``.

    Progress: each finished image's summary row goes to ``OUT/progress/rank-R.jsonl`` as soon as
    its files are written. If the run stops early, running it again (same model, inputs and
    map format; ``resume=True``, the default) scores only the images that are not in those
    files; ``resume=False`` discards them and starts over. The folder is removed once the
    summary is written, so a finished run run again scores everything again.

    Under torchrun (WORLD_SIZE > 1) the batches (``batch_size`` consecutive files of the
    expanded input list, the same batches a single process uses, so the scores are the same)
    that still have unfinished images are split into contiguous shares, one per rank; rank 0
    merges the rows into one summary in input order.
    """
    inputs = list(inputs)
    paths = expand_inputs(inputs)
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(repr, inputs))}: give image files, folders or glob "
                         "patterns (PNG, JPEG, BMP, TIFF, WebP)")
    names = output_names(paths)
    out = Path(out_dir)
    ddp.init(backend="gloo", timeout=timedelta(hours=24))  # torchrun only; barriers wait for the slowest rank
    rank, world = ddp.rank(), ddp.world()
    prog = out / PROGRESS_DIR
    manifest = {"format": _PROGRESS_FORMAT, "model": _model_key(predictor), "map_format": map_format,
                "inputs": hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()}
    old = _read_manifest(prog)
    if resume and old is not None and old != manifest:
        raise OptionError(f"'{out}' holds an interrupted prediction run with another model, input list or map "
                          f"format ({prog}): pass {option('fresh', 'resume=False')} to discard it, or choose another "
                          f"{option('out_dir')}")
    ddp.barrier()  # every rank has read the old manifest before rank 0 replaces it
    if ddp.is_main():
        if not resume or old is None:
            shutil.rmtree(prog, ignore_errors=True)
        make_dir(prog)
        write_json(prog / "manifest.json", manifest)
    ddp.barrier()
    for sub in ("maps", "masks", "overlays", "explanations"):
        make_dir(out / sub)
    make_dir(prog)
    if ddp.is_main():  # temporary files of a run killed between a write and its rename
        for folder in (out, out / "maps", out / "masks", out / "overlays", out / "explanations"):
            remove_own_temps(folder)
    done = _read_progress(prog)
    ddp.barrier()  # every rank has the same `done` before any rank appends
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    todo = [b for b in batches if any(str(p) not in done for p in b)]
    mine = ddp.shard(todo, rank, world)
    if progress and ddp.is_main() and done:
        print(f"continuing an interrupted run in {out}: {len(done)} of {len(paths)} images already done "
              "(a fresh run starts over)")
    bar = None
    if progress and ddp.is_main():
        from tqdm import tqdm
        bar = tqdm(total=sum(str(p) not in done for b in mine for p in b), desc="predict", unit="img")
    log_path = prog / f"rank-{rank}.jsonl"
    if log_path.is_file() and log_path.stat().st_size and not log_path.read_bytes().endswith(b"\n"):
        with open_append(log_path) as f:  # a killed writer left half a line: do not glue the next row to it
            f.write("\n")
    with open_append(log_path) as log:
        for batch in mine:  # whole batches: an image is scored in the same batch as in any other run
            for res in predictor.predict_paths(batch, batch_size):
                if res["path"] in done:
                    continue
                if "error" in res:
                    row = res
                else:
                    res["name"] = names[Path(res["path"])]
                    try:
                        row = save_outputs(res, out, predictor.calibration, map_format)
                    except OSError as e:
                        row = {"path": res["path"], "error": f"could not write outputs: {e}"}
                log.write(jsonio.dumps(row) + "\n")
                log.flush()
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    ddp.barrier()  # every rank has finished its share
    finished = _read_progress(prog)
    missing = [str(p) for p in paths if str(p) not in finished]
    if missing:
        raise OptionError(f"{len(missing)} image(s) have no result in {prog} (first: {missing[0]}): with several "
                          f"nodes, {option('out_dir')} must be on a file system they all share")
    rows = [finished[str(p)] for p in paths]
    ddp.barrier()  # every rank has read the rows before rank 0 removes them
    if ddp.is_main():
        write_json(out / "summary.json", rows)
        cols = ["path", "score", "normalized_score", "decision", "defect_area_px", "defect_area_fraction", "error"]
        write_dict_csv(out / "summary.csv", cols, rows)  # text cells that start like a formula are neutralised
        shutil.rmtree(prog, ignore_errors=True)
    return rows
