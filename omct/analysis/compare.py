"""Per-layer error between a float model and its omct-quantized model (fake-quant or deploy), on real data.

Two numbers per layer, both streamed over the batches:

* **accumulated**: the layer's result in the quantized model against the float model's, i.e. what the
  network really computes after every quantized layer up to this one;
* **isolated**: the layer alone quantized (its input and weights as in the quantized model) on the float
  model's own input to it. This is the layer's own sensitivity, and what automatic quantization ranks by.

The isolated result comes from a "probe" copy of each layer, built into the float graph: the quantized
model's nodes that feed the layer (quantize/dequantize of its input, its quantized weights) are copied next
to the float layer and read the float tensors. Only omct's saved models carry the layer list needed
(metadata written by ``save_model``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from omct.analysis.metrics import CosineSimilarity, ErrorStats, Sensitivity
from omct.errors import ModelError
from omct.graph.equalize import equalize
from omct.graph.export import toposort
from omct.graph.metadata import FUSION as FUSION_KEY
from omct.graph.metadata import LAYERS as LAYERS_KEY
from omct.graph.model_io import load_model, session_input
from omct.graph.normalize import fold_batchnorm, normalize
from omct.graph.subgraphs import all_graphs, carried_values, carry_out, local_names, locate, scope_of
from omct.ui import Progress, logger

_PROBE = "#isolated"


@dataclass
class LayerError:
    layer: str
    op_type: str
    tensor: str  # the tensor compared for the accumulated error
    accumulated: ErrorStats
    isolated: ErrorStats
    input_scale: float | None = None  # the scale the layer's input is quantized with (None: not recorded)
    input_range: tuple[float, float] | None = None
    clipped: int = 0  # float input values outside input_range, over all batches
    seen: int = 0

    @property
    def clipped_fraction(self) -> float | None:
        return self.clipped / self.seen if self.seen else None

    @property
    def cosine(self) -> float:
        return self.accumulated.cosine

    def row(self) -> dict:
        a, i = self.accumulated, self.isolated
        return {"layer": self.layer, "op_type": self.op_type, "cosine": a.cosine, "sqnr_db": a.sqnr_db,
                "max_abs_error": a.max_abs, "mse": a.mse, "isolated_cosine": i.cosine, "isolated_sqnr_db": i.sqnr_db,
                "input_scale": self.input_scale, "input_clipped_fraction": self.clipped_fraction}


@dataclass
class AnalysisReport:
    layers: list[LayerError]  # in graph order
    threshold: float  # accumulated cosine below this is flagged
    batches: int
    samples: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # layer -> (float, quantized)
    outputs: dict[str, ErrorStats] = field(default_factory=dict)  # model output -> float vs quantized (float outputs)
    not_compared: dict[str, str] = field(default_factory=dict)  # quantized layer -> why it could not be compared

    def flagged(self) -> list[LayerError]:
        """Layers whose accumulated cosine is below the threshold, the ones whose own error is worst first."""
        bad = [e for e in self.layers if e.cosine < self.threshold]
        return sorted(bad, key=lambda e: e.isolated.cosine)

    def suggested_skip_layers(self) -> list[str]:
        """Layers to keep in float: those flagged whose own (isolated) error is below the threshold too.

        A layer downstream of a bad one inherits its error; only layers that are bad on their own are named, so
        the list is empty when none is (skipping a layer that is fine alone would not repair the error).
        """
        return [e.layer for e in self.flagged() if e.isolated.cosine < self.threshold]

    def ranking(self, sensitivity: Sensitivity | None = None) -> list[tuple[str, float]]:
        """Layers by isolated sensitivity, most sensitive first."""
        sens = sensitivity or CosineSimilarity()
        scored = [(e.layer, sens.score(e.isolated)) for e in self.layers]
        return sorted(scored, key=lambda t: -t[1])

    def to_dict(self) -> dict:
        outputs = {n: {"cosine": e.cosine, "sqnr_db": e.sqnr_db, "max_abs_error": e.max_abs} for n, e in self.outputs.items()}
        return {"threshold": self.threshold, "batches": self.batches, "outputs": outputs,
                "layers": [e.row() for e in self.layers],
                "flagged": [e.layer for e in self.flagged()], "suggested_skip_layers": self.suggested_skip_layers(),
                "not_compared": dict(self.not_compared)}


def _as_model(model: str | os.PathLike | onnx.ModelProto, what: str) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model, what)


def _layer_list(quant: onnx.ModelProto, path_desc: str) -> tuple[list[dict], dict]:
    meta = {p.key: p.value for p in quant.metadata_props}
    if LAYERS_KEY not in meta:
        raise ModelError(f"{path_desc} has no omct layer list: pass a fake-quant or deploy model written by omct's "
                         "save_model")
    return json.loads(meta[LAYERS_KEY]), json.loads(meta.get(FUSION_KEY, '{"do_fusion": true, "skip_fusion_layers": []}'))


Scope = tuple[onnx.GraphProto, tuple[onnx.GraphProto, ...]]  # a graph and the graphs around it, outermost first


def _scopes_of_nodes(model: onnx.ModelProto) -> tuple[dict[str, Scope], dict[str, str]]:
    """Node name -> the graph holding it and its enclosing graphs, and -> the body it is in (``blk/then``; ''
    at the top level)."""
    where, graph_of = locate(model)
    scopes: dict[str, Scope] = {}
    labels: dict[str, str] = {}
    for graph in all_graphs(model.graph):
        for node in graph.node:
            path = where.get(node.output[0], ()) if node.output and graph is not model.graph else ()
            scopes[node.name] = (graph, (model.graph, *(step[2] for step in path[:-1])) if path else ())
            labels[node.name] = scope_of(path)
    return scopes, labels


class _Probe:
    """Copies of the quantized model's layer nodes (and what feeds them) into the float graph, or into the float
    model's body that holds the layer (``scope``: reads from enclosing graphs resolve there too)."""

    def __init__(self, float_scope: Scope, quant_scope: Scope):
        self.graph = float_scope[0]
        f_graphs, q_graphs = (*float_scope[1], float_scope[0]), (*quant_scope[1], quant_scope[0])
        self.float_nodes = {n.name: n for g in f_graphs for n in g.node}
        self.float_names = set().union(*(local_names(g) for g in f_graphs))
        self.q_producer = {o: (n, k) for g in q_graphs for n in g.node for k, o in enumerate(n.output)}
        self.q_inits = {t.name: t for g in q_graphs for t in g.initializer}
        self.q_inputs = {i.name for g in q_graphs for i in g.input}
        self.copied: dict[str, str] = {}

    def resolve(self, tensor: str, suffix: str) -> str:
        """The float graph's tensor that stands for quant-model ``tensor`` when feeding a probe."""
        if not tensor:
            return tensor
        key = tensor + suffix
        if key in self.copied:
            return self.copied[key]
        if tensor in self.q_producer:
            node, k = self.q_producer[tensor]
            twin = self.float_nodes.get(node.name) if node.name else None  # deploy models' added nodes: no name
            if twin is not None and twin.op_type == node.op_type:  # a node of the float model: its float output
                out = twin.output[k]
            else:  # inserted by quantization (quantize/dequantize): copy it
                out = self.copy_node(node, suffix)[k]
        elif tensor in self.q_inits:
            out = tensor + suffix
            init = onnx.TensorProto()
            init.CopyFrom(self.q_inits[tensor])
            init.name = out
            self.graph.initializer.append(init)
        elif tensor in self.q_inputs or tensor in self.float_names:
            out = tensor
        else:
            raise ModelError(f"cannot line up tensor '{tensor}' of the quantized model with the float model")
        self.copied[key] = out
        return out

    def copy_node(self, node: onnx.NodeProto, suffix: str) -> list[str]:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = (node.name or f"{node.output[0]}.node") + suffix  # output names are unique, node names optional
        inputs = [self.resolve(i, suffix) for i in node.input]
        del copy.input[:]
        copy.input.extend(inputs)
        outputs = [o + suffix if o else o for o in node.output]
        del copy.output[:]
        copy.output.extend(outputs)
        self.graph.node.append(copy)
        return outputs


