"""Load and save ONNX models with clear errors, atomic writes and external data for large models."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from omct.errors import ModelError
from omct.fileio import check_outputs, prepare_parent, temp_file_beside
from omct.graph import metadata
from omct.graph.tensor_data import (
    FOLDER_KEY,
    ExternalWriter,
    all_tensors,
    data_source,
    has_external,
    has_lazy,
    in_memory_bytes,
    is_lazy,
    keep_refs,
    load_embedded,
    read_in,
    rebuilt,
    write_one_file,
)
from omct.ui import progress

#: Protobuf cannot serialise more than 2 GiB; models whose tensors approach it are saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: The newest IR version ONNX Runtime 1.2x-1.3x loads; onnx's helpers may stamp a newer one.
MAX_IR_VERSION = 10
#: ``input_files`` reads a model's external-data references only from files up to this size: a model whose
#: weights live outside is small, and parsing a big self-contained model twice would cost seconds and GBs.
PEEK_LIMIT = 64 * 2**20
#: A model in one file from this size on is loaded lazily too (``load_model(lazy=True)``): its big tensors
#: become references into the .onnx file itself (marked with EMBEDDED_KEY), read like external data; and a
#: model whose tensors reach it is written tensor by tensor, never serialised whole. 1 MB, not more: even a
#: 12 MB BERT-mini's peak RSS fell by 30 MB (a whole-model copy at every load and save), at no measurable time.
EMBEDDED_LAZY_BYTES = 1 * 2**20
#: ``input_files`` reads a model from this size on without its embedded weights' bytes.
PEEK_LAZY_BYTES = 4 * 2**20


def load_model(path: str | Path, what: str = "model", lazy: bool = False) -> onnx.ModelProto:
    """Load ``path`` (external data included) or raise ModelError saying what is wrong.

    The graph and the external-data references are checked before any weight is read, so a broken model
    fails with one line naming the node, tensor or file instead of a raw onnx error. With ``lazy`` the
    external tensors stay in their files (read with ``tensor_array``, memory-mapped; copied range by range
    by ``save_models``): a big model costs no memory until a step needs one of its tensors.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{what} file '{path}' does not exist")
    if path.is_dir():
        raise ModelError(f"{what} path '{path}' is a folder; give the .onnx file")
    if path.stat().st_size == 0:
        raise ModelError(f"{what} file '{path}' is empty")
    try:
        model = load_embedded(path) if lazy and path.stat().st_size >= EMBEDDED_LAZY_BYTES else None
        if model is None:
            model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"{what} file '{path}' is not a readable ONNX model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'parse failed'}); is it corrupt or another format?") from None
    if not model.graph.node or not model.opset_import:
        raise ModelError(f"{what} file '{path}' is not an ONNX model (no graph nodes or opset); is it another format?")
    check_graph(model.graph, set(), f"{what} file '{path}'")
    files = external_data_files(model, path, what)
    if files and lazy:
        folder = os.path.realpath(path.parent)
        for t in all_tensors(model.graph):
            if t.data_location == TensorProto.EXTERNAL:
                t.external_data.add(key=FOLDER_KEY, value=folder)
    elif files:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (onnx.checker.ValidationError, ValueError, OSError) as e:  # races and checks newer onnx adds
            raise ModelError(f"{what} file '{path}': cannot read its external data ({str(e).splitlines()[0]})") from None
    return model


def check_graph(graph: onnx.GraphProto, outer: set[str], where: str) -> None:
    """Every tensor a node reads, and every graph output, must be produced by something (onnx's full checker
    also rejects models ONNX Runtime runs, such as outputs typed without a shape, so only this is checked)."""
    known = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    known |= {t.values.name for t in graph.sparse_initializer}
    known |= {o for node in graph.node for o in node.output if o}
    for i, node in enumerate(graph.node):
        for t in node.input:
            if t and t not in known:
                label = f"'{node.name}'" if node.name else f"#{i}"
                raise ModelError(f"{where}: node {label} ({node.op_type}) reads tensor '{t}', which no node, graph input "
                                 "or initializer produces; the model is broken (truncated or edited?): export it again")
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                check_graph(sub, known, where)
    for o in graph.output:
        if o.name not in known:
            raise ModelError(f"{where}: graph output '{o.name}' is produced by no node, input or initializer; "
                             "the model is broken (truncated or edited?): export it again")


