"""Load and save ONNX models with clear errors, atomic writes and external data for large models."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from omct.errors import ModelError
from omct.fileio import check_outputs, prepare_parent
from omct.graph import metadata
from omct.ui import progress

#: Protobuf cannot serialise more than 2 GiB; models whose tensors approach it are saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: The newest IR version ONNX Runtime 1.2x-1.3x loads; onnx's helpers may stamp a newer one.
MAX_IR_VERSION = 10
#: ``input_files`` reads a model's external-data references only from files up to this size: a model whose
#: weights live outside is small, and parsing a big self-contained model twice would cost seconds and GBs.
PEEK_LIMIT = 64 * 2**20
#: The external-data entry that marks a tensor of a lazily loaded model: the absolute folder its ``location``
#: is relative to. Never written to a file nor shown to ONNX Runtime (``save_models`` and ``session_input``
#: strip it).
FOLDER_KEY = "omct_folder"
#: Tensors from this size on go to the data file when a model is written with external data; offsets of
#: tensors from ALIGN bytes on are multiples of ALIGN, so that ONNX Runtime can map them instead of copying.
SIZE_THRESHOLD = 256
ALIGN = 4096
#: ``skeleton`` keeps the data of initializers below this size (shape inference reads small constants).
SKELETON_BYTES = 4096
_CHUNK = 64 * 2**20
#: A model in one file from this size on is loaded lazily too (``load_model(lazy=True)``): its big tensors
#: become references into the .onnx file itself (marked with EMBEDDED_KEY), read like external data.
EMBEDDED_LAZY_BYTES = 64 * 2**20
EMBEDDED_KEY = "omct_embedded"


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, start of the field's bytes, start and end of its value) of the protobuf message in
    ``buf[start:end]``; ValueError for what ONNX messages never hold (groups) or a truncated message."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value_start = pos
            _, pos = _varint(buf, pos)
        elif wire == 1:
            value_start, pos = pos, pos + 8
        elif wire == 2:
            length, value_start = _varint(buf, pos)
            pos = value_start + length
        elif wire == 5:
            value_start, pos = pos, pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated message")
        yield key >> 3, first, value_start, pos


#: field numbers in onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _load_embedded(path: Path) -> onnx.ModelProto | None:
    """``path`` (one file) parsed without the raw data of its big initializers, which become references to their
    bytes in the file; None when the file is not laid out as expected (then it is loaded the usual way)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            top = list(_fields(buf, 0, len(buf)))
            graphs = [(vs, ve) for number, _, vs, ve in top if number == _MODEL_GRAPH]
            if len(graphs) != 1:
                return None
            model = onnx.ModelProto.FromString(b"".join(buf[fs:ve] for n, fs, _, ve in top if n != _MODEL_GRAPH))
            graph_fields = list(_fields(buf, *graphs[0]))
            graph = onnx.GraphProto.FromString(b"".join(buf[fs:ve] for n, fs, _, ve in graph_fields
                                                        if n != _GRAPH_INITIALIZER))
            for number, _, vs, ve in graph_fields:
                if number != _GRAPH_INITIALIZER:
                    continue
                parts = list(_fields(buf, vs, ve))
                raw = [(rs, re) for n, _, rs, re in parts if n == _TENSOR_RAW_DATA]
                if len(raw) != 1 or raw[0][1] - raw[0][0] < SKELETON_BYTES:
                    graph.initializer.append(onnx.TensorProto.FromString(buf[vs:ve]))
                    continue
                t = onnx.TensorProto.FromString(b"".join(buf[fs:fe] for n, fs, _, fe in parts if n != _TENSOR_RAW_DATA))
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", path.name), ("offset", str(raw[0][0])),
                                   ("length", str(raw[0][1] - raw[0][0])), (EMBEDDED_KEY, "1")):
                    t.external_data.add(key=key, value=value)
                graph.initializer.append(t)
        except (ValueError, IndexError, DecodeError):
            return None
    model.graph.CopyFrom(graph)
    return model


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
        model = _load_embedded(path) if lazy and path.stat().st_size >= EMBEDDED_LAZY_BYTES else None
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
        for t in _tensors(model.graph):
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


