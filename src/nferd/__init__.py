"""nferd: Normal Feature-Enhanced Reverse teacher-student Distillation for anomaly detection.

Python API (the same verbs as the ``nferd`` command)::

    from nferd import DataSpec, ModelConfig, TrainConfig, MVTecDataset, train, train_categories, evaluate, Predictor

    train_set = MVTecDataset("/data/mvtec_ad", "bottle", "train")
    model, summary = train(train_set, ModelConfig(teacher="efficientnet_lite0"), TrainConfig(epochs=200),
                           "runs/bottle")
    metrics, _ = evaluate(model, MVTecDataset("/data/mvtec_ad", "bottle", "test"))
    predictor = Predictor.from_checkpoint("runs/bottle")

    # every category of a dataset root, as ``nferd train --category all`` does
    runs = train_categories(DataSpec("/data/mvtec_ad", "all"), ModelConfig(), TrainConfig(), "runs")
"""

from typing import TYPE_CHECKING, Any

from .version import __version__

# Loaded on first use (PEP 562), so the command line starts without torch: `nferd --version`,
# `--help` and option errors answer at once; `import nferd` then `nferd.train` works as before.
_EXPORTS = {
    "FolderDataset": "data.datasets", "MVTecDataset": "data.datasets", "VisADataset": "data.datasets",
    "make_dataset": "data.datasets", "Predictor": "deploy.predict", "predict_to_folder": "deploy.predict",
    "load_checkpoint": "engine.checkpoint", "save_checkpoint": "engine.checkpoint", "evaluate": "engine.evaluate",
    "infer": "engine.evaluate", "TrainConfig": "engine.train", "train": "engine.train", "NFERD": "models.nferd",
    "ModelConfig": "models.nferd", "build_teacher": "models.teacher", "DataSpec": "engine.runs",
    "train_categories": "engine.runs", "Calibration": "engine.calibration", "NferdError": "errors",
}

if TYPE_CHECKING:
    from .data.datasets import FolderDataset, MVTecDataset, VisADataset, make_dataset
    from .deploy.predict import Predictor, predict_to_folder
    from .engine.calibration import Calibration
    from .engine.checkpoint import load_checkpoint, save_checkpoint
    from .engine.evaluate import evaluate, infer
    from .engine.runs import DataSpec, train_categories
    from .engine.train import TrainConfig, train
    from .errors import NferdError
    from .models.nferd import NFERD, ModelConfig
    from .models.teacher import build_teacher


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nferd' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value

__all__ = ["NFERD", "ModelConfig", "TrainConfig", "train", "evaluate", "infer", "Predictor",
           "predict_to_folder", "load_checkpoint", "save_checkpoint", "build_teacher", "MVTecDataset",
           "VisADataset", "FolderDataset", "make_dataset", "DataSpec", "train_categories", "Calibration",
           "NferdError", "__version__"]
