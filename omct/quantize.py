"""The in-memory core of post-training quantization: calibrate, compute the records, export.

    from omct.quantize import quantize
    result = quantize(graph, layers, config, batches)   # a frontend's prepared graph, any iterable of feeds
    result.deploy_model()                                # onnx.ModelProto; result.save("results/model") writes both

AMCT's file-based call sequence (``omct.workflow``: config.json, modified model, record file) and the automatic
searches are thin users of these pieces; nothing here writes a file unless asked to.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx

from omct.algorithms.activations import unobserved_sites
from omct.algorithms.base import RecordContext
from omct.algorithms.pipeline import PIPELINE
from omct.algorithms.statistics import Statistics
from omct.core.parallel import one_blas_thread, release_scratch, return_free_memory
from omct.errors import CalibrationError, ConfigError, OmctError
from omct.feeds import FeedCheck, batch_rows, warn_few_samples
from omct.formats.config import QuantConfig
from omct.formats.record import LayerRecord, update_pending_record, write_record
from omct.graph.export import deploy_model, fake_quant_model
from omct.graph.model_io import EXTERNAL_DATA_THRESHOLD, save_models, session_input, tensor_bytes
from omct.graph.modified import ModifiedModel, make_modified, stamp_layers
from omct.graph.ops import LayerSpec
from omct.graph.plan import Plan, build_plan, with_float_layers, without_layers
from omct.graph.subgraphs import all_graphs
from omct.graph.tensor_data import ExternalWriter, has_external, tensor_array
from omct.ui import Progress, logger, progress, shown_path

T = TypeVar("T")


class InputKeeper:
    """Calibration inputs kept for a later pass (the sensitivity ranking), up to a memory budget; later batches
    are dropped once it is spent."""

    def __init__(self, limit_bytes: int):
        self.kept: list = []
        self._room = limit_bytes

    def offer(self, nbytes: int, copy: Callable[[], object]) -> None:
        """Keep ``copy()`` if ``nbytes`` still fit; ``copy`` is only called then."""
        if nbytes <= self._room:
            self.kept.append(copy())
            self._room -= nbytes

    def report(self, batch_num: int, limit_mb: float) -> None:
        if len(self.kept) < batch_num:
            logger.info("ranking on the first %d calibration batch(es) (ranking_memory_mb=%g)", len(self.kept), limit_mb)


class Calibration:
    """One calibration run: the statistics every algorithm asked for, fed batch by batch by a frontend (ONNX
    Runtime outputs or PyTorch hooks); after ``batch_num`` batches the algorithms turn them into the records.

    With ``record_file`` the record file follows the run (pending until the last batch, then the factors), as
    AMCT's call sequence expects; without, nothing is written.
    """

    def __init__(self, plan: Plan, config: QuantConfig, weight_of: Callable[[str], np.ndarray],
                 record_file: str | os.PathLike | None = None):
        self.plan, self.config, self.weight_of = plan, config, weight_of
        self.record_file = record_file
        self.stats = Statistics(p for algorithm in PIPELINE for p in algorithm.points(plan, config))
        self.batches = 0
        self.records: dict[str, LayerRecord] | None = None
        self.inputs: InputKeeper | None = None
        # a caller that recomputes records from the statistics after the run (auto_nuq's trials: ``records_for``)
        # sets this before the last batch; else a frontend session frees them with the records (``release``)
        self.keep_statistics = False
        self._progress: Progress | None = None
        # called with the statistics before the algorithms run (a distributed frontend merges all processes' here)
        self.before_finish: Callable[[Statistics], None] | None = None

    @property
    def batch_num(self) -> int:
        return self.config.batch_num

    @property
    def done(self) -> bool:
        return self.records is not None

    def tensors(self) -> list[str]:
        """The tensors to read each batch."""
        return self.stats.tensors()

    def _error(self, tensor: str, error: ValueError) -> CalibrationError:
        sites = [s for s in self.plan.sites if s.tensor == tensor]
        layers = ", ".join(n for s in sites for n in s.inputs_of + [f"output of {o}" for o in s.output_of]) or "statistics"
        owner = sites[0].owner if sites else next((n for n, s in self.plan.layers.items() if s.input == tensor), "?")
        return CalibrationError(f"calibration batch {self.batches + 1}: tensor '{tensor}' ({layers}): {error}; check the "
                                f"input data, or add '{owner}' to skip_layers to keep it in float")

    def observe(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Feed every requested tensor of the current batch at once, spread over the worker threads."""
        self.stats.observe(tensors, self._error)

    def update(self, tensor: str, values: np.ndarray) -> None:
        """Feed one tensor of the current batch (frontends that see tensors one at a time)."""
        try:
            self.stats.update(tensor, values)
        except ValueError as e:
            raise self._error(tensor, e) from None

    def keep_inputs_up_to(self, limit_bytes: int) -> InputKeeper:
        """From now on keep this run's inputs (up to ``limit_bytes``) for a later pass over them."""
        self.inputs = InputKeeper(limit_bytes)
        return self.inputs

    def keep_inputs(self, nbytes: int, copy: Callable[[], object]) -> None:
        """Offer this batch's inputs to the keeper (when the run keeps inputs for a later pass)."""
        if self.inputs is not None and not self.done:
            self.inputs.offer(nbytes, copy)

    def run_batch(self, observe: Callable[[], T]) -> T:
        """One batch as a frontend runs it: ``observe()`` runs the model, feeds the statistics and returns the
        model's outputs. Shows progress, and keeps the record file saying how far it got."""
        if self._progress is None:
            self._progress = Progress("calibrating", self.batch_num)
        try:
            with one_blas_thread():  # small products, and OpenBLAS's spinning threads slow every other pool
                out = observe()
                self.batches += 1
                if self.batches >= self.batch_num:
                    self.finish()
        except Exception:
            self._progress.close()
            raise
        self._progress.advance()
        if self.done:
            self._progress.close()
            if self.record_file is not None:
                logger.info("calibration complete after %d batch(es): wrote %s", self.batches, shown_path(self.record_file))
        elif self.record_file is not None:
            update_pending_record(self.record_file, self.batches, self.batch_num, list(self.plan.layers))
        return out

    def finish(self) -> dict[str, LayerRecord]:
        """Run the algorithms on the statistics; writes the record file when there is one."""
        release_scratch()  # no more binning or Gram updates: the workers' buffers and freed arena pages go
        return_free_memory()
        if self.before_finish is not None:
            self.before_finish(self.stats)
        self._drop_unreached()
        ctx = RecordContext(self.plan, self.config, self.stats, self.weight_of)
        for algorithm in PIPELINE:
            algorithm.apply(ctx)
        self.records = {name: ctx.records[name] for name in self.plan.layers}
        if self.record_file is not None:
            write_record(self.record_file, self.records)
        return self.records


    def _drop_unreached(self) -> None:
        """Keep in float the layers of control-flow bodies that no batch ran (an If branch never taken, a loop
        that never iterated), naming them: there is nothing to calibrate them on. A top-level layer that never
        ran stays an error (the activation algorithm says so)."""
        sites = [self.plan.sites[i] for i in unobserved_sites(self.plan, self.stats)]
        names = {n for s in sites for n in s.inputs_of + s.output_of}
        if not names or not all(self.plan.layers[n].scope for n in names):
            return
        plan = without_layers(self.plan, names)
        dropped = [n for n in self.plan.layers if n not in plan.layers]
        scopes: dict[str, list[str]] = {}
        for n in dropped:
            scopes.setdefault(self.plan.layers[n].scope or "", []).append(n)
        for scope, layers in scopes.items():
            logger.warning("no calibration batch ran '%s' (an If branch none took, or a loop without iterations): "
                           "its layer(s) %s stay in float; calibrate with data that reaches it to quantize them",
                           scope, ", ".join(layers))
        self.plan, self.config = plan, with_float_layers(self.config, set(dropped))

    def release(self) -> None:
        """Drop the statistics and the weight reader once the records exist. Why: a caller that needs only the
        records (AMCT's quantize_model sequence) frees them before save_model builds the two models (18 MB at the
        peak of the benchmark BERT). ``records_for`` cannot run afterwards."""
        if self.records is None:
            raise CalibrationError("calibration statistics are released only after the records are computed")
        self.stats = None  # type: ignore[assignment]
        self.weight_of = None  # type: ignore[assignment]

    def records_for(self, config: QuantConfig) -> dict[str, LayerRecord]:
        """The records ``config`` gives from this run's statistics, without recalibrating (a search trial that
        changes layers' weight algorithms: NUQ steps, uniform). ``config`` must enable the same layers and need
        no statistic this run did not collect."""
        ctx = RecordContext(self.plan, config, self.stats, self.weight_of)
        for algorithm in PIPELINE:
            algorithm.apply(ctx)
        return {name: ctx.records[name] for name in self.plan.layers}


