"""omct's ONNX frontend, with the call sequence of AMCT's ONNX edition.

    import omct.onnx as amct
    amct.create_quant_config(config_file, model_file, skip_layers=None, batch_num=1)
    amct.quantize_model(config_file, model_file, modified_onnx_file, record_file)
    session = amct.CalibrationSession(modified_onnx_file)   # an onnxruntime.InferenceSession look-alike
    for feeds in calibration_batches:                        # batch_num batches
        session.run(None, feeds)
    amct.save_model(modified_onnx_file, record_file, save_path)

In memory, no files: ``amct.quantize(model, config, batches)`` returns a ``QuantizedModel``.
"""

from __future__ import annotations

from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.auto.nuq import AutoNuqEvaluatorBase
from omct.onnx.api import (
    CalibrationSession,
    create_quant_config,
    inspect_model,
    prepare,
    quantize,
    quantize_model,
    save_model,
)
from omct.onnx.auto import accuracy_based_auto_calibration, auto_nuq

__all__ = ["AutoCalibrationEvaluatorBase", "AutoNuqEvaluatorBase", "CalibrationSession", "accuracy_based_auto_calibration",
           "auto_nuq", "create_quant_config",
           "inspect_model", "prepare", "quantize", "quantize_model", "save_model"]
