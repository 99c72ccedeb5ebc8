"""Protobuf messages of AMCT's simplified .cfg (``AMCTConfig``) and record file (``ScaleOffsetRecord``).

Built from descriptors so no protoc step is needed. Field names and numbers follow AMCT's public .proto
files, so AMCT's text files parse unchanged; fields numbered 1000 and up are omct's own extensions (extra
calibration algorithms, output quantization for integer kernels). The algorithm messages and
``CalibrationConfig`` are generated from the algorithms' ``Options`` declarations (``omct.core``).
"""

from __future__ import annotations

import functools

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from omct.core.options import OptionSpec
from omct.formats.algorithms import ACT, SHARED_FIELDS, WTS, check_placements, registry_key

_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {"bool": _F.TYPE_BOOL, "uint32": _F.TYPE_UINT32, "int32": _F.TYPE_INT32, "float": _F.TYPE_FLOAT,
          "string": _F.TYPE_STRING}
_PACKAGE = "omct"

# message name -> [(field name, number, type or message name, label, default, oneof name)]
_CONFIG_MESSAGES: dict[str, list[tuple]] = {
    "OverrideLayerType": [("layer_type", 1, "string", "required", None, None),
                          ("calibration_config", 2, "CalibrationConfig", "required", None, None)],
    "OverrideLayer": [("layer_name", 1, "string", "required", None, None),
                      ("calibration_config", 2, "CalibrationConfig", "required", None, None)],
    "DMQBalancer": [("migration_strength", 1, "float", "optional", "0.5", None)],
    # AMCT's nesting: nuq_config { mapping_file: "fusion.json" nuq_quantize { num_steps: 32 num_of_iteration: 1 } }
    "NuqConfig": [("mapping_file", 1, "string", "optional", None, None),
                  ("nuq_quantize", 2, "NUQuantize", "optional", None, None)],
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
        ("cross_layer_equalization", 1001, "bool", "optional", "false", None),
        ("learned_rounding", 1010, "bool", "optional", "true", None),
    ],
}

_RECORD_MESSAGES: dict[str, list[tuple]] = {
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
        ("ada_flip", 1003, "uint32", "repeated", None, None),
        ("dmq_factor", 1004, "float", "repeated", None, None),
        ("nuq_levels", 1013, "int32", "repeated", None, None),  # NUQ: the INT8 levels the layer's weights keep
    ],
    "MapFiledEntry": [("key", 1, "string", "optional", None, None),
                      ("value", 2, "SingleLayerRecord", "optional", None, None)],
    "ScaleOffsetRecord": [("record", 1, "MapFiledEntry", "repeated", None, None)],
}


def _proto_type(spec: OptionSpec) -> str:
    t = spec.element_type()
    if t is bool:
        return "bool"
    if t is int:
        low = min(spec.choices) if spec.choices else max(b for b in (spec.ge, spec.gt, -1) if b is not None)
        return "uint32" if low >= 0 else "int32"
    return {float: "float", str: "string"}[t]