def _tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def external_data_files(model: onnx.ModelProto, path: str | Path, what: str = "model") -> list[Path]:
    """The data files ``model`` (read from ``path``) keeps tensors in; ModelError when one is missing, too
    short, or outside the model's folder (a model may only read files beside it, as onnx >= 1.16 enforces)."""
    path = Path(path)
    folder = os.path.realpath(path.parent)
    files: dict[str, Path] = {}
    for t in _tensors(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        where = f"{what} file '{path}': tensor '{t.name}'"
        if not location:
            raise ModelError(f"{where} is stored externally but names no data file (no 'location'); export it again")
        full = os.path.realpath(os.path.join(folder, location))
        if os.path.isabs(location) or os.path.commonpath([folder, full]) != folder:
            raise ModelError(f"{where} reads its data from '{location}', outside the model's folder '{path.parent}'; "
                             "refused: a model may only read data files beside it. Move the file next to the model and "
                             "set its location to the bare file name")
        if not os.path.isfile(full):
            raise ModelError(f"{where} keeps its data in '{Path(path.parent, location)}', which is missing; copy the "
                             "data file saved with the model next to it")
        offset, length = int(info.get("offset") or 0), info.get("length")
        size = os.path.getsize(full)
        if offset > size or (length is not None and offset + int(length) > size):
            raise ModelError(f"{where} needs bytes {offset}..{offset + int(length or 0)} of '{Path(path.parent, location)}', "
                             f"which has {size}; is the data file truncated or from another model?")
        files.setdefault(full, Path(path.parent, location))
    return list(files.values())


def input_files(name: str, path: str | os.PathLike | None) -> dict[str, str | os.PathLike | None]:
    """``{name: path}`` plus the external-data files the model reads, for ``fileio.check_outputs``: an output
    must not overwrite those either. Unreadable models are left to ``load_model`` to report."""
    files: dict[str, str | os.PathLike | None] = {name: path}
    if path is None or not os.path.isfile(path) or os.path.getsize(path) > PEEK_LIMIT:
        return files
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
        data = external_data_files(model, path)
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
    return sum(_source(t)[2] if is_lazy(t) else _nbytes(t) for t in model.graph.initializer)


def _nbytes(t: TensorProto) -> int:
    return len(t.raw_data) or (len(t.float_data) * 4 + len(t.int32_data) * 4 + len(t.int64_data) * 8
                               + len(t.double_data) * 8 + len(t.uint64_data) * 8)


def is_lazy(t: TensorProto) -> bool:
    """Whether ``t`` is an external tensor of a model loaded with ``lazy=True`` (its data still in its file)."""
    return t.data_location == TensorProto.EXTERNAL and any(e.key == FOLDER_KEY for e in t.external_data)


def has_lazy(model: onnx.ModelProto) -> bool:
    return any(is_lazy(t) for t in _tensors(model.graph))


def has_external(model: onnx.ModelProto) -> bool:
    """Whether ``model`` has lazy tensors that came from external data (not from inside a one-file model): its
    outputs keep external data."""
    return any(is_lazy(t) and all(e.key != EMBEDDED_KEY for e in t.external_data) for t in _tensors(model.graph))


def _source(t: TensorProto) -> tuple[str, int, int]:
    """(file, offset, length) of a lazy tensor's bytes."""
    info = {e.key: e.value for e in t.external_data}
    file = os.path.join(info[FOLDER_KEY], info["location"])
    offset = int(info.get("offset") or 0)
    length = int(info["length"]) if info.get("length") else os.path.getsize(file) - offset
    return file, offset, length


#: Types whose external bytes are the numpy array's bytes (little-endian), so that they can be mapped as they are.
_MAPPABLE = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8,
             TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64,
             TensorProto.UINT64, TensorProto.BOOL}


