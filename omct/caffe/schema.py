"""The Caffe schema omct reads and writes: protobuf messages built from descriptors, no Caffe and no protoc.

Field names and numbers follow BVLC Caffe's public ``caffe.proto`` (BSD 2-clause) and, for the SSD layers
(Permute, Normalize, PriorBox), the SSD fork's numbers (202, 203, 206). Only the messages omct uses are
defined; a text prototxt field outside them (a solver-only or data-layer option) is skipped with a warning by
the reader. Binary files keep unknown fields as protobuf does.

Table rows: (field name, number, label, type[, default]); label "o" optional, "r" repeated, "q" required, a
trailing "p" packed. A type is a scalar, a message of the table, or an enum (nested: the message's own).
"""

from __future__ import annotations

import functools

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "caffe"
_SCALARS = {"float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE, "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32,
            "int64": _F.TYPE_INT64, "uint64": _F.TYPE_UINT64, "bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING,
            "bytes": _F.TYPE_BYTES}
_LABELS = {"o": _F.LABEL_OPTIONAL, "r": _F.LABEL_REPEATED, "q": _F.LABEL_REQUIRED}

_MESSAGES = {
    "NetParameter": [
        ('name', 1, 'o', 'string'), ('input', 3, 'r', 'string'), ('input_shape', 8, 'r', 'BlobShape'),
        ('input_dim', 4, 'r', 'int32'), ('force_backward', 5, 'o', 'bool', 'false'), ('state', 6, 'o', 'NetState'),
        ('debug_info', 7, 'o', 'bool', 'false'), ('layer', 100, 'r', 'LayerParameter'),
        ('layers', 2, 'r', 'V1LayerParameter'),
    ],
    "NetState": [
        ('phase', 1, 'o', 'Phase', 'TEST'), ('level', 2, 'o', 'int32', '0'), ('stage', 3, 'r', 'string'),
    ],
    "NetStateRule": [
        ('phase', 1, 'o', 'Phase'), ('min_level', 2, 'o', 'int32'), ('max_level', 3, 'o', 'int32'),
        ('stage', 4, 'r', 'string'), ('not_stage', 5, 'r', 'string'),
    ],
    "BlobShape": [
        ('dim', 1, 'rp', 'int64'),
    ],
    "BlobProto": [
        ('shape', 7, 'o', 'BlobShape'), ('data', 5, 'rp', 'float'), ('diff', 6, 'rp', 'float'),
        ('double_data', 8, 'rp', 'double'), ('double_diff', 9, 'rp', 'double'), ('num', 1, 'o', 'int32', '0'),
        ('channels', 2, 'o', 'int32', '0'), ('height', 3, 'o', 'int32', '0'), ('width', 4, 'o', 'int32', '0'),
    ],
    "ParamSpec": [
        ('name', 1, 'o', 'string'), ('share_mode', 2, 'o', 'DimCheckMode'), ('lr_mult', 3, 'o', 'float', '1.0'),
        ('decay_mult', 4, 'o', 'float', '1.0'),
    ],
    "FillerParameter": [
        ('type', 1, 'o', 'string', 'constant'), ('value', 2, 'o', 'float', '0'), ('min', 3, 'o', 'float', '0'),
        ('max', 4, 'o', 'float', '1'), ('mean', 5, 'o', 'float', '0'), ('std', 6, 'o', 'float', '1'),
        ('sparse', 7, 'o', 'int32', '-1'), ('variance_norm', 8, 'o', 'VarianceNorm', 'FAN_IN'),
    ],
    "LayerParameter": [
        ('name', 1, 'o', 'string'), ('type', 2, 'o', 'string'), ('bottom', 3, 'r', 'string'),
        ('top', 4, 'r', 'string'), ('phase', 10, 'o', 'Phase'), ('loss_weight', 5, 'r', 'float'),
        ('param', 6, 'r', 'ParamSpec'), ('blobs', 7, 'r', 'BlobProto'), ('propagate_down', 11, 'r', 'bool'),
        ('include', 8, 'r', 'NetStateRule'), ('exclude', 9, 'r', 'NetStateRule'),
        ('transform_param', 100, 'o', 'TransformationParameter'), ('loss_param', 101, 'o', 'LossParameter'),
        ('accuracy_param', 102, 'o', 'AccuracyParameter'), ('batch_norm_param', 139, 'o', 'BatchNormParameter'),
        ('bias_param', 141, 'o', 'BiasParameter'), ('concat_param', 104, 'o', 'ConcatParameter'),
        ('convolution_param', 106, 'o', 'ConvolutionParameter'), ('data_param', 107, 'o', 'DataParameter'),
        ('dropout_param', 108, 'o', 'DropoutParameter'), ('eltwise_param', 110, 'o', 'EltwiseParameter'),
        ('flatten_param', 135, 'o', 'FlattenParameter'), ('inner_product_param', 117, 'o', 'InnerProductParameter'),
        ('input_param', 143, 'o', 'InputParameter'), ('lrn_param', 118, 'o', 'LRNParameter'),
        ('memory_data_param', 119, 'o', 'MemoryDataParameter'), ('pooling_param', 121, 'o', 'PoolingParameter'),
        ('prelu_param', 131, 'o', 'PReLUParameter'), ('relu_param', 123, 'o', 'ReLUParameter'),
        ('reshape_param', 133, 'o', 'ReshapeParameter'), ('scale_param', 142, 'o', 'ScaleParameter'),
        ('sigmoid_param', 124, 'o', 'SigmoidParameter'), ('softmax_param', 125, 'o', 'SoftmaxParameter'),
        ('tanh_param', 127, 'o', 'TanHParameter'),
        ('permute_param', 202, 'o', 'PermuteParameter'), ('prior_box_param', 203, 'o', 'PriorBoxParameter'),
        ('norm_param', 206, 'o', 'NormalizeParameter'),
    ],
    "V1LayerParameter": [
        ('bottom', 2, 'r', 'string'), ('top', 3, 'r', 'string'), ('name', 4, 'o', 'string'),
        ('include', 32, 'r', 'NetStateRule'), ('exclude', 33, 'r', 'NetStateRule'), ('type', 5, 'o', 'LayerType'),
        ('blobs', 6, 'r', 'BlobProto'), ('param', 1001, 'r', 'string'),
        ('blob_share_mode', 1002, 'r', 'DimCheckMode'), ('blobs_lr', 7, 'r', 'float'),
        ('weight_decay', 8, 'r', 'float'), ('loss_weight', 35, 'r', 'float'),
        ('accuracy_param', 27, 'o', 'AccuracyParameter'), ('concat_param', 9, 'o', 'ConcatParameter'),
        ('convolution_param', 10, 'o', 'ConvolutionParameter'), ('data_param', 11, 'o', 'DataParameter'),
        ('dropout_param', 12, 'o', 'DropoutParameter'), ('eltwise_param', 24, 'o', 'EltwiseParameter'),
        ('inner_product_param', 17, 'o', 'InnerProductParameter'), ('lrn_param', 18, 'o', 'LRNParameter'),
        ('memory_data_param', 22, 'o', 'MemoryDataParameter'), ('pooling_param', 19, 'o', 'PoolingParameter'),
        ('relu_param', 30, 'o', 'ReLUParameter'), ('sigmoid_param', 38, 'o', 'SigmoidParameter'),
        ('softmax_param', 39, 'o', 'SoftmaxParameter'), ('tanh_param', 37, 'o', 'TanHParameter'),
        ('transform_param', 36, 'o', 'TransformationParameter'), ('loss_param', 42, 'o', 'LossParameter'),
    ],
    "TransformationParameter": [
        ('scale', 1, 'o', 'float', '1'), ('mirror', 2, 'o', 'bool', 'false'), ('crop_size', 3, 'o', 'uint32', '0'),
        ('mean_file', 4, 'o', 'string'), ('mean_value', 5, 'r', 'float'), ('force_color', 6, 'o', 'bool', 'false'),
        ('force_gray', 7, 'o', 'bool', 'false'),
    ],
    "LossParameter": [
        ('ignore_label', 1, 'o', 'int32'), ('normalization', 3, 'o', 'NormalizationMode', 'VALID'),
        ('normalize', 2, 'o', 'bool'),
    ],
    "AccuracyParameter": [
        ('top_k', 1, 'o', 'uint32', '1'), ('axis', 2, 'o', 'int32', '1'), ('ignore_label', 3, 'o', 'int32'),
    ],
    "DataParameter": [
        ('source', 1, 'o', 'string'), ('batch_size', 4, 'o', 'uint32'), ('rand_skip', 7, 'o', 'uint32', '0'),
        ('backend', 8, 'o', 'DB', 'LEVELDB'), ('scale', 2, 'o', 'float', '1'), ('mean_file', 3, 'o', 'string'),
        ('crop_size', 5, 'o', 'uint32', '0'), ('mirror', 6, 'o', 'bool', 'false'),
        ('force_encoded_color', 9, 'o', 'bool', 'false'), ('prefetch', 10, 'o', 'uint32', '4'),
    ],
    "InputParameter": [
        ('shape', 1, 'r', 'BlobShape'),
    ],
    "ConvolutionParameter": [
        ('num_output', 1, 'o', 'uint32'), ('bias_term', 2, 'o', 'bool', 'true'), ('pad', 3, 'r', 'uint32'),
        ('kernel_size', 4, 'r', 'uint32'), ('stride', 6, 'r', 'uint32'), ('dilation', 18, 'r', 'uint32'),
        ('pad_h', 9, 'o', 'uint32', '0'), ('pad_w', 10, 'o', 'uint32', '0'), ('kernel_h', 11, 'o', 'uint32'),
        ('kernel_w', 12, 'o', 'uint32'), ('stride_h', 13, 'o', 'uint32'), ('stride_w', 14, 'o', 'uint32'),
        ('group', 5, 'o', 'uint32', '1'), ('weight_filler', 7, 'o', 'FillerParameter'),
        ('bias_filler', 8, 'o', 'FillerParameter'), ('engine', 15, 'o', 'Engine', 'DEFAULT'),
        ('axis', 16, 'o', 'int32', '1'), ('force_nd_im2col', 17, 'o', 'bool', 'false'),
    ],
    "PoolingParameter": [
        ('pool', 1, 'o', 'PoolMethod', 'MAX'), ('pad', 4, 'o', 'uint32', '0'), ('pad_h', 9, 'o', 'uint32', '0'),
        ('pad_w', 10, 'o', 'uint32', '0'), ('kernel_size', 2, 'o', 'uint32'), ('kernel_h', 5, 'o', 'uint32'),
        ('kernel_w', 6, 'o', 'uint32'), ('stride', 3, 'o', 'uint32', '1'), ('stride_h', 7, 'o', 'uint32'),
        ('stride_w', 8, 'o', 'uint32'), ('engine', 11, 'o', 'Engine', 'DEFAULT'),
        ('global_pooling', 12, 'o', 'bool', 'false'), ('round_mode', 13, 'o', 'RoundMode', 'CEIL'),
    ],
    "InnerProductParameter": [
        ('num_output', 1, 'o', 'uint32'), ('bias_term', 2, 'o', 'bool', 'true'),
        ('weight_filler', 3, 'o', 'FillerParameter'), ('bias_filler', 4, 'o', 'FillerParameter'),
        ('axis', 5, 'o', 'int32', '1'), ('transpose', 6, 'o', 'bool', 'false'),
    ],
    "BatchNormParameter": [
        ('use_global_stats', 1, 'o', 'bool'), ('moving_average_fraction', 2, 'o', 'float', '.999'),
        ('eps', 3, 'o', 'float', '1e-5'),
    ],
    "ScaleParameter": [
        ('axis', 1, 'o', 'int32', '1'), ('num_axes', 2, 'o', 'int32', '1'), ('filler', 3, 'o', 'FillerParameter'),
        ('bias_term', 4, 'o', 'bool', 'false'), ('bias_filler', 5, 'o', 'FillerParameter'),
    ],
    "BiasParameter": [
        ('axis', 1, 'o', 'int32', '1'), ('num_axes', 2, 'o', 'int32', '1'), ('filler', 3, 'o', 'FillerParameter'),
    ],
    "EltwiseParameter": [
        ('operation', 1, 'o', 'EltwiseOp', 'SUM'), ('coeff', 2, 'r', 'float'),
        ('stable_prod_grad', 3, 'o', 'bool', 'true'),
    ],
    "ConcatParameter": [
        ('axis', 2, 'o', 'int32', '1'), ('concat_dim', 1, 'o', 'uint32', '1'),
    ],
    "ReLUParameter": [
        ('negative_slope', 1, 'o', 'float', '0'), ('engine', 2, 'o', 'Engine', 'DEFAULT'),
    ],
    "PReLUParameter": [
        ('filler', 1, 'o', 'FillerParameter'), ('channel_shared', 2, 'o', 'bool', 'false'),
    ],
    "LRNParameter": [
        ('local_size', 1, 'o', 'uint32', '5'), ('alpha', 2, 'o', 'float', '1.'), ('beta', 3, 'o', 'float', '0.75'),
        ('norm_region', 4, 'o', 'NormRegion', 'ACROSS_CHANNELS'), ('k', 5, 'o', 'float', '1.'),
        ('engine', 6, 'o', 'Engine', 'DEFAULT'),
    ],
    "ReshapeParameter": [
        ('shape', 1, 'o', 'BlobShape'), ('axis', 2, 'o', 'int32', '0'), ('num_axes', 3, 'o', 'int32', '-1'),
    ],
    "FlattenParameter": [
        ('axis', 1, 'o', 'int32', '1'), ('end_axis', 2, 'o', 'int32', '-1'),
    ],
    "SoftmaxParameter": [
        ('engine', 1, 'o', 'Engine', 'DEFAULT'), ('axis', 2, 'o', 'int32', '1'),
    ],
    "DropoutParameter": [
        ('dropout_ratio', 1, 'o', 'float', '0.5'),
    ],
    "SigmoidParameter": [
        ('engine', 1, 'o', 'Engine', 'DEFAULT'),
    ],
    "TanHParameter": [
        ('engine', 1, 'o', 'Engine', 'DEFAULT'),
    ],
    "PermuteParameter": [
        ('order', 1, 'r', 'uint32'),
    ],
    "NormalizeParameter": [
        ('across_spatial', 1, 'o', 'bool', 'true'), ('scale_filler', 2, 'o', 'FillerParameter'),
        ('channel_shared', 3, 'o', 'bool', 'true'), ('eps', 4, 'o', 'float', '1e-10'),
    ],
    "PriorBoxParameter": [
        ('min_size', 1, 'r', 'float'), ('max_size', 2, 'r', 'float'), ('aspect_ratio', 3, 'r', 'float'),
        ('flip', 4, 'o', 'bool', 'true'), ('clip', 5, 'o', 'bool', 'false'), ('variance', 6, 'r', 'float'),
        ('img_size', 7, 'o', 'uint32'), ('img_h', 8, 'o', 'uint32'), ('img_w', 9, 'o', 'uint32'),
        ('step', 10, 'o', 'float'), ('step_h', 11, 'o', 'float'), ('step_w', 12, 'o', 'float'),
        ('offset', 13, 'o', 'float', '0.5'),
    ],
    "MemoryDataParameter": [
        ('batch_size', 1, 'o', 'uint32'), ('channels', 2, 'o', 'uint32'), ('height', 3, 'o', 'uint32'),
        ('width', 4, 'o', 'uint32'),
    ],
}

