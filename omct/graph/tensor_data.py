"""Where a model's tensor bytes live, so that a big model is never held whole: references into files (a
lazily loaded model's external data, or the raw data inside a one-file model, found by walking protobuf's wire
format), read memory-mapped, and written tensor by tensor (an external-data file, or a one-file model's wire
format). ``model_io`` loads and saves models with these."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from omct.errors import ModelError
from omct.ui import progress

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
#: The external-data entry that marks a reference into a one-file model's own file (``load_embedded``): such a
#: model's outputs stay one file. Stripped like FOLDER_KEY.
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


def load_embedded(path: Path) -> onnx.ModelProto | None:
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


_A = onnx.AttributeProto
#: attribute types that hold no tensor and no graph (a valid model sets only the field its type names)
_PLAIN = {_A.FLOAT, _A.INT, _A.STRING, _A.FLOATS, _A.INTS, _A.STRINGS, _A.TYPE_PROTO, _A.TYPE_PROTOS}


def all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in _PLAIN:  # most attributes: skipped without reading four fields (PTQ wall, issue 17)
                continue
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_tensors(sub)


_PACKED_4BIT = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}


def raw_data_bytes(t: TensorProto) -> int:
    """Length of ``t.raw_data`` (0 when unset), from its dims and type: with protobuf's upb runtime reading the
    field itself copies every byte of it (``len(t.raw_data)`` on a 100 MB weight: 0.15 s and 100 MB more)."""
    if not t.HasField("raw_data"):
        return 0
    count = 1
    for d in t.dims:
        count *= d
    if t.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    try:
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):  # a type numpy cannot name: ask the field
        return len(t.raw_data)


def in_memory_bytes(t: TensorProto) -> int:
    return raw_data_bytes(t) or (len(t.float_data) * 4 + len(t.int32_data) * 4 + len(t.int64_data) * 8
                                 + len(t.double_data) * 8 + len(t.uint64_data) * 8)


def is_lazy(t: TensorProto) -> bool:
    """Whether ``t`` is an external tensor of a model loaded with ``lazy=True`` (its data still in its file)."""
    return t.data_location == TensorProto.EXTERNAL and any(e.key == FOLDER_KEY for e in t.external_data)


def has_lazy(model: onnx.ModelProto) -> bool:
    return any(is_lazy(t) for t in all_tensors(model.graph))


def has_external(model: onnx.ModelProto) -> bool:
    """Whether ``model`` has lazy tensors that came from external data (not from inside a one-file model): its
    outputs keep external data."""
    return any(is_lazy(t) and all(e.key != EMBEDDED_KEY for e in t.external_data) for t in all_tensors(model.graph))


def data_source(t: TensorProto) -> tuple[str, int, int]:
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
    file, offset, length = data_source(t)
    with open(file, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ModelError(f"tensor '{t.name}': its data file '{file}' ended after {len(data)} of {length} bytes; was it "
                         "changed while omct ran?")
    return data


#: Lazy tensors up to this size are read into memory rather than mapped: a fresh mapping faults every page in
#: on each read (a ResNet's weights are read five times between calibration and export: ~0.1 ms more each).
READ_BYTES = 16 * 2**20


def tensor_array(t: TensorProto) -> np.ndarray:
    """The values of ``t``. A lazily loaded tensor from ``READ_BYTES`` on is memory-mapped read-only: nothing is
    read until the values are used, the pages belong to the file (the system can drop them), and dropping the
    array releases them; a smaller one is read (read-only too)."""
    if not is_lazy(t):
        return numpy_helper.to_array(t)
    file, offset, length = data_source(t)
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
    if length >= READ_BYTES:
        return np.memmap(file, dtype, "r", offset, shape).view(np.ndarray)
    out = np.empty(shape, dtype)
    with open(file, "rb", buffering=0) as f:
        f.seek(offset)
        got = f.readinto(memoryview(out.reshape(-1)).cast("B"))
    if got != length:
        raise ModelError(f"tensor '{t.name}': its data file '{file}' ended after {got} of {length} bytes; was it "
                         "changed while omct ran?")
    out.flags.writeable = False  # read-only as a mapped one: the model's values, not a scratch buffer
    return out


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
        if is_lazy(src) and data_source(src)[0] == str(self.path):  # written by add(): already in place
            if src is not dst:
                dst.CopyFrom(src)
            return
        if src is not dst:
            _copy_fields(dst, src, _DATA_FIELDS)
        if is_lazy(src):
            file, offset, length = data_source(src)
            start = self._start(length)
            _copy_range(file, offset, length, self._file, src.name)
            self.size += length
            self._refer(dst, start, length)
        elif src.data_type != TensorProto.STRING and in_memory_bytes(src) >= SIZE_THRESHOLD:
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
    """Copy every field of message ``src`` into ``dst`` except ``skip`` (which can hold the big ones). Fields are
    read by name, skipped ones never: ``ListFields`` would hand out (with upb: copy) every field's value."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name in skip:
            continue
        if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:  # protobuf 6 / older
            value = getattr(src, fd.name)
            if len(value):
                getattr(dst, fd.name).extend(value)
        elif not src.HasField(fd.name):
            continue
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
        else:
            setattr(dst, fd.name, getattr(src, fd.name))


