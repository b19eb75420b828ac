"""nferd: Normal Feature-Enhanced Reverse teacher-student Distillation for anomaly detection.

Python API (the same verbs as the ``nferd`` command)::

    from nferd import ModelConfig, TrainConfig, MVTecDataset, train, evaluate, Predictor

    train_set = MVTecDataset("/data/mvtec_ad", "bottle", "train")
    model, summary = train(train_set, ModelConfig(teacher="efficientnet_lite0"), TrainConfig(epochs=200),
                           "runs/bottle")
    metrics, _ = evaluate(model, MVTecDataset("/data/mvtec_ad", "bottle", "test"))
    predictor = Predictor.from_checkpoint("runs/bottle")
"""

from .data.datasets import FolderDataset, MVTecDataset, VisADataset, make_dataset
from .deploy.predict import Predictor, predict_to_folder
from .engine.checkpoint import load_checkpoint, save_checkpoint
from .engine.evaluate import evaluate, infer
from .engine.train import TrainConfig, train
from .models.nferd import NFERD, ModelConfig
from .models.teacher import build_teacher
from .version import __version__

__all__ = ["NFERD", "ModelConfig", "TrainConfig", "train", "evaluate", "infer", "Predictor",
           "predict_to_folder", "load_checkpoint", "save_checkpoint", "build_teacher", "MVTecDataset",
           "VisADataset", "FolderDataset", "make_dataset", "__version__"]
