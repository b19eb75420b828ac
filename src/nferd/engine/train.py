"""Training: the RD4AD recipe with cached teacher features, bf16 autocast and resumable checkpoints.

Defaults follow RD4AD's code (Adam, lr 0.005, betas (0.5, 0.999), batch 16, 200 epochs, no
augmentation, no schedule). The teacher is frozen and sees no augmentation, so its features
are computed once (``features.FeatureCache``). Every epoch's sample order comes from a generator
seeded with (seed, epoch), so a run resumed from ``last.safetensors`` ends with the same
weights as an uninterrupted one. No model selection on the test split: the last epoch is the model.

Under ``torchrun`` with WORLD_SIZE > 1 the same run is spread over the processes
(``distributed.py``): each epoch's seeded order is split so that the global batch is the
single-process batch, DistributedDataParallel all-reduces the gradients, and only rank 0
writes logs and checkpoints (which do not depend on the number of processes).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..data.datasets import readable, sample_path
from ..data.images import ImageLoadError
from ..data.tiles import TiledDataset
from ..errors import NferdError, OptionError, option
from ..models.loss import distillation_loss
from ..models.nferd import NFERD, ModelConfig
from . import distributed as ddp
from . import jsonio
from .calibration import Calibration, calibrate, calibration_dict
from .checkpoint import (
    load_checkpoint,
    load_optimizer_state,
    read_metadata,
    save_checkpoint,
    weights_file,
)
from .device import autocast, autocast_dtype, compile_dense, place, release_free_memory
from .features import FeatureCache
from .run_folder import finished_run, logged_loss, truncate_log
from .safe_io import open_append, remove_stale_temps
from .splits import bank_indices, held_out_normals, split_holdout, training_split
from .train_config import CROSS_FIT_MAX_TRAIN, LAST, LOG, RUN_FILES, TrainConfig, make_adam

__all__ = ["LAST", "LOG", "RUN_FILES", "TrainConfig", "Trainer", "bank_indices", "finished_run", "held_out_normals",
           "make_adam", "split_holdout", "train", "training_split", "truncate_log"]



class RunExistsError(NferdError, FileExistsError):
    """The output folder holds a run already: resuming it, or another folder, is the user's choice."""


class TrainingDiverged(NferdError, FloatingPointError):
    """The loss became NaN or infinite: the options (learning rate, precision) do not train."""


