"""omct's TensorFlow frontend, with the call sequence of AMCT's TensorFlow edition.

    import omct.tensorflow as amct
    amct.create_quant_config(config_file, model, skip_layers=None, batch_num=1)
    calibration_model = amct.quantize_model(model, config_file, record_file)
    for x in calibration_batches:          # batch_num batches, NHWC, as model(x) takes them
        calibration_model(x)               # returns what model(x) returns, as NumPy
    amct.save_model(model, record_file, save_path)
    # -> save_path + "_fake_quant_model.onnx", save_path + "_deploy_model.onnx"

``model`` is a Keras model, a SavedModel directory, or a frozen GraphDef .pb / tf.Graph (then ``input_names=`` and
``output_names=`` name its tensors; ``save_model(pb_model, outputs, record_file, save_path)`` as in AMCT).
TensorFlow is imported on first use; it needs the ``tensorflow`` extra: ``pip install 'omct[tensorflow]'``.
"""

from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.tensorflow.api import (
    CalibrationModel,
    TFModelReport,
    create_quant_config,
    inspect_model,
    prepare,
    quantize_model,
    save_model,
)
from omct.tensorflow.auto import OnnxModel, accuracy_based_auto_calibration, analyze

__all__ = ["AutoCalibrationEvaluatorBase", "CalibrationModel", "OnnxModel", "TFModelReport",
           "accuracy_based_auto_calibration", "analyze", "create_quant_config", "inspect_model", "prepare",
           "quantize_model", "save_model"]
