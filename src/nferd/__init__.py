"""nferd: Normal Feature-Enhanced Reverse teacher-student Distillation for anomaly detection.

Python API (the same verbs as the ``nferd`` command)::

    from nferd import ModelConfig, TrainConfig, MVTecDataset, train, evaluate, Predictor

    train_set = MVTecDataset("/data/mvtec_ad", "bottle", "train")
    model, summary = train(train_set, ModelConfig(teacher="efficientnet_lite0"), TrainConfig(epochs=200),
                           "runs/bottle")
    metrics, _ = evaluate(model, MVTecDataset("/data/mvtec_ad", "bottle", "test"))
    predictor = Predictor.from_checkpoint("runs/bottle")
"""

__version__ = "0.1.0"

from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .datasets import FolderDataset, MVTecDataset, VisADataset, make_dataset  # noqa: E402
from .evaluate import evaluate, infer  # noqa: E402
from .model import NFERD, ModelConfig  # noqa: E402
from .predict import Predictor, predict_to_folder  # noqa: E402
from .teacher import build_teacher  # noqa: E402
from .train import TrainConfig, train  # noqa: E402

__all__ = ["NFERD", "ModelConfig", "TrainConfig", "train", "evaluate", "infer", "Predictor",
           "predict_to_folder", "load_checkpoint", "save_checkpoint", "build_teacher", "MVTecDataset",
           "VisADataset", "FolderDataset", "make_dataset", "__version__"]