class CalibrationStatus:
    """How far calibration got; mixed into each frontend's calibration object (which has ``.calibration``)."""

    calibration: Calibration

    @property
    def batch_num(self) -> int:
        return self.calibration.batch_num

    @property
    def batches_seen(self) -> int:
        return self.calibration.batches

    @property
    def complete(self) -> bool:
        return self.calibration.done


class CalibratingSession(CalibrationStatus):
    """An ONNX Runtime session over a modified model that also calibrates: ``run`` returns exactly what the
    original model would (its outputs only), and on the side feeds the observed tensors to the calibration.
    After ``batch_num`` runs the record file is complete. Every other attribute is the underlying session's.
    Shared by the frontends whose users run a session (ONNX's CalibrationSession, Caffe's session)."""

    def __init__(self, modified: ModifiedModel, record_file: str | os.PathLike, session, caller: str):
        self.record_file = str(record_file)
        self._session = session
        self._caller = caller
        self.calibration = Calibration(modified.plan, modified.config, initializer_reader(modified.model), record_file)
        self._added = set(modified.added_outputs)
        self._modified = modified
        self._site_tensors = self.calibration.tensors()
        self._site_fetch = modified.fetch_names(self._site_tensors)
        self._user_outputs = [o.name for o in session.get_outputs() if o.name not in self._added]
        self._kinds = output_kinds(session)
        self._feeds = FeedCheck(session.get_inputs(), caller)
        self._extra_runs = 0
        self._samples = 0

    def get_outputs(self):
        return [o for o in self._session.get_outputs() if o.name not in self._added]

    def run(self, output_names, input_feed, run_options=None) -> list[np.ndarray]:
        wanted = list(output_names) if output_names else self._user_outputs
        input_feed = self._feeds.check(input_feed)  # one line naming the input, before ONNX Runtime's traceback
        if self.calibration.done:
            self._extra_runs += 1
            if self._extra_runs == 1 and self.calibration.batches:
                logger.warning("%s: calibration finished after batch_num=%d batches; this and further runs are not "
                               "used for calibration (raise batch_num to use them)", self._caller, self.batch_num)
            return self._session.run(wanted, input_feed, run_options)
        self.calibration.keep_inputs(sum(np.asarray(v).nbytes for v in input_feed.values()),
                                     lambda: {k: np.array(v, copy=True) for k, v in input_feed.items()})
        fetch = wanted + [t for t in self._site_fetch if t not in wanted]

        def observe():
            values = run_views(self._session, fetch, input_feed, run_options, self._kinds)
            self.calibration.observe(self._modified.observed(self._site_tensors, dict(zip(fetch, values, strict=True))))
            return values

        # the user's outputs as ONNX Runtime's run gives them: arrays of their own
        out = [np.array(v, copy=True) for v in self.calibration.run_batch(observe)[: len(wanted)]]
        self._samples += batch_rows(input_feed)
        if self.calibration.done:
            warn_few_samples(self._samples, self.calibration.batches, "")
            # the record file is written and later runs only run the model: the statistics (sketches, Gram
            # matrices), the weight reader and the modified model go before the user's save_model builds two
            # models (issue 17 item 7: 2-9 MB at the peak of a small CNN's AMCT sequence)
            self._modified = None  # type: ignore[assignment]
            if not self.calibration.keep_statistics:
                self.calibration.release()
                return_free_memory()  # the statistics were made on the workers: their arenas cannot serve save_model
        return out

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_session"], name) if "_session" in self.__dict__ else object.__getattribute__(self, name)


