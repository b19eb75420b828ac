"""torchrun on the CPU (gloo, 2 processes): DDP training matches one process with the same global
batch, only rank 0 writes, a run resumes with another number of processes, ``--category all`` is
spread over the processes, and sharded, restartable prediction gives the single-process results.

Tolerances. Differences are expected from the order of float additions: DDP all-reduces two
half-batch gradients, and synchronised BatchNorm adds two partial sums. Training magnifies
them: Adam moves every weight by about +-lr in its first steps whatever the size of the
gradient, so rounding noise in near-zero gradients flips signs. Measured on this setup
(patch recall, 9 images, batch 4, 2 epochs, fp32), weight update difference / update size, and
the largest relative difference of the epoch losses:

    lr      DDP --sync-bn vs 1 process      1 process, 2 threads vs 1    DDP without --sync-bn
    0.005   6.4e-2, losses 1.4e-4           2.2e-1, losses 5.9e-4        1.3, losses 1.3e-3
    1e-5    1.1e-4, losses 1.7e-8           1.2e-1, losses 2.9e-5        1.0, losses 9.1e-4

So the comparisons run at lr 1e-5, fp32, one thread per process (the reference pins
threads=1; torchrun's processes take cores / processes = 1) and assert 1e-3 for the weight
updates and 1e-6 for losses and BatchNorm running statistics (measured 1.7e-9). Without
--sync-bn each process normalises its half batch with its own statistics: a different, not a
wrong, computation, checked only for losses within 1e-2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nferd.data.datasets import MVTecDataset
from nferd.engine import distributed as ddp
from nferd.engine.checkpoint import read_metadata
from nferd.engine.train import TrainConfig, train
from nferd.models.nferd import NFERD, ModelConfig

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

CAT = "synthetic_tiles"
LR = 1e-5
# 12 training images, holdout 0.25 -> 9 trained, 3 calibrate; batch 4 -> 4 + 4 + 1: the last
# batch (one image, fewer than the processes) exercises the replicated-batch path.
TRAIN_ARGS = ["--teacher", "efficientnet_lite0", "--image-size", "64", "--n-bank", "4", "--top-k", "2",
              "--batch-size", "4", "--precision", "fp32", "--holdout", "0.25", "--checkpoint-every", "1",
              "--lr", str(LR), "--category", CAT]


def small_config() -> ModelConfig:
    return ModelConfig(teacher="efficientnet_lite0", image_size=64, n_bank=4, top_k=2)


def run_nferd(args: list[str], cwd: Path, nproc: int = 1, ok: tuple[int, ...] = (0,)) -> str:
    """``python -m nferd ARGS``, or under torchrun with ``nproc`` CPU processes; returns stdout + stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "nferd", *args]
    if nproc > 1:  # --standalone: a local rendezvous on a free port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "nferd", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode in ok, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


def reference_train(synth_root: Path, out: Path, epochs: int, resume: bool = False) -> NFERD:
    """One process, one thread, the same options as TRAIN_ARGS."""
    ds = MVTecDataset(synth_root, CAT, "train", 64)
    cfg = TrainConfig(epochs=epochs, batch_size=4, lr=LR, precision="fp32", holdout=0.25, checkpoint_every=1,
                      threads=1, device="cpu")
    model, _ = train(ds, small_config(), cfg, out, resume=resume, progress=False)
    return model


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]


