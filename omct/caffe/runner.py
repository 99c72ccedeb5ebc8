"""Running Caffe files without Caffe: ``Net(model_file, weights_file)`` converts them and runs them in ONNX Runtime
with pycaffe's ``forward(**{"data": x}) -> {blob: array}``.

During ``auto_nuq``'s calibration the evaluator's ``eval_model`` gets a calibration pair (prototxt +
caffemodel); opened with ``Net`` or with OpenCV's ``cv2.dnn.readNetFromCaffe``, that pair runs through omct's
calibration session, so the evaluator calibrates by evaluating, as AMCT's Caffe edition does.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import numpy as np

from omct.caffe.convert import convert
from omct.caffe.netio import load_net
from omct.feeds import FeedCheck
from omct.quantize import ort_session

_calibrating: dict[str, Any] = {}  # realpath of a calibration prototxt -> its calibration session


class Net:
    """A Caffe model run by ONNX Runtime, with pycaffe's call: ``Net(model_file, weights_file).forward(data=x)``
    returns ``{output blob: array}``. ``phase`` is accepted for pycaffe's signature (omct runs the test phase)."""

    def __init__(self, model_file: str | os.PathLike, weights_file: str | os.PathLike, phase: Any = None):
        session = _calibrating.get(os.path.realpath(model_file))
        if session is None:
            conversion = convert(load_net(model_file, weights_file), str(weights_file))
            session = ort_session(conversion.model.SerializeToString())
        self._session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]
        self._feeds = FeedCheck(session.get_inputs(), "Net.forward")

    def forward(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        values = self._session.run(None, self._feeds.check(feeds))
        return dict(zip(self.outputs, values, strict=True))


class _OpenCVNet:
    """What ``cv2.dnn.readNetFromCaffe`` returns for the calibration pair: ``setInput`` then ``forward``."""

    def __init__(self, net: Net):
        self._net, self._inputs = net, {}

    def setInput(self, blob, name: str = "", scalefactor: float = 1.0, mean=None) -> None:  # noqa: N802 - OpenCV's name
        x = np.asarray(blob, np.float32)
        if mean is not None:  # OpenCV: (blob - mean) * scalefactor
            x = x - np.asarray(mean, np.float32)[: x.shape[1]].reshape(1, -1, 1, 1)
        self._inputs[name or self._net.inputs[0]] = x * np.float32(scalefactor)

    def forward(self, outputName=None):  # noqa: N803 - OpenCV's name
        out = self._net.forward(**self._inputs)
        if isinstance(outputName, list | tuple):
            return [out[n] for n in outputName]
        return out[outputName] if outputName else out[self._net.outputs[-1]]


@contextmanager
def calibrating(model_file: str | os.PathLike, session: Any):
    """While the evaluator calibrates: ``Net(model_file, ...)``, ``cv2.dnn.readNetFromCaffe(model_file, ...)`` and
    ``cv2.dnn.readNet`` of it run ``session`` (the calibration session); every other file opens as usual."""
    key = os.path.realpath(model_file)
    _calibrating[key] = session
    patched = None
    try:
        import cv2

        real_caffe, real_any = cv2.dnn.readNetFromCaffe, cv2.dnn.readNet

        def ours(*paths) -> bool:
            return any(isinstance(p, str | os.PathLike) and os.path.realpath(p) == key for p in paths)

        def read_caffe(prototxt, caffe_model=None, *args, **kwargs):
            if ours(prototxt):
                return _OpenCVNet(Net(prototxt, caffe_model))
            return real_caffe(prototxt, *([caffe_model] if caffe_model is not None else []), *args, **kwargs)

        def read_any(model, config="", *args, **kwargs):  # readNet(weights, prototxt) or (prototxt, weights)
            if ours(model, config):
                return _OpenCVNet(Net(key, config if ours(model) else model))
            return real_any(model, config, *args, **kwargs)

        cv2.dnn.readNetFromCaffe, cv2.dnn.readNet = read_caffe, read_any
        patched = (cv2, real_caffe, real_any)
    except ImportError:  # OpenCV is optional: Net still calibrates
        pass
    try:
        yield
    finally:
        _calibrating.pop(key, None)
        if patched is not None:
            patched[0].dnn.readNetFromCaffe, patched[0].dnn.readNet = patched[1], patched[2]
