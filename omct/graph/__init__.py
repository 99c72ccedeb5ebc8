"""ONNX graph work: loading, normalisation, quantizable layers, calibration model, export."""
