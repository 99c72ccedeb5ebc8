"""AMCT's PyTorch call sequence on standard runtimes.

    import omct.pytorch as amct
    amct.create_quant_config(config_file, model, input_data, skip_layers=None, batch_num=1)
    calibration_model = amct.quantize_model(config_file, modified_onnx_model, record_file, model, input_data)
    with torch.no_grad():
        for x in calibration_batches:      # batch_num batches
            calibration_model(x)
    amct.save_model(modified_onnx_model, record_file, save_path)

Needs the ``torch`` extra: ``pip install omct[torch]``.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("omct.pytorch needs PyTorch: pip install 'omct[torch]'") from e

from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.auto.nuq import AutoNuqEvaluatorBase
from omct.pytorch.api import ModuleReport, create_quant_config, inspect_model, quantize_model, save_model
from omct.pytorch.auto import OnnxModule, accuracy_based_auto_calibration, auto_nuq
from omct.pytorch.calibration import CalibrationModel

__all__ = ["AutoCalibrationEvaluatorBase", "AutoNuqEvaluatorBase", "CalibrationModel", "ModuleReport", "OnnxModule",
           "accuracy_based_auto_calibration", "auto_nuq", "create_quant_config", "inspect_model", "quantize_model", "save_model"]