def output_kinds(session) -> dict[str, str]:
    """Each output's ONNX Runtime type (``tensor(float)``, ...), for ``run_views``: looked up once per session, not
    on every batch (``get_outputs()`` builds an object per output)."""
    return {o.name: o.type for o in session.get_outputs()}


def run_views(session, names: list[str], feeds: Mapping[str, np.ndarray], run_options=None,
              kinds: Mapping[str, str] | None = None) -> list[np.ndarray]:
    """``session.run(names, feeds)`` without copying the outputs: numpy arrays over ONNX Runtime's own output
    buffers (``run_with_ort_values``; each array keeps its OrtValue alive). Why: copying the observed tensors
    out of ONNX Runtime cost a small CNN more than half its forward pass (MobileNetV2 replica, 8 batches: 62 ms
    with copies, 38 without, the FP32 model alone 35). Tensors only: anything else (string feeds, sequence
    outputs) takes ``run``."""
    import onnxruntime as ort

    kinds = output_kinds(session) if kinds is None else kinds
    arrays = {k: np.asarray(v) for k, v in feeds.items()}
    if not (hasattr(session, "run_with_ort_values") and all(kinds.get(n, "").startswith("tensor(") for n in names)
            and all(a.dtype.kind in "biuf" for a in arrays.values())):
        return session.run(names, feeds, run_options)
    values = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}
    return [v.numpy() for v in session.run_with_ort_values(names, values, run_options)]