_ENUMS = {
    "Phase": [("TRAIN", 0), ("TEST", 1)],
    "ParamSpec.DimCheckMode": [('STRICT', 0), ('PERMISSIVE', 1)],
    "FillerParameter.VarianceNorm": [('FAN_IN', 0), ('FAN_OUT', 1), ('AVERAGE', 2)],
        "V1LayerParameter.LayerType": [
        ('NONE', 0), ('ABSVAL', 35), ('ACCURACY', 1), ('ARGMAX', 30), ('BNLL', 2), ('CONCAT', 3),
        ('CONTRASTIVE_LOSS', 37), ('CONVOLUTION', 4), ('DATA', 5), ('DECONVOLUTION', 39), ('DROPOUT', 6),
        ('DUMMY_DATA', 32), ('EUCLIDEAN_LOSS', 7), ('ELTWISE', 25), ('EXP', 38), ('FLATTEN', 8), ('HDF5_DATA', 9),
        ('HDF5_OUTPUT', 10), ('HINGE_LOSS', 28), ('IM2COL', 11), ('IMAGE_DATA', 12), ('INFOGAIN_LOSS', 13),
        ('INNER_PRODUCT', 14), ('LRN', 15), ('MEMORY_DATA', 29), ('MULTINOMIAL_LOGISTIC_LOSS', 16), ('MVN', 34),
        ('POOLING', 17), ('POWER', 26), ('RELU', 18), ('SIGMOID', 19), ('SIGMOID_CROSS_ENTROPY_LOSS', 27),
        ('SILENCE', 36), ('SOFTMAX', 20), ('SOFTMAX_LOSS', 21), ('SPLIT', 22), ('SLICE', 33), ('TANH', 23),
        ('WINDOW_DATA', 24), ('THRESHOLD', 31),
    ],
    "V1LayerParameter.DimCheckMode": [('STRICT', 0), ('PERMISSIVE', 1)],
    "LossParameter.NormalizationMode": [('FULL', 0), ('VALID', 1), ('BATCH_SIZE', 2), ('NONE', 3)],
    "DataParameter.DB": [('LEVELDB', 0), ('LMDB', 1)],
    "ConvolutionParameter.Engine": [('DEFAULT', 0), ('CAFFE', 1), ('CUDNN', 2)],
    "PoolingParameter.PoolMethod": [('MAX', 0), ('AVE', 1), ('STOCHASTIC', 2)],
    "PoolingParameter.Engine": [('DEFAULT', 0), ('CAFFE', 1), ('CUDNN', 2)],
    "PoolingParameter.RoundMode": [('CEIL', 0), ('FLOOR', 1)],
    "EltwiseParameter.EltwiseOp": [('PROD', 0), ('SUM', 1), ('MAX', 2)],
    "ReLUParameter.Engine": [('DEFAULT', 0), ('CAFFE', 1), ('CUDNN', 2)],
    "LRNParameter.NormRegion": [('ACROSS_CHANNELS', 0), ('WITHIN_CHANNEL', 1)],
    "LRNParameter.Engine": [('DEFAULT', 0), ('CAFFE', 1), ('CUDNN', 2)],
    "SoftmaxParameter.Engine": [('DEFAULT', 0), ('CAFFE', 1), ('CUDNN', 2)],
    "SigmoidParameter.Engine": [('DEFAULT', 0), ('CAFFE', 1), ('CUDNN', 2)],
    "TanHParameter.Engine": [('DEFAULT', 0), ('CAFFE', 1), ('CUDNN', 2)],
    "PriorBoxParameter.CodeType": [('CORNER', 1), ('CENTER_SIZE', 2), ('CORNER_SIZE', 3)],
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(name="omct_caffe.proto", package=_PACKAGE, syntax="proto2")
    for ename, values in _ENUMS.items():
        if "." not in ename:
            fdp.enum_type.add(name=ename).value.extend(
                descriptor_pb2.EnumValueDescriptorProto(name=v, number=n) for v, n in values)
    for mname, fields in _MESSAGES.items():
        msg = fdp.message_type.add(name=mname)
        for ename, values in _ENUMS.items():
            if ename.startswith(mname + "."):
                msg.enum_type.add(name=ename.split(".", 1)[1]).value.extend(
                    descriptor_pb2.EnumValueDescriptorProto(name=v, number=n) for v, n in values)
        for fname, number, label, ftype, *default in fields:
            f = msg.field.add(name=fname, number=number, label=_LABELS[label[0]])
            if label.endswith("p"):
                f.options.packed = True
            if ftype in _SCALARS:
                f.type = _SCALARS[ftype]
            elif ftype in _MESSAGES:
                f.type, f.type_name = _F.TYPE_MESSAGE, f".{_PACKAGE}.{ftype}"
            else:
                qualified = f"{mname}.{ftype}" if f"{mname}.{ftype}" in _ENUMS else ftype
                if qualified not in _ENUMS:
                    raise ValueError(f"caffe schema: {mname}.{fname} has unknown type {ftype}")
                f.type, f.type_name = _F.TYPE_ENUM, f".{_PACKAGE}.{qualified}"
            if default:
                value = default[0]
                f.default_value = str(float(value)) if ftype in ("float", "double") else value
    return fdp


@functools.lru_cache(maxsize=1)
def _classes() -> dict[str, type]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name in _MESSAGES}


def message_class(name: str) -> type:
    """The generated class of a Caffe message (``NetParameter``, ``BlobProto``, ...)."""
    return _classes()[name]


def v1_type_names() -> dict[int, str]:
    """V1 ``LayerType`` enum value -> the layer type string of the current format (``CONVOLUTION`` ->
    ``Convolution``), as Caffe's own upgrade maps them."""
    special = {"ABSVAL": "AbsVal", "ARGMAX": "ArgMax", "BNLL": "BNLL", "HDF5_DATA": "HDF5Data",
               "HDF5_OUTPUT": "HDF5Output", "IM2COL": "Im2col", "LRN": "LRN", "MVN": "MVN", "RELU": "ReLU",
               "TANH": "TanH", "SOFTMAX_LOSS": "SoftmaxWithLoss", "INNER_PRODUCT": "InnerProduct"}
    out = {}
    for name, number in _ENUMS["V1LayerParameter.LayerType"]:
        out[number] = special.get(name) or "".join(part.capitalize() for part in name.split("_"))
    return out
