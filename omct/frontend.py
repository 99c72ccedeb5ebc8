"""The frontend contract: what every frontend (ONNX, PyTorch, later TensorFlow and Caffe) hands to the shared
flows, so that config writing, calibration, export, analysis and the automatic searches are written once.

A frontend turns the user's model into a ``PreparedModel``: a normalised ONNX graph whose quantizable nodes are
named after the user's layers, the layers found by the op handlers, the candidates refused with their reasons,
and the frontend's own type names (what ``skip_layer_types`` / ``override_layer_types`` say). It also gives a
calibration runner that feeds ``omct.quantize.Calibration`` (an ONNX Runtime session, or hooks in PyTorch),
and for the automatic search the objects its users evaluate (``AutoTarget`` in ``omct.auto.flow``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from omct.formats.config import LayerInfo
from omct.graph.ops import LayerSpec, Refusal


@dataclass
class PreparedModel:
    model: onnx.ModelProto  # normalised (opset, names, constants; BatchNorm folded when asked)
    layers: list[LayerSpec]  # quantizable, in graph order, named as the user knows them
    refused: list[Refusal]  # candidates left in float, with reasons
    layer_types: dict[str, str]  # layer name -> the frontend's type name (Conv for ONNX, Conv2d for PyTorch)
    description: str  # how messages name the model: "'model.onnx'", "the ResNet model"
    all_names: set[str] = field(default_factory=set)  # every name skip_layers may give (for "did you mean")
    type_names: set[str] = field(default_factory=set)  # every type the frontend quantizes (a .cfg type outside is an error)

    def layer_infos(self) -> list[LayerInfo]:
        """The candidates as config.json's builder sees them: quantizable ones, then refused ones."""
        infos = [LayerInfo(s.name, self.layer_types.get(s.name, s.op_type), s.weight is not None,
                           nuq_refusal=s.nuq_refusal) for s in self.layers]
        infos += [LayerInfo(r.name, r.op_type, False, quantizable=False) for r in self.refused]
        return infos
