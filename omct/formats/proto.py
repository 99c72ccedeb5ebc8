"""Protobuf messages of AMCT's simplified .cfg (``AMCTConfig``) and record file (``ScaleOffsetRecord``).

Built from descriptors at import time so no protoc step is needed. Field names and numbers follow AMCT's
public .proto files, so AMCT's text files parse unchanged; fields numbered 1000 and up are omct's own
extensions (extra calibration algorithms, output quantization for integer kernels).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {"bool": _F.TYPE_BOOL, "uint32": _F.TYPE_UINT32, "int32": _F.TYPE_INT32, "float": _F.TYPE_FLOAT,
          "string": _F.TYPE_STRING}
_PACKAGE = "omct"

# message name -> [(field name, number, type or message name, label, default, oneof name)]
_MESSAGES: dict[str, list[tuple]] = {
    "ARQuantize": [("channel_wise", 1, "bool", "optional", None, None),
                   ("quant_bits", 10, "uint32", "optional", None, None)],
    "MSEClipQuantize": [("channel_wise", 1, "bool", "optional", None, None),
                        ("quant_bits", 10, "uint32", "optional", None, None)],
    "FMRQuantize": [("search_range_start", 1, "float", "optional", "0.7", None),
                    ("search_range_end", 2, "float", "optional", "1.3", None),
                    ("search_step", 3, "float", "optional", "0.01", None),
                    ("max_percentile", 4, "float", "optional", "0.999999", None),
                    ("min_percentile", 5, "float", "optional", "0.999999", None),
                    ("asymmetric", 6, "bool", "optional", None, None)],
    "HFMGQuantize": [("num_of_bins", 1, "uint32", "optional", "4096", None),
                     ("asymmetric", 2, "bool", "optional", None, None)],
    "MinMaxQuantize": [("asymmetric", 1, "bool", "optional", None, None)],
    "PercentileQuantize": [("percentile", 1, "float", "optional", "99.999", None),
                           ("asymmetric", 2, "bool", "optional", None, None)],
    "MSEQuantize": [("asymmetric", 1, "bool", "optional", None, None)],
    "KLQuantize": [("asymmetric", 1, "bool", "optional", None, None)],
    "CalibrationConfig": [
        ("arq_quantize", 13, "ARQuantize", "optional", None, "wts_quant_algo"),
        ("mse_clip_quantize", 1000, "MSEClipQuantize", "optional", None, "wts_quant_algo"),
        ("ifmr_quantize", 100, "FMRQuantize", "optional", None, "acts_quant_algo"),
        ("hfmg_quantize", 101, "HFMGQuantize", "optional", None, "acts_quant_algo"),
        ("minmax_quantize", 1001, "MinMaxQuantize", "optional", None, "acts_quant_algo"),
        ("percentile_quantize", 1002, "PercentileQuantize", "optional", None, "acts_quant_algo"),
        ("mse_quantize", 1003, "MSEQuantize", "optional", None, "acts_quant_algo"),
        ("kl_quantize", 1004, "KLQuantize", "optional", None, "acts_quant_algo"),
    ],
    "OverrideLayerType": [("layer_type", 1, "string", "required", None, None),
                          ("calibration_config", 2, "CalibrationConfig", "required", None, None)],
    "OverrideLayer": [("layer_name", 1, "string", "required", None, None),
                      ("calibration_config", 2, "CalibrationConfig", "required", None, None)],
    "NuqConfig": [("num_steps", 1, "uint32", "optional", None, None),
                  ("num_of_iteration", 2, "uint32", "optional", None, None)],
    "AMCTConfig": [
        ("batch_num", 1, "uint32", "optional", "1", None),
        ("activation_offset", 2, "bool", "optional", "true", None),
        ("skip_layers", 10, "string", "repeated", None, None),
        ("skip_layer_types", 11, "string", "repeated", None, None),
        ("common_config", 50, "CalibrationConfig", "optional", None, None),
        ("override_layer_types", 51, "OverrideLayerType", "repeated", None, None),
        ("override_layer_configs", 100, "OverrideLayer", "repeated", None, None),
        ("do_fusion", 200, "bool", "optional", "true", None),
        ("skip_fusion_layers", 201, "string", "repeated", None, None),
        ("nuq_config", 300, "NuqConfig", "optional", None, None),
        ("bias_correction", 1000, "bool", "optional", "true", None),
    ],
    "SingleLayerRecord": [
        ("scale_d", 1, "float", "optional", None, None),
        ("offset_d", 2, "int32", "optional", None, None),
        ("scale_w", 3, "float", "repeated", None, None),
        ("offset_w", 4, "int32", "repeated", None, None),
        ("shift_bit", 5, "uint32", "repeated", None, None),
        ("skip_fusion", 9, "bool", "optional", "false", None),
        ("dst_type", 10, "string", "optional", "INT8", None),
        ("act_type", 11, "string", "optional", "INT8", None),
        ("wts_type", 12, "string", "optional", "INT8", None),
        ("scale_o", 1000, "float", "optional", None, None),
        ("offset_o", 1001, "int32", "optional", None, None),
        ("bias_correction", 1002, "float", "repeated", None, None),
    ],
    "MapFiledEntry": [("key", 1, "string", "optional", None, None),
                      ("value", 2, "SingleLayerRecord", "optional", None, None)],
    "ScaleOffsetRecord": [("record", 1, "MapFiledEntry", "repeated", None, None)],
}


def _build() -> dict[str, type]:
    fdp = descriptor_pb2.FileDescriptorProto(name="omct_amct.proto", package=_PACKAGE, syntax="proto2")
    for name, fields in _MESSAGES.items():
        msg = fdp.message_type.add(name=name)
        oneofs: list[str] = []
        for fname, number, ftype, label, default, oneof in fields:
            f = msg.field.add(name=fname, number=number,
                              label={"optional": _F.LABEL_OPTIONAL, "repeated": _F.LABEL_REPEATED,
                                     "required": _F.LABEL_REQUIRED}[label])
            if ftype in _TYPES:
                f.type = _TYPES[ftype]
            else:
                f.type, f.type_name = _F.TYPE_MESSAGE, f".{_PACKAGE}.{ftype}"
            if default is not None:
                f.default_value = default
            if oneof:
                if oneof not in oneofs:
                    oneofs.append(oneof)
                    msg.oneof_decl.add(name=oneof)
                f.oneof_index = oneofs.index(oneof)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
            for name in _MESSAGES}


MESSAGES = _build()
AMCTConfig = MESSAGES["AMCTConfig"]
ScaleOffsetRecord = MESSAGES["ScaleOffsetRecord"]
