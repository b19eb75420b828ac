"""The contract of an exported ``.onnx`` file, shared by the exporter and the runtime predictor."""

ONNX_FORMAT = "nferd-onnx"
ONNX_VERSION = 1
# Resize with antialias (the in-graph preprocessing) needs opset 18; onnxruntime's CPU kernels
# for everything else in the graph are the same at 17 and 18.
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 20  # 20 is the newest the TorchScript exporter writes
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
