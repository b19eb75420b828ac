"""Using a trained model on the line: the predictor, ONNX export and runtime, the HTTP service
and its page, the HTML report and overlays."""