class Trainer:
    """Holds the model, optimizer, feature cache and log of one training run.

    ``distributed``: None = when launched by torchrun with WORLD_SIZE > 1. ``sync_bn``
    (distributed only): BatchNorm statistics over the global batch instead of each rank's part.
    """

    def __init__(self, model: NFERD, train_set: Dataset, config: TrainConfig, out_dir: str | Path,
                 calibration_set: Dataset | None = None, extra_meta: dict[str, Any] | None = None,
                 progress: bool = True, distributed: bool | None = None, sync_bn: bool = False,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.model, self.train_set, self.config = model, train_set, config
        self.out = Path(out_dir)
        self.calibration_set = calibration_set
        self.extra_meta = extra_meta or {}
        self.progress = progress
        self.on_epoch = on_epoch  # each epoch's log record, on the process that writes the logs
        self.device = ddp.local_device(config.device)  # resolve_device; cuda:LOCAL_RANK under torchrun
        self.amp = autocast_dtype(self.device, config.precision)
        # --precision fp32 means fp32 throughout, the cached teacher maps too; otherwise fp16 (half the memory)
        self.cache_dtype = torch.float32 if config.precision == "fp32" else torch.float16
        torch.set_num_threads(config.threads or ddp.local_threads())
        self.distributed = ddp.launched() if distributed is None else distributed
        if self.distributed:
            if not ddp.launched():
                raise ValueError("distributed training needs WORLD_SIZE > 1: start it with torchrun")
            ddp.init(self.device)
            ddp.check_batch_size(config.batch_size, ddp.world())
        self.sync_bn = sync_bn and self.distributed
        if self.sync_bn:  # before the optimizer is built (the layers keep their parameter tensors anyway)
            ddp.convert_sync_batchnorm(self.model, self.device)
        self.main = ddp.is_main() if self.distributed else True  # the one process that writes files
        self.ddp_model: torch.nn.Module | None = None
        place(self.model, self.device)
        if config.compile:
            compile_dense(self.model)
        params = [p for p in model.parameters() if p.requires_grad]
        # a model without a student (the memory alone) has nothing to optimise
        self.optimizer = make_adam(params, config.lr, (config.beta1, config.beta2)) if params else None
        self.start_epoch = 0
        self.prior_seconds = 0.0  # training time spent before a resume
        self.cache: FeatureCache | None = None
        self.student_from: Path | None = None  # a finished run whose student this run took (no epochs to train)

    # ---------------------------------------------------------------- set-up
    def prepare(self) -> None:
        t0 = time.perf_counter()
        if self.distributed:  # each rank runs the teacher on its block; all ranks get the whole cache
            self.cache = ddp.build_feature_cache(self.model.teacher, self.train_set, self.device,
                                                 cache_dir=self.config.feature_cache_dir, progress=self.progress,
                                                 store_dtype=self.cache_dtype)
        else:
            self.cache = FeatureCache.build(self.model.teacher, self.train_set, self.device, dtype=None,
                                            cache_dir=self.config.feature_cache_dir, progress=self.progress,
                                            store_dtype=self.cache_dtype)
        if self.device.type == "cuda":
            self.cache = self.cache.to(self.device)
        if len(self.model.banks):
            idx = bank_indices(len(self.cache), self.model.config.n_bank, self.config.seed)
            self.model.fill_banks([s[idx].float() for s in self.cache.stages], idx, memory=False)
        if self.model.memory is not None:
            self.fill_memory()
        self.feature_seconds = time.perf_counter() - t0

    def fill_memory(self) -> None:
        """Every training position's locally aware feature into the memory (thinned to its size)."""
        n, step = len(self.cache), 64
        grid = self.cache.stages[self.model.config.memory_grid_stage - 1].shape[-2:]
        batches = ((self.cache.get(torch.arange(a, min(a + step, n)), self.device), torch.arange(a, min(a + step, n)))
                   for a in range(0, n, step))
        self.model.fill_memory(batches, n * grid[0] * grid[1], seed=self.config.seed)

    def resume(self) -> bool:
        """Continue from ``out/last.safetensors`` if present; returns True when it did. Temporary files
        that a killed run's atomic writes left behind are removed first."""
        last = self.out / LAST
        if self.main and self.out.is_dir():
            remove_stale_temps(self.out, RUN_FILES)
        if not self.last_exists():
            return False
        meta = read_metadata(last)
        if ModelConfig.from_dict(meta["model"]) != self.model.config:  # from_dict fills options added since
            raise OptionError(f"cannot resume from '{last}': it was trained with another model config "
                              f"({meta['model']}); use another {option('out_dir')} or delete it")
        from safetensors.torch import load_file
        # the memory is filled again from the training images (the same rows): only the weights come back
        tensors = {k: v for k, v in load_file(str(last)).items() if not k.startswith(("optimizer.", "memory."))}
        self.model.load_state_dict(tensors, strict=False)
        load_optimizer_state(last, self.optimizer)
        self.start_epoch = int(meta["epoch"])
        self.prior_seconds = float(meta.get("train_seconds_so_far", 0.0))
        return True

    def last_exists(self) -> bool:
        """``out/last.safetensors`` exists (for every rank: a mixed answer is an error)."""
        exists = (self.out / LAST).is_file()
        if self.distributed:
            anyone, everyone = ddp.agree(exists)
            if anyone != everyone:
                raise OptionError(f"'{self.out / LAST}' is visible to some processes only: put {option('out_dir')} "
                                  "on a file system every node shares to resume a multi-node run")
        return exists

    # -------------------------------------------------------------- training
    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
        return torch.randperm(len(self.cache), generator=g)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch over the seeded order. Under torchrun every global batch is split over the
        ranks (``distributed.batch_part``); a single process is a world of one, whose part is the
        whole batch with weight 1."""
        if self.distributed and self.ddp_model is None:
            self.ddp_model = ddp.wrap_ddp(self.model, self.device)
        model = self.ddp_model if self.distributed else self.model
        model.train()
        rank, world = ddp.rank(), ddp.world()
        where = f" (rank {rank})" if self.distributed else ""
        order = self.epoch_order(epoch)  # the same permutation on every rank
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(epoch)
        bs = self.config.batch_size
        total, n, t0 = 0.0, 0, time.perf_counter()
        for b in range(0, len(order), bs):
            idx, weight, replicated = ddp.batch_part(order[b:b + bs], rank, world)
            feats = self.cache.get(idx, self.device)
            with autocast(self.device, self.amp), ddp.local_batchnorm(self.model, replicated and self.sync_bn):
                t, s = model(None, exclude_ids=idx.to(self.device), teacher_feats=feats)
            loss = distillation_loss(t, s, self.model.config.loss)
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1}{where}: lower "
                                       f"{option('lr')} or use {option('precision')} fp32")
            self.optimizer.zero_grad(set_to_none=True)
            (loss * weight if weight != 1.0 else loss).backward()
            self.optimizer.step()
            if self.device.type == "cpu":
                release_free_memory()
            if not replicated or rank == 0:  # a replicated batch is counted once
                total += loss.item() * len(idx)
                n += len(idx)
        total, n = ddp.all_reduce_sum([total, n])
        dt = time.perf_counter() - t0
        return {"epoch": epoch + 1, "loss": total / n, "seconds": dt, "images_per_s": n / dt}

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``config.epochs`` (or stop early after ``stop_after`` epochs, for tests)."""
        if self.cache is None:
            self.prepare()
        log, bar = None, None
        if self.main:  # rank 0 alone writes files (every process in a single-process run)
            self.out.mkdir(parents=True, exist_ok=True)
            truncate_log(self.out / LOG, self.start_epoch)  # epochs a killed run logged after its checkpoint
            log = open_append(self.out / LOG)
        if self.progress and self.main:
            from tqdm import tqdm
            bar = tqdm(total=self.config.epochs, initial=self.start_epoch, desc="train", unit="epoch")
        t_start = time.perf_counter()
        history = []
        trains = self.optimizer is not None and self.student_from is None
        epochs = self.config.epochs if trains else self.start_epoch  # nothing to train
        for epoch in range(self.start_epoch, epochs):
            rec = self.train_epoch(epoch)
            history.append(rec)
            if log is not None:
                log.write(jsonio.dumps(rec) + "\n")
                log.flush()
            if self.on_epoch is not None and self.main:
                self.on_epoch(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}")
                bar.update(1)
            done = epoch + 1
            if done % self.config.checkpoint_every == 0 or done == self.config.epochs:
                if self.distributed and not self.sync_bn:
                    ddp.average_bn_stats(self.model)  # collective: every rank, before rank 0 saves
                if self.main:
                    meta = self._meta(done)
                    meta["train_seconds_so_far"] = self.prior_seconds + time.perf_counter() - t_start
                    save_checkpoint(self.out / LAST, self.model, meta, optimizer=self.optimizer)
            if stop_after is not None and done - self.start_epoch >= stop_after:
                break
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        summary = {"epochs_run": len(history), "train_seconds": time.perf_counter() - t_start,
                   "feature_seconds": self.feature_seconds,
                   "final_loss": history[-1]["loss"] if history else logged_loss(self.out / LOG)}
        # the last epoch is done (also when a run was killed after its last checkpoint, before the model)
        if (self.start_epoch + len(history) == self.config.epochs or not trains) and self.main:
            cal = self.calibrate()
            summary["calibration"] = calibration_dict(cal)  # the summary is written as JSON
            meta = self._meta(self.config.epochs, cal)
            meta["train_seconds"] = summary["train_seconds"] + self.prior_seconds
            save_checkpoint(self.out, self.model, meta)
        if self.distributed:  # every rank waits for rank 0's calibration and model, then all leave together
            ddp.barrier()
        return summary

    def cross_fits(self) -> bool:
        """Whether the training images are scored by cross-fitting too: fewer than ``CROSS_FIT_BELOW``
        good images held out, at most ``CROSS_FIT_MAX_TRAIN`` training images (so the extra students
        are cheap), whole images (no tiling) and a single process."""
        from .crossfit import CROSS_FIT_BELOW, FOLDS
        held = len(self.calibration_set) if self.calibration_set is not None else 0
        return (self.config.cross_fit and held < CROSS_FIT_BELOW
                and 2 * FOLDS <= len(self.train_set) <= CROSS_FIT_MAX_TRAIN
                and self.config.tiling is None and not self.distributed)

    def calibrate(self) -> Calibration | None:
        from .calibration import fit_calibration
        from .crossfit import FOLDS, left_out_results, merge_results, train_folds
        from .evaluate import infer
        folds = []
        few = self.cross_fits()
        if few and self.model.ocbe is not None:
            folds = train_folds(self.model, self.train_set, self.config, self.out, Trainer, take_from=self.student_from)
        if hasattr(self.model, "map_norm"):
            self.fit_map_norm(folds)
            for fm, _ in folds:
                fm.map_norm.copy_(self.model.map_norm)
        if not few:
            if self.calibration_set is None or len(self.calibration_set) < 2:
                return None
            return calibrate(self.model, self.calibration_set, self.config.false_alarm_rate, self.device,
                             self.config.precision, tiling=self.config.tiling)
        kw = {"device": self.device, "precision": self.config.precision}
        parts = [infer(self.model, self.calibration_set, **kw)] if self.calibration_set is not None else []
        if folds:
            parts += [infer(fm, Subset(self.train_set, fold), **kw) for fm, fold in folds]
            how = f"{FOLDS}-fold cross-fitted training images"
        else:  # no student: the memory scores each training image without its own rows
            parts.append(left_out_results(self.model, self.train_set, self.device, self.config.precision))
            how = "training images scored with their own memory rows left out"
        cal = fit_calibration(merge_results(parts), self.calibration_set, self.config.false_alarm_rate)
        held = (getattr(self.calibration_set, "calibration_source", "holdout")
                if self.calibration_set is not None else None)
        return dataclasses.replace(cal, source=f"{held} and {how}" if held else how)

    def fit_map_norm(self, folds: list[tuple[NFERD, list[int]]] = ()) -> None:
        """Standardise the map's two terms on held-out normal images, or, without any, on the
        training images that are not in the bank (a bank image would find itself at distance 0).
        A memory's distance is standardised on the training images too, each scored with its own
        memory rows left out (an unseen image's distance): more good images than the hold-out."""
        from .evaluate import fit_map_norm
        images = self.calibration_set
        if images is not None and self.config.tiling is not None:  # the model's inputs: tiles
            images = TiledDataset(images, self.config.tiling)
        if self.model.memory is not None:
            fit_map_norm(self.model, images if images is not None and len(images) >= 2 else None,
                         device=self.device, precision=self.config.precision, left_out=self.train_set,
                         folds=[(fm, Subset(self.train_set, fold)) for fm, fold in folds])
            return
        if images is None or len(images) < 2:
            in_bank = set(next(iter(self.model.banks.values())).ids.tolist())
            images = Subset(self.train_set, [i for i in range(len(self.train_set)) if i not in in_bank])
        if len(images) < 2:
            raise OptionError("the bank distance in the map needs normal images outside the bank to standardise it: "
                              f"hold some out ({option('holdout')}) or lower {option('n_bank')}")
        fit_map_norm(self.model, images, device=self.device, precision=self.config.precision)

    def _meta(self, epoch: int, calibration: Calibration | None = None) -> dict[str, Any]:
        tiling = self.config.tiling
        # the image behind each memory id, so a decision can show the normal region it was measured against
        images = [sample_path(self.train_set, i) for i in range(len(self.train_set))] \
            if self.model.memory is not None and tiling is None else None
        return {"epoch": epoch, "train": asdict(self.config), "calibration": calibration_dict(calibration),
                **({"tiling": tiling.to_dict()} if tiling else {}),
                **({"memory_images": images} if images and None not in images else {}),
                **({"student_from": str(self.student_from)} if self.student_from else {}), **self.extra_meta}

    def take_student(self, folder: str | Path) -> float | None:
        """Use the student of the finished run in ``folder`` instead of training one: it must have
        been trained with the same student recipe and training options (and so has the weights this
        run would train). Returns that run's training seconds."""
        meta = finished_run(folder, self.config.epochs)
        if meta is None:
            raise ValueError(f"'{folder}' holds no finished run of {self.config.epochs} epochs to take a student from")
        other = ModelConfig.from_dict(meta["model"])
        if other.student_recipe != self.model.config.student_recipe or not self.model.config.student_recipe:
            raise ValueError(f"the student in '{folder}' was trained for another design ({other.describe()})")
        ignore = {"device", "threads", "checkpoint_every", "feature_cache_dir", "compile", "precision", "cross_fit",
                  "strict_images"}
        mine = {k: v for k, v in asdict(self.config).items() if k not in ignore}
        theirs = {k: v for k, v in meta["train"].items() if k not in ignore}
        if mine != {k: theirs.get(k) for k in mine}:
            raise ValueError(f"the student in '{folder}' was trained with other training options")
        from safetensors.torch import load_file
        tensors = load_file(str(weights_file(folder)))
        own = {k: v for k, v in tensors.items() if k.split(".")[0] in ("ocbe", "decoder")}
        missing = self.model.load_state_dict(own, strict=False).missing_keys
        if any(k.split(".")[0] in ("ocbe", "decoder") for k in missing):
            raise ValueError(f"the student in '{folder}' does not fit this model")
        self.student_from = Path(folder)
        return meta.get("train_seconds")


def train(train_set: Dataset, model_config: ModelConfig, train_config: TrainConfig, out_dir: str | Path,
          teacher_weights: str | None = None, calibration_set: Dataset | None = None, resume: bool = False,
          progress: bool = True, extra_meta: dict[str, Any] | None = None, distributed: bool | None = None,
          sync_bn: bool = False, on_epoch: Callable[[dict[str, Any]], None] | None = None,
          student_from: str | Path | None = None) -> tuple[NFERD, dict[str, Any]]:
    """Python API: train a model on ``train_set`` (normal images) and write its checkpoint to ``out_dir``.

    When ``calibration_set`` is None, ``train_config.holdout`` of the training images are kept
    out for calibration. ``distributed`` / ``sync_bn``: see ``Trainer`` (None = DDP when
    launched by torchrun with more than one process; rank 0 then writes the checkpoint).
    ``on_epoch`` gets each epoch's log record (experiment tracking, see ``engine.tracking``).
    ``student_from``: a finished run folder whose student (same recipe, options and seed) is taken
    instead of trained again; only what scores beside it (bank, memory, standardisation, thresholds)
    is built. ``resume`` on a run that already finished its ``train_config.epochs`` (``out_dir/model.safetensors``
    written) trains nothing and writes nothing: it returns the saved model and a summary with
    ``finished`` True. A finished run asked for more epochs continues from its last checkpoint.
    The summary's ``calibration`` is the JSON object the checkpoint stores (``Calibration.from_dict``
    reads it; ``Predictor`` takes either).
    """
    # nothing to do, and nothing in out_dir changes
    if resume and finished_run(out_dir, train_config.epochs) is not None:
        model, meta = load_checkpoint(out_dir)
        return model, {"finished": True, "epochs_run": 0, "epoch": meta.get("epoch"),
                       "calibration": meta.get("calibration"), "checkpoint": str(weights_file(out_dir))}
    torch.manual_seed(train_config.seed)
    np.random.seed(train_config.seed)
    train_set, calibration_set = training_split(train_set, train_config.holdout, train_config.seed, calibration_set)
    train_set, skipped = readable(train_set, progress)
    if calibration_set is not None:
        calibration_set, more = readable(calibration_set, progress)
        skipped += more
    if skipped:
        listed = "\n  ".join(f"{s['path']}: {s['error']}" for s in skipped[:10])
        more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        if train_config.strict_images:
            raise ImageLoadError(f"{len(skipped)} training image(s) cannot be read:\n  {listed}{more}")
        print(f"warning: skipped {len(skipped)} unreadable training image(s) (listed in train_summary.json):\n  "
              f"{listed}{more}", file=sys.stderr)
    if train_config.tiling is not None:  # whole images held out above; the model learns from their tiles
        if model_config.image_size != train_config.tile:
            raise ValueError(f"with tiles of {train_config.tile} px the model input is a tile: image size "
                             f"{model_config.image_size} must equal the tile size")
        train_set = TiledDataset(train_set, train_config.tiling)
    has_banks = model_config.fusion != "none" or (model_config.distance == "bank"
                                                  and model_config.bank_distance_weight > 0)
    if model_config.bank and has_banks and model_config.n_bank > len(train_set):
        n = len(train_set)
        print(f"note: the banks hold all {n} training images (fewer than n_bank {model_config.n_bank})",
              file=sys.stderr)
        model_config = dataclasses.replace(model_config, n_bank=n, top_k=min(model_config.top_k, n - 1))
    model = NFERD(model_config, teacher_weights=teacher_weights)
    trainer = Trainer(model, train_set, train_config, out_dir, calibration_set, extra_meta, progress,
                      distributed=distributed, sync_bn=sync_bn, on_epoch=on_epoch)
    source_seconds = trainer.take_student(student_from) if student_from is not None else None
    if resume and student_from is None:
        trainer.resume()
    elif trainer.last_exists() and student_from is None:
        raise RunExistsError(f"'{Path(out_dir) / LAST}' exists: pass {option('resume')} to continue that run, "
                             f"or choose another {option('out_dir')}")
    summary = trainer.fit()
    if student_from is not None:
        summary.update(student_from=str(student_from), train_seconds=source_seconds)
    summary["n_train"] = len(train_set)
    summary["skipped_images"] = skipped
    summary["n_calibration"] = len(calibration_set) if calibration_set is not None else 0
    summary["checkpoint"] = str(weights_file(out_dir))
    return model, summary