def external_data_files(model: onnx.ModelProto, path: str | Path, what: str = "model") -> list[Path]:
    """The data files ``model`` (read from ``path``) keeps tensors in; ModelError when one is missing, too
    short, or outside the model's folder (a model may only read files beside it, as onnx >= 1.16 enforces)."""
    path = Path(path)
    folder = os.path.realpath(path.parent)
    files: dict[str, Path] = {}
    sizes: dict[str, tuple[str, int | None]] = {}
    for t in all_tensors(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        where = f"{what} file '{path}': tensor '{t.name}'"
        if not location:
            raise ModelError(f"{where} is stored externally but names no data file (no 'location'); export it again")
        if location not in sizes:  # each file checked once, not once per tensor (a lazily loaded model: hundreds)
            sizes[location] = _data_file(folder, location)
        full, size = sizes[location]
        if os.path.isabs(location) or os.path.commonpath([folder, full]) != folder:
            raise ModelError(f"{where} reads its data from '{location}', outside the model's folder '{path.parent}'; "
                             "refused: a model may only read data files beside it. Move the file next to the model and "
                             "set its location to the bare file name")
        if size is None:
            raise ModelError(f"{where} keeps its data in '{Path(path.parent, location)}', which is missing; copy the "
                             "data file saved with the model next to it")
        offset, length = int(info.get("offset") or 0), info.get("length")
        if offset > size or (length is not None and offset + int(length) > size):
            raise ModelError(f"{where} needs bytes {offset}..{offset + int(length or 0)} of '{Path(path.parent, location)}', "
                             f"which has {size}; is the data file truncated or from another model?")
        files.setdefault(full, Path(path.parent, location))
    return list(files.values())


def _data_file(folder: str, location: str) -> tuple[str, int | None]:
    """The real path of data file ``location`` of a model in ``folder`` and its size (None: not a file)."""
    full = os.path.realpath(os.path.join(folder, location))
    return full, os.path.getsize(full) if os.path.isfile(full) else None


def input_files(name: str, path: str | os.PathLike | None) -> dict[str, str | os.PathLike | None]:
    """``{name: path}`` plus the external-data files the model reads, for ``fileio.check_outputs``: an output
    must not overwrite those either. Unreadable models are left to ``load_model`` to report."""
    files: dict[str, str | os.PathLike | None] = {name: path}
    if path is None or not os.path.isfile(path) or os.path.getsize(path) > PEEK_LIMIT:
        return files
    try:
        # a bigger file through the lazy loader, which skips the weights' bytes (a 12 MB BERT: 1 ms, not 12 ms; four
        # times per PTQ run); the references it makes into the model file itself are not data files
        model = load_embedded(Path(path)) if os.path.getsize(path) >= PEEK_LAZY_BYTES else None
        if model is None:
            model = onnx.load(os.fspath(path), load_external_data=False)
        itself = os.path.realpath(path)
        data = [f for f in external_data_files(model, path) if os.path.realpath(f) != itself]
    except Exception:  # noqa: BLE001 - load_model reports it in one line later
        return files
    files.update({f"{name}'s external data file" + (f" #{i + 1}" if len(data) > 1 else ""): f for i, f in enumerate(data)})
    return files


def output_files(name: str, path: str | os.PathLike | None) -> dict[str, str | os.PathLike | None]:
    """``{name: path}`` plus the ``.data`` file ``save_model`` writes beside it for a large model."""
    return {name: path} if path is None else {name: path, f"{name}'s external data file": f"{os.fspath(path)}.data"}


def check_save_outputs(modified: onnx.ModelProto, modified_file: str | os.PathLike, record_file: str | os.PathLike,
                       save_path: str | os.PathLike) -> None:
    """save_model's outputs must not overwrite the modified model, its record(s) or the model it was made from."""
    meta, prefix = metadata.read(modified), os.fspath(save_path)
    check_outputs({**input_files("modified_onnx_file", modified_file), "record_file": record_file,
                   "record file named in modified_onnx_file": meta.get(metadata.RECORD_FILE),
                   **input_files("original model_file", meta.get(metadata.MODEL_FILE))},
                  {**output_files("save_path's fake-quant model", prefix + "_fake_quant_model.onnx"),
                   **output_files("save_path's deploy model", prefix + "_deploy_model.onnx")})


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's initializers, in memory or (lazily loaded) in their files (protobuf's
    ByteSize fails beyond 2 GiB)."""
    return sum(data_source(t)[2] if is_lazy(t) else in_memory_bytes(t) for t in model.graph.initializer)


def ort_reads_external_folder() -> bool:
    """Whether the installed ONNX Runtime reads the external data of a model given as bytes from the folder in
    ``session.model_external_initializers_file_folder_path`` (1.21 on; older releases ignore the entry)."""
    try:
        import onnxruntime

        return tuple(int(p) for p in onnxruntime.__version__.split(".")[:2]) >= (1, 21)
    except (ImportError, ValueError):
        return False


def session_input(model: onnx.ModelProto, folder: str | Path) -> tuple[bytes | Path, str | None]:
    """What ONNX Runtime should load ``model`` from: its bytes and the folder its external tensors are read from
    (a lazily loaded model: the weights are not copied), or a file written into ``folder`` when neither
    protobuf nor one data folder can carry it."""
    folders = {e.value for t in all_tensors(model.graph) if is_lazy(t) for e in t.external_data if e.key == FOLDER_KEY}
    in_memory = sum(in_memory_bytes(t) for t in model.graph.initializer if not is_lazy(t))
    if (not folders or ort_reads_external_folder()) and len(folders) <= 1 and in_memory <= EXTERNAL_DATA_THRESHOLD:
        header = rebuilt(model, keep_refs) if folders else model
        return header.SerializeToString(), next(iter(folders), None)
    path = Path(folder) / "model.onnx"
    save_model(model, path)
    return path, None


def save_model(model: onnx.ModelProto, path: str | Path, external_threshold: int | None = None) -> list[Path]:
    """Write ``model`` to ``path`` atomically; tensors go to ``<name>.data`` when the model is too large.

    Returns the files written. Nothing is left half-written (see ``save_models``).
    """
    return save_models([(model, path)], external_threshold)


#: A model to write, or a function that builds it given the writer of its external-data file (so that big
#: tensors go to the file as they are made).
ModelSource = onnx.ModelProto | Callable[[ExternalWriter], onnx.ModelProto]


def _stage(source: ModelSource, path: Path, tmpdir: str, external_threshold: int) -> list[tuple[Path, Path]]:
    """Write a model into ``tmpdir``; returns (temporary file, target) pairs, data file first. A model with
    tensors in files (lazily loaded or built through the writer) keeps them external; another one gets
    external data when it is larger than ``external_threshold``."""
    tmp_model = Path(tmpdir) / path.name
    writer = ExternalWriter(tmpdir, path.name + ".data")
    try:
        model = source(writer) if callable(source) else source
        if model.ir_version > MAX_IR_VERSION:
            model.ir_version = MAX_IR_VERSION
        if writer.size or has_external(model) or tensor_bytes(model) > external_threshold:
            with progress(f"writing {path.name}", len(model.graph.initializer)) as bar:
                def place(src: TensorProto, dst: TensorProto) -> None:
                    writer.place(src, dst)
                    bar.advance()

                header = rebuilt(model, place)
            del model
            for t in all_tensors(header.graph):
                keep_refs(t, t)
            onnx.save_model(header, str(tmp_model))
        else:
            _write_one(model, tmp_model)
    finally:
        writer.close()
    pairs = [(tmp_model, path)]
    if writer.path.exists():  # absent when no tensor reached SIZE_THRESHOLD
        pairs.insert(0, (writer.path, path.parent / writer.name))
    return pairs


def _write_one(model: onnx.ModelProto, file: Path) -> None:
    """``model`` as one file (no external data)."""
    if has_lazy(model) or tensor_bytes(model) >= EMBEDDED_LAZY_BYTES:  # one file, written tensor by tensor
        if any(is_lazy(t) for t in list(all_tensors(model.graph))[len(model.graph.initializer):]):
            model = rebuilt(model, read_in)  # lazy tensors outside the initializers (rare): read in
        write_one_file(model, file)
    else:
        onnx.save_model(model, str(file))


def _stage_alone(model: onnx.ModelProto, path: Path) -> Path:
    """Write a model that needs no external-data file to a new hidden file beside ``path`` (no temporary
    folder: removing one cost 1-4 ms on this host's ext4, a file rename 0.1 ms); returns the file."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    tmp = temp_file_beside(path)
    try:
        _write_one(model, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _backup_of(tmp: Path) -> Path:
    """Where ``_commit`` keeps the file that staged file ``tmp`` replaces, until all are in place."""
    return tmp.with_name(f".previous.{tmp.name}")


def _commit(pairs: list[tuple[Path, Path]], stranded: list[tuple[Path, Path]]) -> None:
    """Rename every staged file onto its target; on any failure put every previous file back, so the targets
    hold either all the new files or exactly what they held before. A previous file that cannot be put back
    is listed in ``stranded`` as (target, where it is now), so that it is kept, not cleaned up."""
    for _, target in pairs:
        if os.path.isdir(target) and not os.path.islink(target):
            raise IsADirectoryError(errno.EISDIR, f"'{target}' is a folder", str(target))
    moved: list[tuple[Path, Path | None]] = []
    try:
        for tmp, target in pairs:
            backup = None
            if os.path.lexists(target):
                backup = _backup_of(tmp)
                os.replace(target, backup)
            moved.append((target, backup))
            os.replace(tmp, target)
    except BaseException:
        for target, backup in reversed(moved):
            try:
                if backup is not None:
                    os.replace(backup, target)
                elif os.path.lexists(target):
                    os.unlink(target)
            except OSError:  # put back all that can be; the first error is the one reported
                if backup is not None:
                    stranded.append((target, backup))
        raise


def save_models(items: list[tuple[ModelSource, str | Path]], external_threshold: int | None = None,
                sinks: bool = True) -> list[Path]:
    """Write several models all-or-nothing: each is built in a temporary folder beside its target, then all
    are renamed into place. If any write fails, no target is changed (a previous result stays intact).

    Returns the files written. ``external_threshold`` defaults to EXTERNAL_DATA_THRESHOLD (read at call time).
    ``sinks=False``: the builders among ``items`` send no tensor to a writer (they are given None), so each model is
    built first and, when it needs no data file, staged without a temporary folder.
    """
    if external_threshold is None:
        external_threshold = EXTERNAL_DATA_THRESHOLD
    staged: list[tuple[Path, Path]] = []
    tmpdirs: list[str] = []
    alone: list[Path] = []  # staged files beside their targets (``_stage_alone``); their backups are beside them too
    stranded: list[tuple[Path, Path]] = []
    # one temporary folder per target folder, shared by the models written there (their files and backups have
    # distinct names): removing a folder cost 1-4 ms on this host's ext4, creating and renaming files 0.1 ms
    folder_of: dict[Path, str] = {}
    try:
        for model, path in items:
            path = prepare_parent(path)
            try:
                if callable(model) and not sinks:
                    model = model(None)
                if not callable(model) and not has_external(model) and tensor_bytes(model) <= external_threshold:
                    alone.append(_stage_alone(model, path))
                    staged.append((alone[-1], path))
                    continue
                tmpdir = folder_of.get(path.parent)
                if tmpdir is None or any(os.path.lexists(Path(tmpdir, n)) for n in (path.name, path.name + ".data")):
                    tmpdir = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
                    tmpdirs.append(tmpdir)
                    folder_of[path.parent] = tmpdir
                staged += _stage(model, path, tmpdir, external_threshold)
            except OSError as e:
                raise ModelError(f"cannot write '{path}': {e.strerror or e}") from None
        try:
            _commit(staged, stranded)
        except OSError as e:
            targets = "', '".join(str(target) for _, target in staged)
            kept = "; ".join(f"the previous '{t}' is kept as '{b}'" for t, b in stranded)
            tmpdirs = [d for d in tmpdirs if not any(str(b).startswith(d + os.sep) for _, b in stranded)]
            kept = kept or "the previous files were left as they were"
            raise ModelError(f"cannot write '{targets}': {e.strerror or e}; {kept}") from None
        return [target for _, target in staged]
    finally:
        for tmpdir in tmpdirs:
            shutil.rmtree(tmpdir, ignore_errors=True)
        kept = {b for _, b in stranded}
        for tmp in alone:  # a staged file not renamed (a failure), and the previous file it replaced
            for leftover in (tmp, _backup_of(tmp)):
                if leftover not in kept:
                    try:
                        leftover.unlink(missing_ok=True)
                    except OSError:
                        pass
