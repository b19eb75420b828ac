"""Training: loss goes down, the teacher never moves, resume is exact, checkpoints round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nferd.data.datasets import MVTecDataset
from nferd.engine.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from nferd.engine.evaluate import infer
from nferd.engine.train import LAST, TrainConfig, Trainer, train
from nferd.models.nferd import NFERD, ModelConfig


def summary_images(model) -> int:  # type: ignore[no-untyped-def]
    """Training images behind a filled memory."""
    return int(model.memory.source.max()) + 1


def small_config(**kw) -> ModelConfig:
    return ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2, **kw)


def test_loss_goes_down_and_teacher_stays_frozen(synth_root, tmp_path) -> None:
    ds = MVTecDataset(synth_root, "synthetic_tiles", "train", 64)
    torch.manual_seed(0)
    model = NFERD(small_config())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer = Trainer(model, ds, TrainConfig(epochs=12, batch_size=4, precision="fp32", holdout=0), tmp_path,
                      progress=False)
    trainer.fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 12  # 12 epochs x 3 steps = 36 optimiser steps
    assert losses[-1] < 0.7 * losses[0]
    assert not model.teacher.training
    for k, v in model.teacher.state_dict().items():  # BN running stats included
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.teacher.parameters())
    # the memory was filled from the training images: every position of each, the held-out ones excepted
    assert model.memory.size == summary_images(model) * 8 * 8 and model.memory.source.min() >= 0


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(synth_root, tmp_path, schedule: str) -> None:
    ds = MVTecDataset(synth_root, "synthetic_tiles", "train", 64)
    cfg = TrainConfig(epochs=4, batch_size=4, precision="fp32", holdout=0.2, checkpoint_every=1,
                      lr_schedule=schedule)
    full, _ = train(ds, small_config(), cfg, tmp_path / "full", progress=False)

    torch.manual_seed(123)  # a different global RNG state must not matter
    trainer_out = tmp_path / "resumed"
    model = None
    # first run, "killed" after 2 epochs (last.safetensors written at epoch 2)
    torch.manual_seed(cfg.seed)
    from torch.utils.data import Subset

    from nferd.engine.train import split_holdout
    keep, held = split_holdout(len(ds), cfg.holdout, cfg.seed)
    model = NFERD(small_config())
    Trainer(model, Subset(ds, keep), cfg, trainer_out, Subset(ds, held), progress=False).fit(stop_after=2)
    assert read_metadata(trainer_out / LAST)["epoch"] == 2
    with pytest.raises(FileExistsError, match="`resume`"):
        train(ds, small_config(), cfg, trainer_out, progress=False)
    resumed, summary = train(ds, small_config(), cfg, trainer_out, resume=True, progress=False)
    assert summary["epochs_run"] == 2
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = (trainer_out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3, 4]


def test_cosine_schedule_sets_each_epochs_lr(synth_root, tmp_path) -> None:
    cfg = TrainConfig(epochs=4, lr=0.004, lr_schedule="cosine", batch_size=4, precision="fp32", holdout=0)
    assert [cfg.lr_at(e) for e in range(4)] == pytest.approx([0.004, 0.003414, 0.002, 0.000586], abs=1e-6)
    assert TrainConfig(lr=0.004).lr_at(3) == 0.004  # RD4AD's constant lr stays the default
    ds = MVTecDataset(synth_root, "synthetic_tiles", "train", 64)
    trainer = Trainer(NFERD(small_config()), ds, cfg, tmp_path, progress=False)
    trainer.prepare()
    for epoch in range(3):
        trainer.train_epoch(epoch)
        assert trainer.optimizer.param_groups[0]["lr"] == cfg.lr_at(epoch)
    with pytest.raises(ValueError, match="lr schedule 'step'"):
        TrainConfig(lr_schedule="step")


def test_checkpoint_round_trip_gives_identical_maps(synth_root, tmp_path) -> None:
    ds = MVTecDataset(synth_root, "synthetic_tiles", "test", 64)
    torch.manual_seed(0)
    model = NFERD(small_config())
    with torch.no_grad():
        model.fill_banks(model.teacher(torch.rand(4, 3, 64, 64)), torch.arange(4))
    for single_file in (False, True):
        path = tmp_path / ("one.safetensors" if single_file else "folder")
        save_checkpoint(path, model, {"calibration": {"image_threshold": 1.0, "pixel_threshold": 0.5,
                                                      "score_min": 0.0}})
        loaded, meta = load_checkpoint(path)
        assert meta["calibration"]["image_threshold"] == 1.0
        a = infer(model, ds, precision="fp32")["maps"]
        b = infer(loaded, ds, precision="fp32")["maps"]
        assert (a == b).all()
    assert json.loads((tmp_path / "folder" / "config.json").read_text())["model"]["n_bank"] == 4
    assert "teacher.encoder._conv_stem.weight" in load_file(str(tmp_path / "folder" / "model.safetensors"))


def test_checkpoint_errors_are_clear(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an nferd checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
    model = NFERD(small_config())
    save_checkpoint(tmp_path / "ck", model)
    meta_path = tmp_path / "ck" / "model.safetensors"
    # a checkpoint whose config describes another memory than the one it holds
    from safetensors import safe_open
    with safe_open(str(meta_path), framework="pt") as f:
        meta = json.loads(f.metadata()["nferd"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["model"]["memory_stages"] = [2, 3]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"nferd": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "bad.safetensors")
    meta["version"] = 99
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata={"nferd": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="upgrade nferd"):
        load_checkpoint(tmp_path / "new.safetensors")