def observed_tensors(plan: Plan, config: QuantConfig) -> list[str]:
    """The tensors a calibration of ``plan`` reads (what the modified model exposes as outputs): ``Statistics``'
    order (each tensor where its first point is), without making the accumulators."""
    return list(dict.fromkeys(p.tensor for algorithm in PIPELINE for p in algorithm.points(plan, config)))


def initializer_reader(model: onnx.ModelProto) -> Callable[[str], np.ndarray]:
    """Name -> float array of the model's initializers, control-flow bodies' too (converted on demand, not all
    at once; external tensors of a lazily loaded model are memory-mapped)."""
    inits = {t.name: t for g in all_graphs(model.graph) for t in g.initializer}
    return lambda name: tensor_array(inits[name])


def ort_session(model: str | os.PathLike | bytes, sess_options=None, providers: list | None = None,
                external_folder: str | None = None, **kwargs):
    """An ONNX Runtime session for calibration: its workers do not spin-wait, because between runs the
    statistics need the cores. ``external_folder``: where the external data of a model given as bytes lies
    (ONNX Runtime maps it from there: no copy of the weights)."""
    import onnxruntime as ort

    if sess_options is None:
        sess_options = ort.SessionOptions()
        sess_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # no memory pattern: with the observed tensors as graph outputs, ONNX Runtime's planned block held 3-11 MB
        # more at the peak of a small CNN's calibration (issue 17 item 7), at no measured cost in time
        sess_options.enable_mem_pattern = False
    if external_folder is not None:
        sess_options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_folder)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options, providers=providers or ["CPUExecutionProvider"], **kwargs)


