"""AMCT's PyTorch call sequence on standard runtimes.

    import omct.pytorch as amct
    amct.create_quant_config(config_file, model, input_data, skip_layers=None, batch_num=1)
    calibration_model = amct.quantize_model(config_file, modified_onnx_model, record_file, model, input_data)
    with torch.no_grad():
        for x in calibration_batches:      # batch_num batches
            calibration_model(x)
    amct.save_model(modified_onnx_model, record_file, save_path)

Quantization-aware training (AMCT's retrain, docs/QAT.md):

    amct.create_quant_retrain_config(config_file, model, input_data, config_defination=None)
    qat_model = amct.create_quant_retrain_model(config_file, model, record_file, input_data)
    ...  # train qat_model with your own loop (DistributedDataParallel works)
    amct.save_quant_retrain_model(config_file, qat_model, record_file, save_path, input_data)

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
from omct.pytorch.decompose import auto_decomposition, decompose_network
from omct.pytorch.retrain import (
    QuantRetrainModel,
    create_quant_retrain_config,
    create_quant_retrain_model,
    restore_quant_retrain_model,
    save_quant_retrain_model,
)

__all__ = ["AutoCalibrationEvaluatorBase", "AutoNuqEvaluatorBase", "CalibrationModel", "ModuleReport", "OnnxModule",
           "QuantRetrainModel", "accuracy_based_auto_calibration", "auto_decomposition", "auto_nuq", "create_quant_config",
           "create_quant_retrain_config", "create_quant_retrain_model", "decompose_network", "inspect_model",
           "quantize_model", "restore_quant_retrain_model", "save_model", "save_quant_retrain_model"]
