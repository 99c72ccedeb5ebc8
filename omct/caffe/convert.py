"""Caffe network -> ONNX graph, layer by layer, with Caffe's own arithmetic where it differs from ONNX's.

* Pooling rounds its output size up (``round_mode: CEIL``, Caffe's default) and drops a last window that starts
  in the padding; the ONNX pool gets the end padding that yields exactly Caffe's size (``ceil_mode`` 0). An
  average divides by the window clipped to the padded input, never to the extra end padding (a zero ``Pad``
  in front when the declared padding and the extra padding would need different rules).
* BatchNorm (mean, variance and the moving-average factor blob) and the Scale that follows it become one ONNX
  ``BatchNormalization``, which the shared normalisation folds into the Convolution before it (``do_fusion``).
* Eltwise SUM multiplies by its coefficients, PROD and MAX map to Mul and Max.
* Blobs written in place (``top == bottom``) get one ONNX tensor per write; the last write keeps the blob's
  name, so graph outputs are named as Caffe names its output blobs.

The node that computes a layer carries the layer's name; helper nodes are named ``layer/what``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from omct.caffe.netio import blob_array
from omct.errors import ModelError

OPSET = 17

#: Caffe layer type -> what omct does with it
SUPPORTED = ("Input", "Convolution", "Deconvolution", "InnerProduct", "Pooling", "ReLU", "PReLU", "Sigmoid", "TanH",
             "BatchNorm", "Scale", "Bias", "Eltwise", "Concat", "Softmax", "Flatten", "Reshape", "Dropout", "Split",
             "LRN", "Permute", "Normalize", "PriorBox", "MemoryData")
DATA_TYPES = ("Data", "ImageData", "HDF5Data", "WindowData", "DummyData", "AnnotatedData", "Python")

#: ONNX op of a layer's main node -> the Caffe type name that config.json and .cfg overrides use, for helper nodes
#: that have no Caffe layer of their own
HELPER_TYPES = {"Flatten": "Flatten", "Reshape": "Reshape", "Pad": "Pad", "Transpose": "Permute"}


@dataclass
class Conversion:
    model: onnx.ModelProto
    layer_types: dict[str, str]  # ONNX node name -> Caffe type (the layer's, or the helper op's)
    inputs: dict[str, tuple[int, ...]]  # input blob -> shape as declared
    outputs: list[str]  # output blobs
    merged: dict[str, list[str]] = field(default_factory=dict)  # BatchNormalization node -> Caffe layers in it
    constraints: dict[str, str] = field(default_factory=dict)  # layer -> why AMCT's Caffe edition keeps it float
    params: dict[str, object] = field(default_factory=dict)  # layer name -> its LayerParameter


def _pairs(values, single_h, single_w, default: int, what: str, layer) -> tuple[int, int]:
    """A Caffe (h, w) pair from ``x_h``/``x_w`` or the repeated ``x`` (one value for both, or two)."""
    if single_h is not None or single_w is not None:
        return int(single_h or default), int(single_w or default)
    values = list(values)
    if not values:
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise ModelError(f"layer '{layer.name}' ({layer.type}): {len(values)} {what} values; omct converts 2-D layers only")


def _opt(msg, name):
    return getattr(msg, name) if msg.HasField(name) else None


class _Converter:
    def __init__(self, net, weights_file: str):
        self.net, self.weights_file = net, weights_file
        self.nodes: list[onnx.NodeProto] = []
        self.model = onnx.ModelProto()  # initializers are written into it directly: copying them costs
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.current: dict[str, str] = {}  # blob -> ONNX tensor holding its latest value
        self.types: dict[str, str] = {}
        self.merged: dict[str, list[str]] = {}
        self.constraints: dict[str, str] = {}
        self.inputs: dict[str, tuple[int, ...]] = {}
        self.skip: set[int] = set()
        self._names: set[str] = set()
        self.last_writer = self._last_writers()

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _last_writers(self) -> dict[str, int]:
        last = {}
        for i, layer in enumerate(self.net.layer):
            if layer.type in ("Dropout", "Split"):
                continue
            for t in layer.top:
                last[t] = i
        return last

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def top_name(self, index: int, blob: str) -> str:
        return self.unique(blob if self.last_writer.get(blob) == index else f"{blob}@{self.net.layer[index].name}")

    def const(self, array: np.ndarray, base: str) -> str:
        name = self.unique(base)
        self._initializer(np.asarray(array), name)
        return name

    def _initializer(self, array: np.ndarray, name: str) -> None:
        t = self.model.graph.initializer.add(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        t.dims.extend(array.shape)
        t.raw_data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()

    def node(self, op: str, inputs: list[str], output: str, name: str, layer_type: str | None = None, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        if layer_type is not None:
            self.types[name] = layer_type
        return output

    def bottom(self, layer, i: int = 0) -> str:
        if i >= len(layer.bottom):
            raise ModelError(f"layer '{layer.name}' ({layer.type}) needs {i + 1} bottom blob(s), has {len(layer.bottom)}")
        blob = layer.bottom[i]
        if blob not in self.current:
            raise ModelError(f"layer '{layer.name}' ({layer.type}) reads blob '{blob}', which no layer before it produces")
        return self.current[blob]

    def shape(self, tensor: str) -> tuple[int, ...]:
        return self.shapes[tensor]

    def blob(self, layer, i: int, expected: tuple[int, ...], role: str) -> np.ndarray:
        if len(layer.blobs) <= i:
            what = "weights" if not len(layer.blobs) else f"blob {i} ({role})"
            raise ModelError(f"layer '{layer.name}' ({layer.type}) has no {what} in weights_file '{self.weights_file}'")
        try:
            arr = blob_array(layer.blobs[i])
        except ValueError as e:
            raise ModelError(f"weights_file '{self.weights_file}': layer '{layer.name}' blob {i} ({role}): {e}") from None
        if arr.shape != tuple(expected):
            squeezed = tuple(d for d in arr.shape if d != 1) == tuple(d for d in expected if d != 1)
            if not (squeezed and arr.size == int(np.prod(expected)) and not layer.blobs[i].HasField("shape")):
                raise ModelError(f"weights_file '{self.weights_file}': layer '{layer.name}' ({layer.type}) blob {i} "
                                 f"({role}) has shape {tuple(arr.shape)} but the prototxt needs {tuple(expected)}")
            arr = arr.reshape(expected)  # legacy 4-D blob (1, 1, out, in) of an old file
        return arr

    # -- the net -------------------------------------------------------------------------------------------------
    def run(self) -> Conversion:
        net = self.net
        self._net_inputs()
        layers = list(net.layer)
        for i, layer in enumerate(layers):
            if i in self.skip:
                continue
            handler = getattr(self, f"_{layer.type.lower()}", None)
            if layer.type in DATA_TYPES:
                raise ModelError(f"layer '{layer.name}' ({layer.type}) reads a dataset and declares no shape; give the "
                                 "deploy prototxt (an Input layer, or input + input_shape)")
            if layer.type not in SUPPORTED or handler is None:
                raise ModelError(f"layer '{layer.name}' has type '{layer.type}', which omct cannot convert; supported: "
                                 + ", ".join(SUPPORTED))
            try:
                handler(i, layer)
            except ModelError:
                raise
            except (ValueError, ZeroDivisionError, IndexError) as e:
                raise ModelError(f"layer '{layer.name}' ({layer.type}): {e}") from None
        if not self.inputs:
            raise ModelError("the prototxt declares no input (an Input layer, or input + input_shape / input_dim)")
        written: dict[str, int] = {}
        read: dict[str, int] = {}
        for i, layer in enumerate(layers):
            read.update((b, i) for b in layer.bottom)
            written.update((t, i) for t in layer.top if t not in self.inputs)
        # an output blob: no layer reads its last value (an in-place layer reads the value before its write)
        outputs = [t for t, i in written.items() if read.get(t, -1) <= i]
        # a blob whose last value comes from an alias (Dropout) is renamed to the blob's name
        for t in outputs:
            if self.current[t] != t:
                self.node("Identity", [self.current[t]], self.unique(t), self.unique(f"{t}/output"))
                self.shapes[t] = self.shapes[self.current[t]]
                self.current[t] = t
        model = self.model
        graph = model.graph
        graph.name = net.name or "caffe"
        graph.node.extend(self.nodes)
        graph.input.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", *s[1:]]) for n, s in self.inputs.items())
        graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in outputs)
        model.opset_import.append(helper.make_opsetid("", OPSET))
        model.producer_name, model.ir_version = "omct.caffe", 8
        return Conversion(model, self.types, dict(self.inputs), outputs, self.merged, self.constraints,
                          {layer.name: layer for layer in layers})

    def _add_input(self, name: str, shape: tuple[int, ...]) -> None:
        if any(d <= 0 for d in shape) or not shape:
            raise ModelError(f"input '{name}' has shape {shape}; every dimension must be positive")
        self._names.add(name)
        self.inputs[name] = tuple(shape)
        self.current[name] = name
        self.shapes[name] = tuple(shape)

    def _net_inputs(self) -> None:
        net = self.net
        dims = list(net.input_dim)
        for k, name in enumerate(net.input):
            if len(net.input_shape) > k:
                shape = tuple(int(d) for d in net.input_shape[k].dim)
            elif len(dims) >= 4 * (k + 1):
                shape = tuple(int(d) for d in dims[4 * k:4 * k + 4])
            else:
                raise ModelError(f"input '{name}' has no shape (input_shape or input_dim)")
            self._add_input(name, shape)

    # -- layers ----------------------------------------------------------------------------------------------------
    def _input(self, i, layer):
        shapes = list(layer.input_param.shape)
        if not shapes:
            raise ModelError(f"layer '{layer.name}' (Input) has no input_param.shape")
        for k, top in enumerate(layer.top):
            self._add_input(top, tuple(int(d) for d in shapes[min(k, len(shapes) - 1)].dim))

    def _memorydata(self, i, layer):
        p = layer.memory_data_param
        self._add_input(layer.top[0], (int(p.batch_size), int(p.channels), int(p.height), int(p.width)))

    def _set(self, i, layer, tensor: str, shape: tuple[int, ...], k: int = 0) -> None:
        self.current[layer.top[k]] = tensor
        self.shapes[tensor] = tuple(int(d) for d in shape)

    def _out(self, i, layer, k: int = 0) -> str:
        return self.top_name(i, layer.top[k])

    def _convolution(self, i, layer, transposed: bool = False):
        p = layer.convolution_param
        x = self.bottom(layer)
        shape = self.shape(x)
        if p.axis != 1 or len(shape) != 4:
            raise ModelError(f"layer '{layer.name}' ({layer.type}): axis {p.axis} on a rank-{len(shape)} input; omct "
                             "converts 2-D convolutions (axis 1, NCHW)")
        kh, kw = _pairs(p.kernel_size, _opt(p, "kernel_h"), _opt(p, "kernel_w"), 0, "kernel_size", layer)
        sh, sw = _pairs(p.stride, _opt(p, "stride_h"), _opt(p, "stride_w"), 1, "stride", layer)
        ph, pw = _pairs(p.pad, _opt(p, "pad_h"), _opt(p, "pad_w"), 0, "pad", layer)
        dh, dw = _pairs(p.dilation, None, None, 1, "dilation", layer)
        if not kh or not kw:
            raise ModelError(f"layer '{layer.name}' ({layer.type}) has no kernel_size")
        group, cin, out = int(p.group), shape[1], int(p.num_output)
        if group < 1 or cin % group or out % group:
            raise ModelError(f"layer '{layer.name}' ({layer.type}): group {group} does not divide {cin} input and "
                             f"{out} output channels")
        wshape = (cin, out // group, kh, kw) if transposed else (out, cin // group, kh, kw)
        w = self.blob(layer, 0, wshape, "weights")
        inputs = [x, self.const(w, f"{layer.name}/weights")]
        if p.bias_term:
            inputs.append(self.const(self.blob(layer, 1, (out,), "bias"), f"{layer.name}/bias"))
        ext_h, ext_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        if transposed:
            oh, ow = sh * (shape[2] - 1) + ext_h - 2 * ph, sw * (shape[3] - 1) + ext_w - 2 * pw
        else:
            oh, ow = (shape[2] + 2 * ph - ext_h) // sh + 1, (shape[3] + 2 * pw - ext_w) // sw + 1
        if oh <= 0 or ow <= 0:
            raise ModelError(f"layer '{layer.name}' ({layer.type}): output size {oh}x{ow} from input {shape[2]}x{shape[3]}")
        y = self.node("ConvTranspose" if transposed else "Conv", inputs, self._out(i, layer), layer.name, layer.type,
                      kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw], dilations=[dh, dw], group=group)
        self._set(i, layer, y, (shape[0], out, oh, ow))

    def _deconvolution(self, i, layer):
        self._convolution(i, layer, transposed=True)

    def _innerproduct(self, i, layer):
        p = layer.inner_product_param
        x = self.bottom(layer)
        shape = self.shape(x)
        axis = p.axis % len(shape)
        k, out = int(np.prod(shape[axis:])), int(p.num_output)
        w = self.blob(layer, 0, (k, out) if p.transpose else (out, k), "weights")
        if axis != 1 or p.transpose:
            self.constraints[layer.name] = (f"axis {p.axis}, transpose {str(p.transpose).lower()}: AMCT quantizes "
                                            "InnerProduct with axis 1 and no transpose")
        flat = x
        if len(shape) != 2 or axis != 1:
            flat = self.node("Flatten", [x], self.unique(f"{layer.name}/flatten"), self.unique(f"{layer.name}/flatten"),
                             "Flatten", axis=axis)
            self.shapes[flat] = (int(np.prod(shape[:axis])), k)
        inputs = [flat, self.const(w, f"{layer.name}/weights")]
        if p.bias_term:
            inputs.append(self.const(self.blob(layer, 1, (out,), "bias"), f"{layer.name}/bias"))
        final = self._out(i, layer)
        gemm_out = final if axis == 1 else self.unique(f"{layer.name}/gemm")
        y = self.node("Gemm", inputs, gemm_out, layer.name, layer.type, transB=0 if p.transpose else 1)
        if axis != 1:
            target = self.const(np.array([-1, *shape[1:axis], out], np.int64), f"{layer.name}/shape")
            y = self.node("Reshape", [gemm_out, target], final, self.unique(f"{layer.name}/reshape"), "Reshape")
        self._set(i, layer, y, (*shape[:axis], out))

    def _pooling(self, i, layer):
        p = layer.pooling_param
        x = self.bottom(layer)
        shape = self.shape(x)
        method = {0: "MAX", 1: "AVE"}.get(p.pool)
        if method is None:
            raise ModelError(f"layer '{layer.name}' (Pooling): pool STOCHASTIC is a training-time method; omct converts "
                             "MAX and AVE")
        out_name = self._out(i, layer)
        if p.global_pooling:
            y = self.node("GlobalMaxPool" if method == "MAX" else "GlobalAveragePool", [x], out_name, layer.name,
                          layer.type)
            self._set(i, layer, y, (*shape[:2], 1, 1))
            return
        kh, kw = (int(p.kernel_h), int(p.kernel_w)) if p.HasField("kernel_h") else (int(p.kernel_size),) * 2
        sh, sw = (int(p.stride_h), int(p.stride_w)) if p.HasField("stride_h") else (int(p.stride),) * 2
        ph, pw = (int(p.pad_h), int(p.pad_w)) if p.HasField("pad_h") or p.HasField("pad_w") else (int(p.pad),) * 2
        if not kh or not kw:
            raise ModelError(f"layer '{layer.name}' (Pooling) has no kernel_size (and no global_pooling)")
        size, ends = [], []
        for n, k, s, pad in ((shape[2], kh, sh, ph), (shape[3], kw, sw, pw)):
            span = (n + 2 * pad - k) / s
            o = (math.floor(span) if p.round_mode == 1 else math.ceil(span)) + 1
            if pad and (o - 1) * s >= n + pad:  # Caffe drops a last window that starts in the padding
                o -= 1
            size.append(o)
            ends.append(max(0, (o - 1) * s + k - n - pad))
        pads_begin = [ph, pw]
        attrs = {"kernel_shape": [kh, kw], "strides": [sh, sw]}
        if method == "MAX":
            y = self.node("MaxPool", [x], out_name, layer.name, layer.type, pads=pads_begin + ends, **attrs)
        elif all(e <= b for e, b in zip(ends, pads_begin, strict=True)):
            y = self.node("AveragePool", [x], out_name, layer.name, layer.type, pads=pads_begin + ends,
                          count_include_pad=1, **attrs)
        elif not any(pads_begin):
            y = self.node("AveragePool", [x], out_name, layer.name, layer.type, pads=[0, 0] + ends, count_include_pad=0,
                          **attrs)
        else:  # the declared padding counts in the divisor, the extra end padding does not
            pads = self.const(np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64), f"{layer.name}/pads")
            padded = self.node("Pad", [x, pads], self.unique(f"{layer.name}/padded"), self.unique(f"{layer.name}/pad"),
                               "Pad")
            self.shapes[padded] = (shape[0], shape[1], shape[2] + 2 * ph, shape[3] + 2 * pw)
            extra = [max(0, e - b) for e, b in zip(ends, pads_begin, strict=True)]
            y = self.node("AveragePool", [padded], out_name, layer.name, layer.type, pads=[0, 0] + extra,
                          count_include_pad=0, **attrs)
        self._set(i, layer, y, (shape[0], shape[1], *size))

    def _unary(self, i, layer, op: str, **attrs):
        x = self.bottom(layer)
        y = self.node(op, [x], self._out(i, layer), layer.name, layer.type, **attrs)
        self._set(i, layer, y, self.shape(x))

    def _relu(self, i, layer):
        slope = layer.relu_param.negative_slope
        if slope:
            self._unary(i, layer, "LeakyRelu", alpha=float(slope))
        else:
            self._unary(i, layer, "Relu")

    def _sigmoid(self, i, layer):
        self._unary(i, layer, "Sigmoid")

    def _tanh(self, i, layer):
        self._unary(i, layer, "Tanh")

    def _channel_shape(self, x: str, values: np.ndarray, axis: int = 1) -> np.ndarray:
        """``values`` (one per channel of ``axis``) shaped to broadcast against ``x``."""
        rank = len(self.shape(x))
        return values.reshape((-1,) + (1,) * (rank - 1 - axis))

    def _prelu(self, i, layer):
        x = self.bottom(layer)
        channels = 1 if layer.prelu_param.channel_shared else self.shape(x)[1]
        slope = self.blob(layer, 0, (channels,), "slope")
        s = self.const(self._channel_shape(x, slope) if channels > 1 else slope, f"{layer.name}/slope")
        y = self.node("PRelu", [x, s], self._out(i, layer), layer.name, layer.type)
        self._set(i, layer, y, self.shape(x))

    def _consumers(self, i: int, blob: str) -> list[int]:
        """Layers after ``i`` that read the value of ``blob`` that layer ``i`` writes (until it is rewritten)."""
        found = []
        for j in range(i + 1, len(self.net.layer)):
            other = self.net.layer[j]
            if blob in other.bottom:
                found.append(j)
            if blob in other.top and other.type not in ("Dropout", "Split"):
                break
        return found

    def _batchnorm(self, i, layer):
        x = self.bottom(layer)
        shape = self.shape(x)
        c = shape[1]
        mean, var = self.blob(layer, 0, (c,), "mean"), self.blob(layer, 1, (c,), "variance")
        factor = float(self.blob(layer, 2, (1,), "moving-average factor").reshape(-1)[0]) if len(layer.blobs) > 2 else 1.0
        factor = 0.0 if factor == 0 else 1.0 / factor
        gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
        names, k = [layer.name], i
        users = self._consumers(i, layer.top[0])
        if len(users) == 1:
            nxt = self.net.layer[users[0]]
            sp = nxt.scale_param
            if (nxt.type == "Scale" and len(nxt.bottom) == 1 and sp.axis == 1 and sp.num_axes == 1
                    and users[0] == i + 1):
                gamma = self.blob(nxt, 0, (c,), "scale")
                if sp.bias_term:
                    beta = self.blob(nxt, 1, (c,), "bias")
                names.append(nxt.name)
                self.skip.add(users[0])
                k = users[0]
        out = self.top_name(k, self.net.layer[k].top[0])
        inputs = [x] + [self.const(v.astype(np.float32), f"{layer.name}/{n}") for v, n in
                        ((gamma, "scale"), (beta, "bias"), (mean * factor, "mean"), (var * factor, "variance"))]
        y = self.node("BatchNormalization", inputs, out, layer.name, layer.type,
                      epsilon=float(layer.batch_norm_param.eps))
        self.merged[layer.name] = names
        self._set(k, self.net.layer[k], y, shape)

    def _scale(self, i, layer, bias_only: bool = False):
        x = self.bottom(layer)
        shape = self.shape(x)
        p = layer.bias_param if bias_only else layer.scale_param
        if len(layer.bottom) != 1:
            raise ModelError(f"layer '{layer.name}' ({layer.type}) with a second bottom (a run-time factor) is not "
                             "supported; only learned per-channel factors")
        axis = p.axis % len(shape)
        count = len(shape) - axis if p.num_axes == -1 else p.num_axes
        pshape = shape[axis:axis + count]
        y = x
        if not bias_only:
            gamma = self.blob(layer, 0, pshape, "scale").reshape(pshape + (1,) * (len(shape) - axis - count))
            last = not layer.scale_param.bias_term
            y = self.node("Mul", [x, self.const(gamma, f"{layer.name}/scale")],
                          self._out(i, layer) if last else self.unique(f"{layer.name}/scaled"),
                          layer.name if last else self.unique(f"{layer.name}/mul"), layer.type if last else None)
        if bias_only or layer.scale_param.bias_term:
            beta = self.blob(layer, 0 if bias_only else 1, pshape, "bias")
            beta = beta.reshape(pshape + (1,) * (len(shape) - axis - count))
            y = self.node("Add", [y, self.const(beta, f"{layer.name}/bias")], self._out(i, layer), layer.name)
        self._set(i, layer, y, shape)

    def _bias(self, i, layer):
        self._scale(i, layer, bias_only=True)

    def _eltwise(self, i, layer):
        p = layer.eltwise_param
        xs = [self.bottom(layer, k) for k in range(len(layer.bottom))]
        if len(xs) < 2:
            raise ModelError(f"layer '{layer.name}' (Eltwise) needs at least 2 bottoms")
        shape = self.shape(xs[0])
        op = {0: "Mul", 1: "Add", 2: "Max"}[p.operation]
        coeff = list(p.coeff)
        if coeff and (op != "Add" or len(coeff) != len(xs)):
            raise ModelError(f"layer '{layer.name}' (Eltwise): {len(coeff)} coefficients for {len(xs)} bottoms"
                             + ("" if op == "Add" else " (coefficients apply to SUM only)"))
        if op == "Add":
            for k, c in enumerate(coeff):
                if c != 1.0:
                    xs[k] = self.node("Mul", [xs[k], self.const(np.array(c, np.float32), f"{layer.name}/coeff{k}")],
                                      self.unique(f"{layer.name}/scaled{k}"), self.unique(f"{layer.name}/coeff{k}"))
        if op == "Max":
            y = self.node("Max", xs, self._out(i, layer), layer.name, layer.type)
        else:
            acc = xs[0]
            for k, other in enumerate(xs[1:], start=1):
                last = k == len(xs) - 1
                acc = self.node(op, [acc, other], self._out(i, layer) if last else self.unique(f"{layer.name}/partial{k}"),
                                layer.name if last else self.unique(f"{layer.name}/{op.lower()}{k}"),
                                layer.type if last else None)
            y = acc
        self._set(i, layer, y, shape)

    def _concat(self, i, layer):
        p = layer.concat_param
        xs = [self.bottom(layer, k) for k in range(len(layer.bottom))]
        shapes = [self.shape(x) for x in xs]
        axis = (p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim) % len(shapes[0])
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        y = self.node("Concat", xs, self._out(i, layer), layer.name, layer.type, axis=axis)
        self._set(i, layer, y, tuple(out))

    def _softmax(self, i, layer):
        x = self.bottom(layer)
        self._unary(i, layer, "Softmax", axis=int(layer.softmax_param.axis) % len(self.shape(x)))

    def _reshape_to(self, i, layer, target: list[int], shape: tuple[int, ...]):
        x = self.bottom(layer)
        t = self.const(np.array(target, np.int64), f"{layer.name}/shape")
        y = self.node("Reshape", [x, t], self._out(i, layer), layer.name, layer.type)
        self._set(i, layer, y, shape)

    def _flatten(self, i, layer):
        p = layer.flatten_param
        shape = self.shape(self.bottom(layer))
        a, e = p.axis % len(shape), p.end_axis % len(shape)
        out = (*shape[:a], int(np.prod(shape[a:e + 1])), *shape[e + 1:])
        self._reshape_to(i, layer, [0] * a + [-1] + list(shape[e + 1:]), out)

    def _reshape(self, i, layer):
        p = layer.reshape_param
        shape = self.shape(self.bottom(layer))
        axis = p.axis % (len(shape) + 1) if p.axis < 0 else p.axis
        end = len(shape) if p.num_axes == -1 else axis + p.num_axes
        spec = [int(d) for d in p.shape.dim]
        dims = [shape[axis + k] if d == 0 else d for k, d in enumerate(spec)]
        full = list(shape[:axis]) + dims + list(shape[end:])
        if -1 in full:
            known = int(np.prod([d for d in full if d != -1]))
            full[full.index(-1)] = int(np.prod(shape)) // known
        if int(np.prod(full)) != int(np.prod(shape)):
            raise ModelError(f"layer '{layer.name}' (Reshape): cannot reshape {shape} to {tuple(full)}")
        if axis > 0 or (spec and spec[0] == 0):
            target = [0] + full[1:]  # the batch dimension stays free
        else:
            target = spec + list(shape[end:])
        self._reshape_to(i, layer, target, tuple(full))

    def _alias(self, i, layer):
        x = self.bottom(layer)
        for k in range(len(layer.top)):
            self.current[layer.top[k]] = x

    _dropout = _alias
    _split = _alias

    def _lrn(self, i, layer):
        p = layer.lrn_param
        x = self.bottom(layer)
        shape = self.shape(x)
        size = int(p.local_size)
        if p.norm_region == 0:
            self._unary(i, layer, "LRN", size=size, alpha=float(p.alpha), beta=float(p.beta), bias=float(p.k))
            return
        # WITHIN_CHANNEL: x / (1 + alpha * mean of x^2 over a size x size window, zero-padded) ^ beta
        pad = (size - 1) // 2
        sq = self.node("Mul", [x, x], self.unique(f"{layer.name}/square"), self.unique(f"{layer.name}/square"))
        avg = self.node("AveragePool", [sq], self.unique(f"{layer.name}/window"), self.unique(f"{layer.name}/window"),
                        kernel_shape=[size, size], pads=[pad, pad, size - 1 - pad, size - 1 - pad], count_include_pad=1)
        scaled = self.node("Mul", [avg, self.const(np.array(p.alpha, np.float32), f"{layer.name}/alpha")],
                           self.unique(f"{layer.name}/scaled"), self.unique(f"{layer.name}/alpha"))
        base = self.node("Add", [scaled, self.const(np.array(1.0, np.float32), f"{layer.name}/one")],
                         self.unique(f"{layer.name}/base"), self.unique(f"{layer.name}/base"))
        den = self.node("Pow", [base, self.const(np.array(-p.beta, np.float32), f"{layer.name}/beta")],
                        self.unique(f"{layer.name}/factor"), self.unique(f"{layer.name}/pow"))
        y = self.node("Mul", [x, den], self._out(i, layer), layer.name, layer.type)
        self._set(i, layer, y, shape)

    def _permute(self, i, layer):
        x = self.bottom(layer)
        shape = self.shape(x)
        order = [int(o) for o in layer.permute_param.order]
        order += [a for a in range(len(shape)) if a not in order]
        if sorted(order) != list(range(len(shape))):
            raise ModelError(f"layer '{layer.name}' (Permute): order {order} is not a permutation of {len(shape)} axes")
        y = self.node("Transpose", [x], self._out(i, layer), layer.name, layer.type, perm=order)
        self._set(i, layer, y, tuple(shape[a] for a in order))

    def _normalize(self, i, layer):
        p = layer.norm_param
        x = self.bottom(layer)
        shape = self.shape(x)
        axes = list(range(1, len(shape))) if p.across_spatial else [1]
        ss = self.node("ReduceSumSquare", [x],
                       self.unique(f"{layer.name}/sumsq"), self.unique(f"{layer.name}/sumsq"), axes=axes, keepdims=1)
        eps = self.node("Add", [ss, self.const(np.array(p.eps, np.float32), f"{layer.name}/eps")],
                        self.unique(f"{layer.name}/sumsq_eps"), self.unique(f"{layer.name}/eps"))
        norm = self.node("Sqrt", [eps], self.unique(f"{layer.name}/norm"), self.unique(f"{layer.name}/sqrt"))
        unit = self.node("Div", [x, norm], self.unique(f"{layer.name}/unit"), self.unique(f"{layer.name}/div"))
        channels = 1 if p.channel_shared else shape[1]
        scale = self.blob(layer, 0, (channels,), "scale")
        s = self.const(self._channel_shape(x, scale) if channels > 1 else scale.reshape(()), f"{layer.name}/scale")
        y = self.node("Mul", [unit, s], self._out(i, layer), layer.name, layer.type)
        self._set(i, layer, y, shape)

    def _priorbox(self, i, layer):
        boxes = prior_boxes(layer.prior_box_param, self.shape(self.bottom(layer, 0)), self.shape(self.bottom(layer, 1)))
        name = self._out(i, layer)
        self._initializer(boxes, name)
        self._set(i, layer, name, boxes.shape)


def prior_boxes(p, feature: tuple[int, ...], image: tuple[int, ...]) -> np.ndarray:
    """SSD's PriorBox output (1, 2, H * W * priors * 4): corner boxes normalised to the image, then variances.
    It depends on shapes only, so it is a constant of the graph."""
    ratios = [1.0]
    for r in p.aspect_ratio:
        if all(abs(r - a) > 1e-6 for a in ratios):
            ratios.append(float(r))
            if p.flip:
                ratios.append(1.0 / r)
    mins, maxs = list(p.min_size), list(p.max_size)
    if not mins or (maxs and len(maxs) != len(mins)):
        raise ValueError(f"PriorBox needs min_size (and as many max_size): {len(mins)} and {len(maxs)} given")
    lh, lw = feature[2], feature[3]
    ih = p.img_h if p.HasField("img_h") else p.img_size if p.HasField("img_size") else image[2]
    iw = p.img_w if p.HasField("img_w") else p.img_size if p.HasField("img_size") else image[3]
    step_h = p.step_h if p.HasField("step_h") else p.step if p.HasField("step") else ih / lh
    step_w = p.step_w if p.HasField("step_w") else p.step if p.HasField("step") else iw / lw
    out = []
    for h in range(lh):
        for w in range(lw):
            cx, cy = (w + p.offset) * step_w, (h + p.offset) * step_h
            for s, m in enumerate(mins):
                sizes = [(m, m)] + ([(math.sqrt(m * maxs[s]),) * 2] if maxs else [])
                sizes += [(m * math.sqrt(r), m / math.sqrt(r)) for r in ratios if abs(r - 1.0) >= 1e-6]
                for bw, bh in sizes:
                    out.append([(cx - bw / 2) / iw, (cy - bh / 2) / ih, (cx + bw / 2) / iw, (cy + bh / 2) / ih])
    boxes = np.asarray(out, np.float32).reshape(-1)
    if p.clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    var = list(p.variance) or [0.1]
    if len(var) not in (1, 4):
        raise ValueError(f"PriorBox needs 1 or 4 variance values, has {len(var)}")
    variances = np.tile(np.asarray(var * (4 // len(var)), np.float32), boxes.size // 4)
    return np.stack([boxes, variances]).reshape(1, 2, -1)


def convert(net, weights_file: str = "the weights file") -> Conversion:
    """The ONNX graph (opset 17, batch dimension free) of a Caffe network whose layers carry their blobs."""
    return _Converter(net, str(weights_file)).run()