def _read_bytes(t: TensorProto) -> bytes:
    file, offset, length = _source(t)
    with open(file, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ModelError(f"tensor '{t.name}': its data file '{file}' ended after {len(data)} of {length} bytes; was it "
                         "changed while omct ran?")
    return data


def tensor_array(t: TensorProto) -> np.ndarray:
    """The values of ``t``. A lazily loaded tensor is memory-mapped read-only: nothing is read until the values
    are used, the pages belong to the file (the system can drop them), and dropping the array releases them."""
    if not is_lazy(t):
        return numpy_helper.to_array(t)
    file, offset, length = _source(t)
    shape = tuple(int(d) for d in t.dims)
    if t.data_type not in _MAPPABLE or length == 0:
        copy = TensorProto()
        copy.CopyFrom(t)
        del copy.external_data[:]
        copy.data_location = TensorProto.DEFAULT
        copy.raw_data = _read_bytes(t)
        return numpy_helper.to_array(copy)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != length:
        raise ModelError(f"tensor '{t.name}' has shape {list(shape)} but {length} bytes in '{file}'; is the data file "
                         "from another model?")
    return np.memmap(file, dtype, "r", offset, shape).view(np.ndarray)


class ExternalWriter:
    """Appends tensors to one external-data file as they come, and hands back tensors that refer to it (lazily,
    like ``load_model(lazy=True)``): a model of any size is written holding one tensor at a time."""

    def __init__(self, folder: str | Path, name: str):
        self.folder, self.name = os.path.realpath(folder), name
        self.path = Path(self.folder, name)
        self.size = 0
        self._file = None

    def _start(self, nbytes: int) -> int:
        if self._file is None:
            self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in close(); unbuffered: _copy_range
        if nbytes >= ALIGN and self.size % ALIGN:
            pad = ALIGN - self.size % ALIGN
            _write_all(self._file, bytes(pad))
            self.size += pad
        return self.size

    def _refer(self, t: TensorProto, offset: int, length: int) -> None:
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "external_data"):
            t.ClearField(field)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", str(offset)), ("length", str(length)),
                           (FOLDER_KEY, self.folder)):
            t.external_data.add(key=key, value=value)

    def _write(self, data) -> tuple[int, int]:
        size = memoryview(data).nbytes
        offset = self._start(size)
        _write_all(self._file, data)
        self.size += size
        return offset, size

    def add(self, array: np.ndarray, name: str) -> TensorProto:
        """A tensor named ``name`` holding ``array``, its bytes written to the file now."""
        array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        self._refer(t, *self._write(array.reshape(-1).view(np.uint8)))
        return t

    def place(self, src: TensorProto, dst: TensorProto) -> None:
        """Make ``dst`` (empty, or ``src`` itself) ``src`` with its data in this file: a lazy tensor is copied
        range by range, a tensor in memory from SIZE_THRESHOLD bytes on is written, a smaller one stays inline."""
        if is_lazy(src) and _source(src)[0] == str(self.path):  # written by add(): already in place
            if src is not dst:
                dst.CopyFrom(src)
            return
        if src is not dst:
            _copy_fields(dst, src, _DATA_FIELDS)
        if is_lazy(src):
            file, offset, length = _source(src)
            start = self._start(length)
            _copy_range(file, offset, length, self._file, src.name)
            self.size += length
            self._refer(dst, start, length)
        elif src.data_type != TensorProto.STRING and _nbytes(src) >= SIZE_THRESHOLD:
            data = src.raw_data if src.HasField("raw_data") else numpy_helper.to_array(src).astype(
                helper.tensor_dtype_to_np_dtype(src.data_type)).newbyteorder("<").tobytes()
            self._refer(dst, *self._write(data))
        elif src is not dst:
            dst.CopyFrom(src)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


#: copy_file_range's errors that mean "not here" (another filesystem, an old kernel): copy through memory instead
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}