@dataclass
class QuantizedModel:
    """A calibrated model: the float graph, every quantizable layer, the config and the records. The fake-quant
    and deploy models are built from these on request; ``with_float_layers`` re-plans without recalibrating."""

    base: onnx.ModelProto  # the normalised float graph (BatchNorm folded as the config says)
    layers: list[LayerSpec]  # every quantizable layer, enabled or not
    config: QuantConfig
    records: dict[str, LayerRecord]
    plan: Plan = field(default=None)  # type: ignore[assignment]  # built from layers and config when not given

    def __post_init__(self) -> None:
        if self.plan is None:
            self.plan = build_plan(self.layers, self.config)
        self._codes: dict[str, np.ndarray] | None = None  # while ``save`` builds both models: each layer's codes

    def fake_quant_model(self, sink: ExternalWriter | None = None) -> onnx.ModelProto:
        """Float weights on their quantized values and simulated activation quantization: runs anywhere.
        ``sink``: write the big weights to this external-data file as they are made."""
        model = fake_quant_model(self.base, self.plan, self.config, self.records, sink=sink, codes=self._codes)
        stamp_layers(model, self.plan, self.config, self.records)
        return model

    def deploy_model(self, sink: ExternalWriter | None = None) -> onnx.ModelProto:
        """INT8/INT32 tensors and QuantizeLinear/DequantizeLinear that ONNX Runtime fuses into integer kernels."""
        model = deploy_model(self.base, self.plan, self.config, self.records, sink=sink, codes=self._codes)
        stamp_layers(model, self.plan, self.config, self.records)
        return model

    def with_float_layers(self, float_layers: Iterable[str]) -> QuantizedModel:
        """The same calibration with ``float_layers`` kept in float (a trial of an automatic search)."""
        config = with_float_layers(self.config, set(float_layers))
        return QuantizedModel(self.base, self.layers, config, self.records)

    @property
    def all_float(self) -> bool:
        return not self.plan.layers

    def save(self, save_path: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``{save_path}_fake_quant_model.onnx`` and ``{save_path}_deploy_model.onnx``."""
        save_path = str(save_path)
        if not Path(save_path).name:
            raise OmctError(f"save_path '{save_path}' must end with a file name prefix, e.g. './results/model'")
        fake_path = Path(save_path + "_fake_quant_model.onnx")
        deploy_path = Path(save_path + "_deploy_model.onnx")
        # One model at a time, each written before the next is built; a big model (or one whose weights stayed in
        # their files) sends its weights to the external-data file as they are made.
        big = has_external(self.base) or tensor_bytes(self.base) > EXTERNAL_DATA_THRESHOLD
        with progress("exporting", 2) as bar:
            def made(build: Callable[[ExternalWriter | None], onnx.ModelProto]):
                def make(sink: ExternalWriter | None) -> onnx.ModelProto:
                    model = self.base if self.all_float else build(sink if big else None)
                    bar.advance()
                    return model
                return make

            # all or nothing: a previous pair stays. The deploy model reuses the fake-quant model's integer weights
            # (INT8: a quarter of the float weights; not for a big model, which holds one weight at a time)
            self._codes = None if big else {}
            try:
                save_models([(made(self.fake_quant_model), fake_path), (made(self.deploy_model), deploy_path)],
                            sinks=big)  # not big: no sink, and no temporary folder where neither needs a data file
            finally:
                self._codes = None
        logger.info("wrote %s and %s (%d layers quantized)", fake_path, deploy_path, len(self.plan.layers))
        return fake_path, deploy_path


def quantize(graph: onnx.ModelProto, layers: list[LayerSpec], config: QuantConfig,
             batches: Iterable[Mapping[str, np.ndarray]]) -> QuantizedModel:
    """Calibrate ``graph`` (a frontend's normalised graph and its quantizable layers) on ``batches`` of input
    feeds with ONNX Runtime, as ``config`` says. Uses the first ``config.batch_num`` batches."""
    plan = build_plan(layers, config)
    if not plan.layers:
        raise ConfigError("no layer has quant_enable true; nothing to quantize")
    mod = make_modified(graph, plan, config, observed_tensors(plan, config))
    calibration = Calibration(plan, config, initializer_reader(graph))
    tensors = calibration.tensors()
    fetch = mod.fetch_names(tensors)
    with tempfile.TemporaryDirectory(prefix="omct-") as tmp:
        source, folder = session_input(mod.model, tmp)  # the weights stay where they are when they can
        session = ort_session(source, external_folder=folder)
        del source
        check, kinds = FeedCheck(session.get_inputs(), "quantize"), output_kinds(session)
        for feeds in batches:
            if calibration.done:
                break
            feeds = check.check(feeds)
            calibration.run_batch(lambda feeds=feeds: calibration.observe(
                mod.observed(tensors, dict(zip(fetch, run_views(session, fetch, feeds, kinds=kinds), strict=True)))))
    if not calibration.done:
        raise CalibrationError(f"the data gave {calibration.batches} of batch_num={config.batch_num} batches; give more "
                               "batches or lower batch_num")
    # calibration.plan / .config: without the layers of control-flow bodies no batch ran
    return QuantizedModel(graph, layers, calibration.config, calibration.records, calibration.plan)