def _with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    existing = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in existing:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
            existing.add(t)
    return model


def _expose(model: onnx.ModelProto, tensors: list[str]):
    """Make ``tensors`` outputs of ``model`` (in place): top-level ones directly, those inside control-flow bodies
    carried out (``subgraphs.carry_out``, as calibration observes them). Returns a function from a run's outputs
    (name -> value) to the tensors' values; a tensor of a branch no input took, or of a loop that ran no
    iteration, is left out; loop iterations are stacked along the batch axis."""
    where, _ = locate(model)
    inner = [t for t in dict.fromkeys(tensors) if t in where]
    carried, _ = carry_out(model, inner)
    top = [t for t in dict.fromkeys(tensors) if t not in where]
    _with_outputs(model, top)

    def values(out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        got = {t: out[t] for t in top}
        got.update(carried_values(carried, out))
        return got

    return values


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    toposort(model.graph)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        with tempfile.TemporaryDirectory(prefix="omct-", ignore_cleanup_errors=True) as tmp:
            source, folder = session_input(model, tmp)  # weights of a lazily loaded model stay in their files
            if folder is not None:
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            return ort.InferenceSession(source if isinstance(source, bytes) else str(source), so,
                                        providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises several types for models it cannot load
        raise ModelError(f"ONNX Runtime cannot run the analysis model: {str(e).splitlines()[0]}") from None


def analyze(float_model: str | os.PathLike | onnx.ModelProto, quant_model: str | os.PathLike | onnx.ModelProto,
            batches: Iterable[Mapping[str, np.ndarray]], threshold: float = 0.99, sample_size: int = 4096,
            batch_count: int | None = None) -> AnalysisReport:
    """Compare every quantized layer of ``quant_model`` with ``float_model`` on ``batches`` (input feeds).

    ``float_model`` is the model that was quantized (BatchNorm is folded here as it was for quantization).
    """
    if not 0 < threshold < 1:
        logger.warning("threshold %g is outside (0, 1): cosine similarity is at most 1, so %s", threshold,
                       "(almost) every layer is flagged" if threshold >= 1 else "(almost) no layer is flagged")
    quant = _as_model(quant_model, "quantized model")
    layers, fusion = _layer_list(quant, f"'{quant_model}'" if not isinstance(quant_model, onnx.ModelProto) else "the model")
    base, report = normalize(_as_model(float_model, "float model"))
    if fusion.get("do_fusion", True):
        fold_batchnorm(base, set(fusion.get("skip_fusion_layers", [])), report)
    if fusion.get("cross_layer_equalization"):  # the quantized model's weights were equalized: so is the reference
        equalize(base)
    model_outputs = [o.name for o in base.graph.output]  # before the probes' outputs are added
    q_nodes = {n.name: n for g in all_graphs(quant.graph) for n in g.node}
    f_nodes = {n.name: n for g in all_graphs(base.graph) for n in g.node}
    missing = [entry["name"] for entry in layers if entry["name"] not in f_nodes or entry["name"] not in q_nodes]
    if missing:
        raise ModelError(f"layer '{missing[0]}' of the quantized model is not in the float model: pass the float model "
                         "that was quantized")
    # Each probe goes into the graph that holds its float layer: a layer inside an If / Loop / Scan body is probed
    # inside that body, and the tensors compared are carried out of the bodies as calibration carries them.
    (f_scopes, f_labels), (q_scopes, _) = _scopes_of_nodes(base), _scopes_of_nodes(quant)
    probes: dict[int, _Probe] = {}
    entries, inputs, not_compared = [], {}, {}
    for entry in layers:
        name = entry["name"]
        f_scope = f_scopes[name]
        probe = probes.setdefault(id(f_scope[0]), _Probe(f_scope, q_scopes[name]))
        try:
            probe_out = probe.copy_node(q_nodes[name], _PROBE + name)[0]
        except ModelError as e:
            if not f_scope[1]:
                raise
            not_compared[name] = f"its quantized inputs cannot be copied into its body ({e})"
            continue
        compared = entry["output_site"] or q_nodes[name].output[0]
        entries.append((name, entry["op_type"], compared, f_nodes[name].output[0], probe_out))
        if entry.get("input") and entry["input"] in probe.float_names:
            inputs[name] = entry
    float_values = _expose(base, [t for e in entries for t in (e[2], e[3], e[4])] + [e["input"] for e in inputs.values()])
    float_sess = _session(base)
    quant_copy = onnx.ModelProto()
    quant_copy.CopyFrom(quant)
    quant_values = _expose(quant_copy, [e[2] for e in entries])
    quant_sess = _session(quant_copy)
    f_names = [o.name for o in float_sess.get_outputs()]
    q_names = [o.name for o in quant_sess.get_outputs()]
    errors = [LayerError(n, op, t, ErrorStats(), ErrorStats(), inputs[n]["input_scale"] if n in inputs else None,
                         tuple(inputs[n]["input_range"]) if n in inputs else None) for n, op, t, _, _ in entries]
    quant_outputs = {o.name for o in quant.graph.output}
    outputs = {name: ErrorStats() for name in model_outputs if name in quant_outputs}
    samples: dict[str, list[list[np.ndarray]]] = {e.layer: [[], []] for e in errors}
    count = 0
    bar = Progress("analysing", batch_count)
    try:
        for feeds in batches:
            f_run = dict(zip(f_names, float_sess.run(None, dict(feeds)), strict=True))
            q_run = dict(zip(q_names, quant_sess.run(None, dict(feeds)), strict=True))
            f_out, q_out = {**f_run, **float_values(f_run)}, {**q_run, **quant_values(q_run)}
            for err, (_, _, tensor, raw, probe_t) in zip(errors, entries, strict=True):
                if not all(t in f_out for t in (tensor, raw, probe_t)) or tensor not in q_out:
                    continue  # a layer in a branch this batch did not take
                err.accumulated.update(f_out[tensor], q_out[tensor])
                err.isolated.update(f_out[raw], f_out[probe_t])
                if err.input_range is not None:  # how much of the float input the quantization range cuts off
                    x = np.asarray(f_out[inputs[err.layer]["input"]])
                    lo, hi = err.input_range
                    err.clipped += int(np.count_nonzero((x < lo) | (x > hi)))
                    err.seen += x.size
                kept = samples[err.layer]
                have = sum(a.size for a in kept[0])
                if have < sample_size:
                    take = sample_size - have
                    kept[0].append(np.ravel(f_out[tensor])[:take].copy())
                    kept[1].append(np.ravel(q_out[tensor])[:take].copy())
            for name, stats in outputs.items():
                if np.issubdtype(np.asarray(f_out[name]).dtype, np.floating):
                    stats.update(f_out[name], q_out[name])
            count += 1
            bar.advance()
    finally:
        bar.close()
    if count == 0:
        raise ModelError("no data to analyse: the batches were empty")
    for err in errors:
        if not err.accumulated.count:
            not_compared[err.layer] = f"no batch ran '{f_labels[err.layer]}', the body it is in"
    if not_compared:
        logger.warning("not compared: %s", "; ".join(f"{n}: {r}" for n, r in not_compared.items()))
    errors = [e for e in errors if e.layer not in not_compared]
    kept_samples = {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in samples.items() if k not in not_compared}
    outputs = {n: e for n, e in outputs.items() if e.count}
    return AnalysisReport(errors, threshold, count, kept_samples, outputs, not_compared)
