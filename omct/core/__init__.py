"""Framework-free numerics: quantization parameters, calibrators, weight quantizers.

Nothing in this package imports ONNX, PyTorch or any other part of omct.
"""