def assert_same_training(a: Path, b: Path) -> None:
    """Checkpoints a and b: weight updates (from the seeded initial weights) and running statistics agree."""
    torch.manual_seed(0)
    init = NFERD(small_config(), teacher_weights="random").state_dict()
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    params = [k for k in wa if not k.startswith(("teacher.", "banks.", "memory.")) and "running" not in k
              and "num_batches" not in k]
    diff = sum(float((wa[k] - wb[k]).double().norm() ** 2) for k in params) ** 0.5
    step = sum(float((wa[k] - init[k]).double().norm() ** 2) for k in params) ** 0.5
    assert step > 0
    assert diff / step < 1e-3, f"weight updates differ by {diff / step:.2e} of their size"
    stats = [k for k in wa if "running" in k]
    sdiff = sum(float((wa[k] - wb[k]).double().norm() ** 2) for k in stats) ** 0.5
    snorm = sum(float(wa[k].double().norm() ** 2) for k in stats) ** 0.5
    assert sdiff / snorm < 1e-6, f"BatchNorm running statistics differ by {sdiff / snorm:.2e}"
    for k in wa:
        if k.startswith("teacher.") or k.startswith("banks.") and not k.endswith("proj.weight"):
            assert torch.equal(wa[k], wb[k]), k  # frozen teacher; banks filled from identical features
        if k.startswith("memory."):  # the memory holds the teacher's features of the same training images
            assert wa[k].shape == wb[k].shape and wa[k].shape[0] > 0, k
            assert torch.allclose(wa[k].double(), wb[k].double(), rtol=1e-4, atol=1e-5), k


@pytest.fixture(scope="module")
def reference(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    reference_train(synth_root, out, epochs=2)
    return out


def test_shard_and_batch_part() -> None:
    for n in range(12):
        for world in range(1, 5):
            parts = [ddp.shard(list(range(n)), r, world) for r in range(world)]
            assert [i for part in parts for i in part] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="outside"):
        ddp.shard([1, 2], 2, 2)
    with pytest.raises(ValueError, match="divisible"):
        ddp.check_batch_size(6, 4)
    # DDP averages the ranks' gradients: the weighted mean of the parts' mean losses must be
    # the mean over the whole batch, for even, uneven and replicated (m < world) batches
    g = torch.Generator().manual_seed(0)
    for m in range(1, 10):
        for world in range(1, 5):
            per_sample = torch.rand(m, generator=g, dtype=torch.float64)
            batch = torch.arange(m)
            total = 0.0
            for r in range(world):
                part, weight, replicated = ddp.batch_part(batch, r, world)
                assert replicated == (m < world)
                total += weight * float(per_sample[part].mean())
            assert total / world == pytest.approx(float(per_sample.mean()), rel=1e-12)