def _copy_range(file: str, offset: int, length: int, out, tensor: str) -> None:
    """Append bytes ``offset``..``offset + length`` of ``file`` to ``out`` (an unbuffered file): in the kernel
    where it can (no copy through this process's memory), else in 64 MB chunks."""
    left = length
    with open(file, "rb", buffering=0) as f:
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    n = os.copy_file_range(f.fileno(), out.fileno(), min(left, 2**30), offset + length - left)
                    if n == 0:
                        break
                    left -= n
            except OSError as e:
                if e.errno not in _NO_COPY_RANGE or left != length:
                    raise
        f.seek(offset + length - left)
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise ModelError(f"tensor '{tensor}': its data file '{file}' is shorter than its model says; was it "
                                 "changed while omct ran?")
            _write_all(out, chunk)
            left -= len(chunk)


def _write_all(out, data) -> None:
    """``out.write`` of an unbuffered file may write part of ``data`` (Linux writes at most ~2 GB at once)."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[out.write(view):]


_DATA_FIELDS = {"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data",
                "external_data", "data_location"}


def _copy_fields(dst, src, skip: set[str]) -> None:
    """Copy every field of message ``src`` into ``dst`` except ``skip`` (which can hold the big ones)."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:  # protobuf 6 / older
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _inline(src: TensorProto, dst: TensorProto) -> None:
    """``dst`` = ``src`` with a lazy tensor's data read into it (a model written in one file)."""
    if src is not dst:
        dst.CopyFrom(src)
    if is_lazy(src):
        data = _read_bytes(src)
        for field in ("external_data", "data_location"):
            dst.ClearField(field)
        dst.raw_data = data


