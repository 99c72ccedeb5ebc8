"""AMCT's Caffe edition on omct, with no Caffe installed.

    import omct.caffe as amct
    amct.create_quant_config(config_file, model_file, weights_file, skip_layers=None, batch_num=1)
    graph = amct.init(config_file, model_file, weights_file, scale_offset_record_file)
    session = amct.quantize_model(graph, modified_model_file, modified_weights_file)
    for x in calibration_batches:
        session.run(None, {"data": x})
    amct.save_model(graph, "Both", save_path)
    amct.auto_nuq(model_file, weights_file, evaluator, config_file, scale_offset_record_file, save_dir)

Prototxt and caffemodel files (V1 ``layers`` files too) are read and written with protobuf against omct's own
Caffe schema, converted to ONNX and calibrated in ONNX Runtime. See docs/CAFFE.md.
"""

from omct.caffe.api import (
                            CaffeGraph,
                            CalibrationSession,
                            create_quant_config,
                            init,
                            quantize_model,
                            save_model,
                            set_cpu_mode,
                            set_gpu_mode,
)
from omct.caffe.auto_nuq import AutoNuqEvaluatorBase, auto_nuq
from omct.caffe.convert import convert
from omct.caffe.netio import load_net, read_caffemodel, read_prototxt, write_caffemodel, write_prototxt
from omct.caffe.runner import Net

__all__ = ["AutoNuqEvaluatorBase", "CaffeGraph", "CalibrationSession", "Net", "auto_nuq", "convert",
           "create_quant_config", "init", "load_net", "quantize_model", "read_caffemodel", "read_prototxt", "save_model",
           "set_cpu_mode", "set_gpu_mode", "write_caffemodel", "write_prototxt"]