def test_two_processes_train_like_one(synth_root: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    stdout = run_nferd(["train", "--data", str(synth_root), *TRAIN_ARGS, "--epochs", "2", "--sync-bn",
                        "--out", str(out)], tmp_path, nproc=2)
    assert stdout.count("final loss") == 1 and "2 processes" in stdout  # rank 0 reports, once
    # only rank 0 wrote, and only what a single-process `nferd train` writes
    expected = {"config.json", "last.safetensors", "model.safetensors", "train_log.jsonl", "train_summary.json"}
    assert {p.name for p in out.iterdir()} == expected
    assert [json.loads(line)["epoch"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert losses(out) == pytest.approx(losses(reference), rel=1e-6)
    assert_same_training(out, reference)
    meta, ref_meta = read_metadata(out), read_metadata(reference)
    assert meta["model"] == ref_meta["model"]
    assert meta["train"] == ref_meta["train"] | {"threads": None, "device": "auto"}  # the reference pins them
    assert meta["calibration"]["image_threshold"] == pytest.approx(ref_meta["calibration"]["image_threshold"],
                                                                   rel=1e-4)


def test_resume_with_another_number_of_processes(synth_root: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    run_nferd(["train", "--data", str(synth_root), *TRAIN_ARGS, "--epochs", "1", "--sync-bn", "--out", str(out)],
              tmp_path, nproc=2)
    assert read_metadata(out / "last.safetensors")["epoch"] == 1
    reference_train(synth_root, out, epochs=2, resume=True)  # one process continues the two-process run
    assert [json.loads(line)["epoch"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert losses(out) == pytest.approx(losses(reference), rel=1e-6)
    assert_same_training(out, reference)


def test_without_sync_bn_each_process_normalises_its_half_batch(synth_root: Path, reference: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "ddp-local-bn"
    run_nferd(["train", "--data", str(synth_root), *TRAIN_ARGS, "--epochs", "2", "--out", str(out)],
              tmp_path, nproc=2)
    assert losses(out) == pytest.approx(losses(reference), rel=1e-2)
    assert read_metadata(out)["calibration"] is not None


def test_category_all_trains_whole_categories_one_per_process(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "two"
    root.mkdir()
    for name in ("a", "b"):  # two categories with the same images
        os.symlink(synth_root / CAT, root / name, target_is_directory=True)
    args = [a for a in TRAIN_ARGS if a not in ("--category", CAT)]
    stdout = run_nferd(["train", "--data", str(root), *args, "--category", "all", "--epochs", "1",
                        "--out", str(tmp_path / "out")], tmp_path, nproc=2)
    assert "[rank 0] categories: a" in stdout and "[rank 1] categories: b" in stdout
    assert ", 2 processes" not in stdout  # no DDP: single-process models
    wa = load_file(str(tmp_path / "out" / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "out" / "b" / "model.safetensors"))
    for k in wa:  # same images, same seed, one thread each: the same model
        assert torch.equal(wa[k], wb[k]), k
    assert read_metadata(tmp_path / "out" / "b")["data"]["category"] == "b"


CACHE_SCRIPT = f"""
import sys, torch
from safetensors.torch import save_file
from nferd.engine import distributed as ddp
from nferd.data.datasets import MVTecDataset
from nferd.models.teacher import build_teacher
torch.set_num_threads(1)
ddp.init(torch.device("cpu"))
cache = ddp.build_feature_cache(build_teacher("efficientnet_lite0"), MVTecDataset(sys.argv[1], "{CAT}", "train", 64),
                                torch.device("cpu"), batch_size=4)
save_file({{f"stage{{i}}": s for i, s in enumerate(cache.stages)}}, f"{{sys.argv[2]}}/rank{{ddp.rank()}}.safetensors")
"""


def test_feature_cache_is_computed_in_blocks_and_shared(synth_root: Path, tmp_path: Path) -> None:
    from nferd.engine.features import FeatureCache
    from nferd.models.teacher import build_teacher
    script = tmp_path / "cache.py"
    script.write_text(CACHE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # 12 images in blocks of 4: rank 0 runs the teacher on images 0-7, rank 1 on 8-11
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(synth_root), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    torch.set_num_threads(1)
    single = FeatureCache.build(build_teacher("efficientnet_lite0"), MVTecDataset(synth_root, CAT, "train", 64),
                                torch.device("cpu"), batch_size=4)
    for r in range(2):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        for i, s in enumerate(single.stages):  # every rank holds all 12 images' maps, as one process computes them
            assert torch.equal(got[f"stage{i}"], s), (r, i)


# ------------------------------------------------------------------------------------ prediction
# `nferd predict` exits 3 when some files could not be read (the broken one here); torchrun
# reports a worker's non-zero exit as its own failure (exit 1, naming the worker's exit code).
TORCHRUN_SOME_FAILED = 1


def assert_rank0_exit_3(output: str) -> None:
    assert "exitcode: 3" in output and "local_rank: 0" in output, output[-3000:]

@pytest.fixture(scope="module")
def pred_inputs(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """22 files: 9 test images, 12 training images and one that is not an image."""
    bad = tmp_path_factory.mktemp("inputs") / "broken.png"
    bad.write_bytes(b"not an image")
    return [str(synth_root / CAT / "test" / "*" / "*.png"), str(synth_root / CAT / "train" / "good"), str(bad)]


def output_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single_prediction(pred_inputs: list[str], reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pred")
    out = tmp / "single"
    run_nferd(["predict", "--checkpoint", str(reference), *pred_inputs, "--out", str(out), "--batch-size", "4"],
              tmp, ok=(3,))  # 3: the broken file is reported
    return out


def test_sharded_prediction_gives_the_single_process_results(pred_inputs: list[str], reference: Path,
                                                             single_prediction: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    stdout = run_nferd(["predict", "--checkpoint", str(reference), *pred_inputs, "--out", str(out),
                        "--batch-size", "4"], tmp_path, nproc=2, ok=(TORCHRUN_SOME_FAILED,))
    assert stdout.count("images scored") == 1
    assert_rank0_exit_3(stdout)
    ref = output_files(single_prediction)
    got = output_files(out)
    assert "progress/manifest.json" not in got  # removed once the summary is written
    summary = json.loads(got["summary.json"])
    assert len(summary) == 22 and summary[-1]["path"].endswith("broken.png") and "error" in summary[-1]
    assert got.keys() == ref.keys()
    for name in ref:  # summary rows, maps, masks and overlays: byte for byte
        assert got[name] == ref[name], name


def _crashing(predictor, after: int):  # type: ignore[no-untyped-def]
    """Make ``predictor`` die after ``after`` images (a killed run), mid-way through a batch."""
    original = predictor.predict_paths

    def predict_paths(paths, batch_size=16):  # type: ignore[no-untyped-def]
        for res in original(paths, batch_size):
            if predict_paths.left == 0:
                raise KeyboardInterrupt
            predict_paths.left -= 1
            yield res
    predict_paths.left = after
    predictor.predict_paths = predict_paths
    return predictor


def test_killed_prediction_is_finished_by_two_processes(pred_inputs: list[str], reference: Path,
                                                        single_prediction: Path, tmp_path: Path) -> None:
    from nferd.deploy.predict import Predictor, predict_to_folder
    torch.set_num_threads(1)  # as the processes that finish the run
    out = tmp_path / "restarted"
    inputs = pred_inputs
    with pytest.raises(KeyboardInterrupt):
        predict_to_folder(_crashing(Predictor.from_checkpoint(reference), 5), inputs, out, batch_size=4,
                          progress=False)
    assert not (out / "summary.json").exists()
    rows = [json.loads(line) for line in (out / "progress" / "rank-0.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    with (out / "progress" / "rank-0.jsonl").open("a") as f:
        f.write('{"path": "killed while writ')  # the kill came mid-line
    before = {p: p.stat().st_mtime_ns for p in (out / "overlays").iterdir()}
    assert len(before) == 5
    stdout = run_nferd(["predict", "--checkpoint", str(reference), *inputs, "--out", str(out), "--batch-size", "4"],
                       tmp_path, nproc=2, ok=(TORCHRUN_SOME_FAILED,))
    assert "5 of 22 images already done" in stdout
    assert_rank0_exit_3(stdout)
    for p, t in before.items():  # finished images were not redone
        assert p.stat().st_mtime_ns == t, p
    ref, got = output_files(single_prediction), output_files(out)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name] == ref[name], name


def test_restart_in_one_process_scores_only_the_missing_images(synth_root: Path, reference: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import nferd.deploy.predict as predict_module
    from nferd.deploy.predict import Predictor, predict_to_folder
    inputs = [str(synth_root / CAT / "test" / "*" / "*.png")]  # 9 images
    out = tmp_path / "p"
    predictor = Predictor.from_checkpoint(reference)
    full = predict_to_folder(predictor, inputs, tmp_path / "full", batch_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        predict_to_folder(_crashing(Predictor.from_checkpoint(reference), 6), inputs, out, batch_size=4,
                          progress=False)
    written: list[str] = []
    save = predict_module.save_outputs
    monkeypatch.setattr(predict_module, "save_outputs", lambda res, *a, **k: written.append(res["path"]) or
                        save(res, *a, **k))
    with pytest.raises(ValueError, match="resume=False"):  # another map format: not the same run
        predict_to_folder(predictor, inputs, out, batch_size=4, map_format="png16", progress=False)
    rows = predict_to_folder(predictor, inputs, out, batch_size=4, progress=False)
    assert len(written) == 3 and rows == full
    assert not (out / "progress").exists()
    written.clear()
    predict_to_folder(predictor, inputs, out, batch_size=4, progress=False)  # a finished run starts over
    assert len(written) == 9
    shutil.rmtree(out)
    with pytest.raises(KeyboardInterrupt):
        predict_to_folder(_crashing(Predictor.from_checkpoint(reference), 2), inputs, out, batch_size=4,
                          progress=False)
    written.clear()
    assert predict_to_folder(predictor, inputs, out, batch_size=4, progress=False, resume=False) == full
    assert len(written) == 9  # resume=False (--fresh): everything again