def _key(number: int) -> bytes:
    return _encode_varint(number << 3 | 2)  # a length-delimited field


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _write_one_file(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` as one protobuf file, the raw data of its big initializers streamed from where it is (its
    files for lazy tensors, the tensor for the others) into the message's wire format: the model is never
    serialised whole (protobuf would copy every weight once more, ``_inline`` once before that)."""
    top = onnx.ModelProto()
    _copy_fields(top, model, {"graph"})
    graph = onnx.GraphProto()
    _copy_fields(graph, model.graph, {"initializer"})
    graph_bytes = graph.SerializeToString()
    del graph
    pieces: list[tuple[bytes, TensorProto | None, int]] = []  # (tensor bytes without raw data, source, data length)
    for t in model.graph.initializer:
        length = _source(t)[2] if is_lazy(t) else (len(t.raw_data) if t.HasField("raw_data") else 0)
        if length >= SKELETON_BYTES:
            stripped = onnx.TensorProto()
            _copy_fields(stripped, t, _DATA_FIELDS)
            head = stripped.SerializeToString() + _key(_TENSOR_RAW_DATA) + _encode_varint(length)
            pieces.append((head, t, length))
        else:
            pieces.append((t.SerializeToString(), None, 0))
    sizes = [len(head) + length for head, _, length in pieces]
    graph_size = len(graph_bytes) + sum(len(_key(_GRAPH_INITIALIZER)) + len(_encode_varint(n)) + n for n in sizes)
    with open(path, "wb", buffering=0) as out, progress(f"writing {path.name}", len(pieces)) as bar:
        _write_all(out, top.SerializeToString() + _key(_MODEL_GRAPH) + _encode_varint(graph_size) + graph_bytes)
        for (head, t, length), size in zip(pieces, sizes, strict=True):
            bar.advance()
            _write_all(out, _key(_GRAPH_INITIALIZER) + _encode_varint(size) + head)
            if t is not None and is_lazy(t):
                file, offset, _ = _source(t)
                _copy_range(file, offset, length, out, t.name)
            elif t is not None:
                _write_all(out, t.raw_data)


def _keep_refs(src: TensorProto, dst: TensorProto) -> None:
    """``dst`` = ``src``, a lazy tensor still referring to its file but without omct's folder entry."""
    if src is not dst:
        dst.CopyFrom(src)
    if is_lazy(src):
        entries = [(e.key, e.value) for e in dst.external_data if e.key not in (FOLDER_KEY, EMBEDDED_KEY)]
        del dst.external_data[:]
        for key, value in entries:
            dst.external_data.add(key=key, value=value)


def _rebuilt(model: onnx.ModelProto, place) -> onnx.ModelProto:
    """A copy of ``model`` built initializer by initializer through ``place(src, dst)`` (no bulk copy of the
    weights); the lazy tensors elsewhere (node attributes, subgraphs) are placed in the copy."""
    out = onnx.ModelProto()
    _copy_fields(out, model, {"graph"})
    _copy_fields(out.graph, model.graph, {"initializer"})
    for t in model.graph.initializer:
        place(t, out.graph.initializer.add())
    for t in list(_tensors(out.graph))[len(out.graph.initializer):]:
        if is_lazy(t):
            place(t, t)
    return out


def _dims_only(src: TensorProto, dst: TensorProto) -> None:
    """``dst`` = ``src`` without its data when it is SKELETON_BYTES or more (a lazy one: always)."""
    if is_lazy(src) or _nbytes(src) >= SKELETON_BYTES:
        _copy_fields(dst, src, _DATA_FIELDS)
    else:
        dst.CopyFrom(src)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with names, types and shapes of its big initializers but not their data: what shape inference
    needs (it reads the values of small constants only, such as a Reshape's shape), at no copy of the weights
    (``onnx.shape_inference.infer_shapes`` serialises and parses its model twice)."""
    return _rebuilt(model, _dims_only)


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
    folders = {e.value for t in _tensors(model.graph) if is_lazy(t) for e in t.external_data if e.key == FOLDER_KEY}
    in_memory = sum(_nbytes(t) for t in model.graph.initializer if not is_lazy(t))
    if (not folders or ort_reads_external_folder()) and len(folders) <= 1 and in_memory <= EXTERNAL_DATA_THRESHOLD:
        header = _rebuilt(model, _keep_refs) if folders else model
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

                header = _rebuilt(model, place)
            del model
            for t in _tensors(header.graph):
                _keep_refs(t, t)
            onnx.save_model(header, str(tmp_model))
        elif has_lazy(model) or tensor_bytes(model) >= EMBEDDED_LAZY_BYTES:  # one file, written tensor by tensor
            if any(is_lazy(t) for t in list(_tensors(model.graph))[len(model.graph.initializer):]):
                model = _rebuilt(model, _inline)  # lazy tensors outside the initializers (rare): read in
            _write_one_file(model, tmp_model)
        else:
            onnx.save_model(model, str(tmp_model))
    finally:
        writer.close()
    pairs = [(tmp_model, path)]
    if writer.path.exists():  # absent when no tensor reached SIZE_THRESHOLD
        pairs.insert(0, (writer.path, path.parent / writer.name))
    return pairs


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
                backup = tmp.with_name(f".previous.{tmp.name}")
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


def save_models(items: list[tuple[ModelSource, str | Path]], external_threshold: int | None = None) -> list[Path]:
    """Write several models all-or-nothing: each is built in a temporary folder beside its target, then all
    are renamed into place. If any write fails, no target is changed (a previous result stays intact).

    Returns the files written. ``external_threshold`` defaults to EXTERNAL_DATA_THRESHOLD (read at call time).
    """
    if external_threshold is None:
        external_threshold = EXTERNAL_DATA_THRESHOLD
    staged: list[tuple[Path, Path]] = []
    tmpdirs: list[str] = []
    try:
        for model, path in items:
            path = prepare_parent(path)
            try:
                tmpdirs.append(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
                staged += _stage(model, path, tmpdirs[-1], external_threshold)
            except OSError as e:
                raise ModelError(f"cannot write '{path}': {e.strerror or e}") from None
        stranded: list[tuple[Path, Path]] = []
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