def read_in(src: TensorProto, dst: TensorProto) -> None:
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


def write_one_file(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` as one protobuf file, the raw data of its big initializers streamed from where it is (its
    files for lazy tensors, the tensor for the others) into the message's wire format: the model is never
    serialised whole (protobuf would copy every weight once more, ``read_in`` once before that)."""
    top = onnx.ModelProto()
    _copy_fields(top, model, {"graph"})
    graph = onnx.GraphProto()
    _copy_fields(graph, model.graph, {"initializer"})
    graph_bytes = graph.SerializeToString()
    del graph
    pieces: list[tuple[bytes, TensorProto | None, int]] = []  # (tensor bytes without raw data, source, data length)
    for t in model.graph.initializer:
        length = data_source(t)[2] if is_lazy(t) else raw_data_bytes(t)
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
                file, offset, _ = data_source(t)
                _copy_range(file, offset, length, out, t.name)
            elif t is not None:
                _write_all(out, t.raw_data)


def keep_refs(src: TensorProto, dst: TensorProto) -> None:
    """``dst`` = ``src``, a lazy tensor still referring to its file but without omct's folder entry."""
    if src is not dst:
        dst.CopyFrom(src)
    if is_lazy(src):
        entries = [(e.key, e.value) for e in dst.external_data if e.key not in (FOLDER_KEY, EMBEDDED_KEY)]
        del dst.external_data[:]
        for key, value in entries:
            dst.external_data.add(key=key, value=value)


def rebuilt(model: onnx.ModelProto, place) -> onnx.ModelProto:
    """A copy of ``model`` built initializer by initializer through ``place(src, dst)`` (no bulk copy of the
    weights); the lazy tensors elsewhere (node attributes, subgraphs) are placed in the copy."""
    out = onnx.ModelProto()
    _copy_fields(out, model, {"graph"})
    _copy_fields(out.graph, model.graph, {"initializer"})
    for t in model.graph.initializer:
        place(t, out.graph.initializer.add())
    for t in list(all_tensors(out.graph))[len(out.graph.initializer):]:
        if is_lazy(t):
            place(t, t)
    return out


def _dims_only(src: TensorProto, dst: TensorProto) -> None:
    """``dst`` = ``src`` without its data when it is SKELETON_BYTES or more (a lazy one: always)."""
    if is_lazy(src) or in_memory_bytes(src) >= SKELETON_BYTES:
        _copy_fields(dst, src, _DATA_FIELDS)
    else:
        dst.CopyFrom(src)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with names, types and shapes of its big initializers but not their data: what shape inference
    needs (it reads the values of small constants only, such as a Reshape's shape), at no copy of the weights
    (``onnx.shape_inference.infer_shapes`` serialises and parses its model twice)."""
    return rebuilt(model, _dims_only)
