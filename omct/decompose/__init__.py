"""Tensor decomposition of convolutions, shared by the frontends: which layers qualify and why not
(``plan``), the per-layer choice of form and rank with its ONNX Runtime latency check (``plan``, ``latency``),
and the ``decompose_info.json`` file (``info``). The numerics are in ``omct.core.decomposition``."""