def _proto_default(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def algorithm_messages() -> dict[str, list[tuple]]:
    """The algorithm messages and ``CalibrationConfig``, generated from the registries' Options."""
    check_placements()
    messages: dict[str, list[tuple]] = {}
    calibration = []
    for kind in (WTS, ACT):
        for opts in kind.algorithms().values():
            cfg = opts.cfg
            if cfg.message in _CONFIG_MESSAGES or cfg.message == "CalibrationConfig":
                raise ValueError(f"{kind.key}: .cfg message name '{cfg.message}' is taken by AMCTConfig's own messages")
            fields = []
            for spec in opts.specs():
                defaults = spec.default if spec.is_tuple else (spec.default,)
                for (fname, number), default in zip(spec.cfg, defaults, strict=True):
                    fields.append((fname, number, _proto_type(spec), "optional", _proto_default(default), None))
            fields += [(fname, number, SHARED_FIELDS[fname][1], "optional", None, None) for fname, number in cfg.shared]
            messages[cfg.message] = sorted(fields, key=lambda f: f[1])
            calibration.append((cfg.field, cfg.number, cfg.message, "optional", None, kind.oneof))
    # AMCT's activation/weight balancer (not a registry algorithm: one per layer, beside the two algorithms)
    calibration.append(("dmq_balancer", 200, "DMQBalancer", "optional", None, "tensor_balancer"))
    messages["CalibrationConfig"] = calibration
    return messages


def _build(messages: dict[str, list[tuple]], file_name: str,
           enums: dict[str, list[tuple[str, int]]] | None = None) -> dict[str, type]:
    fdp = descriptor_pb2.FileDescriptorProto(name=file_name, package=_PACKAGE, syntax="proto2")
    for name, values in (enums or {}).items():
        enum = fdp.enum_type.add(name=name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for name, fields in messages.items():
        msg = fdp.message_type.add(name=name)
        oneofs: list[str] = []
        for fname, number, ftype, label, default, oneof in fields:
            f = msg.field.add(name=fname, number=number,
                              label={"optional": _F.LABEL_OPTIONAL, "repeated": _F.LABEL_REPEATED,
                                     "required": _F.LABEL_REQUIRED}[label])
            if ftype in _TYPES:
                f.type = _TYPES[ftype]
            elif ftype in (enums or {}):
                f.type, f.type_name = _F.TYPE_ENUM, f".{_PACKAGE}.{ftype}"
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
            for name in messages}


@functools.lru_cache(maxsize=4)
def _config_classes(key: tuple) -> dict[str, type]:
    return _build({**algorithm_messages(), **_CONFIG_MESSAGES}, "omct_amct_config.proto")


def amct_config_class() -> type:
    """``AMCTConfig`` for the algorithms registered now (rebuilt when a registry changes)."""
    return _config_classes(registry_key())["AMCTConfig"]


ScaleOffsetRecord = _build(_RECORD_MESSAGES, "omct_amct_record.proto")["ScaleOffsetRecord"]


# AMCT's retrain .cfg (``AMCTRetrainConfig``, AMCT's public retrain_config_pytorch.proto): field names and numbers
# as AMCT's, so AMCT's retrain files parse unchanged. Pruning is parsed so that a file using it gets a clear error.
_RETRAIN_ENUMS = {"DataType": [("INT4", 0), ("INT8", 1), ("INT16", 2)], "NOutOfMType": [("M4N2", 0)],
                  "FakequantPrecisionMode": [("FORCE_FP16_QUANT", 1)]}
_RETRAIN_MESSAGES: dict[str, list[tuple]] = {
    "ClipMaxMin": [("clip_max", 3, "float", "required", None, None),
                   ("clip_min", 5, "float", "required", None, None)],
    "ActULQquantize": [("clip_max_min", 1, "ClipMaxMin", "optional", None, None),
                       ("fixed_min", 2, "bool", "optional", None, None),
                       ("dst_type", 3, "DataType", "optional", "INT8", None)],
    "RetrainDataQuantConfig": [("ulq_quantize", 13, "ActULQquantize", "optional", None, "data_retrain_algo")],
    "ARQRetrain": [("dst_type", 1, "DataType", "optional", "INT8", None),
                   ("channel_wise", 2, "bool", "optional", None, None)],
    "WtsULQRetrain": [("dst_type", 1, "DataType", "optional", "INT8", None),
                      ("channel_wise", 2, "bool", "optional", None, None)],
    "RetrainWeightQuantConfig": [("arq_retrain", 1, "ARQRetrain", "optional", None, "weights_retrain_algo"),
                                 ("ulq_retrain", 2, "WtsULQRetrain", "optional", None, "weights_retrain_algo")],
    "BalancedL2NormFilterPruner": [("prune_ratio", 1, "float", "required", None, None),
                                   ("ascend_optimized", 2, "bool", "optional", "true", None)],
    "FilterPruner": [("balanced_l2_norm_filter_prune", 1, "BalancedL2NormFilterPruner", "optional", None,
                      "filter_pruner_algo")],
    "L1SelectivePruner": [("n_out_of_m_type", 1, "NOutOfMType", "optional", "M4N2", None),
                          ("update_freq", 2, "uint32", "optional", "0", None)],
    "NOutOfMPruner": [("l1_selective_prune", 1, "L1SelectivePruner", "optional", None, "n_out_of_m_pruner_algo")],
    "PruneConfig": [("filter_pruner", 1, "FilterPruner", "optional", None, "regular_prune_strategy"),
                    ("n_out_of_m_pruner", 2, "NOutOfMPruner", "optional", None, "regular_prune_strategy")],
    "RetrainOverrideLayer": [("layer_name", 1, "string", "required", None, None),
                             ("retrain_data_quant_config", 2, "RetrainDataQuantConfig", "optional", None, None),
                             ("retrain_weight_quant_config", 3, "RetrainWeightQuantConfig", "optional", None, None),
                             ("prune_config", 4, "PruneConfig", "optional", None, None)],
    "RetrainOverrideLayerType": [("layer_type", 1, "string", "required", None, None),
                                 ("retrain_data_quant_config", 2, "RetrainDataQuantConfig", "optional", None, None),
                                 ("retrain_weight_quant_config", 3, "RetrainWeightQuantConfig", "optional", None, None),
                                 ("prune_config", 4, "PruneConfig", "optional", None, None)],
    "AMCTRetrainConfig": [
        ("batch_num", 1, "uint32", "optional", "1", None),
        ("retrain_data_quant_config", 2, "RetrainDataQuantConfig", "optional", None, None),
        ("retrain_weight_quant_config", 3, "RetrainWeightQuantConfig", "optional", None, None),
        ("skip_layers", 4, "string", "repeated", None, None),
        ("override_layer_configs", 5, "RetrainOverrideLayer", "repeated", None, None),
        ("skip_layer_types", 6, "string", "repeated", None, None),
        ("override_layer_types", 7, "RetrainOverrideLayerType", "repeated", None, None),
        ("prune_config", 8, "PruneConfig", "optional", None, None),
        ("regular_prune_skip_layers", 9, "string", "repeated", None, None),
        ("regular_prune_skip_types", 10, "string", "repeated", None, None),
        ("quant_skip_layers", 11, "string", "repeated", None, None),
        ("quant_skip_types", 12, "string", "repeated", None, None),
        ("fakequant_precision_mode", 21, "FakequantPrecisionMode", "optional", None, None),
    ],
}

AMCTRetrainConfig = _build(_RETRAIN_MESSAGES, "omct_amct_retrain_config.proto", _RETRAIN_ENUMS)["AMCTRetrainConfig"]
