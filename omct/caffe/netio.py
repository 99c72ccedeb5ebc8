"""Caffe files without Caffe: the text ``.prototxt`` and the binary ``.caffemodel`` (current ``layer`` format and
old V1 ``layers`` files), read into one ``NetParameter`` whose layers carry their weights, and written back.

Errors name the file and what is wrong in one line: a prototxt syntax error with its line, a truncated or
foreign caffemodel, a layer of the prototxt without weights in the caffemodel.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from omct.caffe.schema import message_class, v1_type_names
from omct.errors import ModelError
from omct.fileio import atomic_write_bytes, atomic_write_text
from omct.ui import logger

#: messages whose schema here lacks fields of real Caffe forks (parameter messages of layer types omct does not
#: convert): an unknown field in them is skipped with a warning; in every other message it is a typo
PARTIAL_MESSAGES = {"LayerParameter", "V1LayerParameter"}

#: layer types that carry no computation at test time and are dropped on reading
DROPPED_TYPES = {"Silence"}


def _read(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{what} '{path}' does not exist" if not p.exists() else f"{what} '{path}' is not a file")
    return p.read_bytes()


def parse_prototxt(text: str, source: str = "the prototxt"):
    """A ``NetParameter`` from prototxt text. Fields omct's schema does not define (data-layer and solver options)
    are skipped with a warning; a syntax error names its line."""
    net_class = message_class("NetParameter")
    net = net_class()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as e:
        unknown_in = re.search(r'Message type "caffe\.(\w+)" has no field named "(\w+)"', str(e))
        if not unknown_in or unknown_in.group(1) not in PARTIAL_MESSAGES:
            hint = _suggestion(unknown_in)
            raise ModelError(f"{source}: {_located(e).rstrip('.') if hint else _located(e)}{hint}") from None
        net = net_class()
        try:
            text_format.Parse(text, net, allow_unknown_field=True)
        except text_format.ParseError as e2:
            raise ModelError(f"{source}: {_located(e2)}") from None
        unknown = sorted(set(re.findall(r'has no field named "(\w+)"', str(e))))
        logger.warning("%s: skipped field(s) omct does not use, from line %s on: %s", source, _line(e) or "?",
                       ", ".join(unknown))
    return upgrade_v1(net, source)


def _suggestion(unknown) -> str:
    """'; did you mean ...' for a misspelt field of a message omct defines completely."""
    if not unknown:
        return ""
    fields = message_class(unknown.group(1)).DESCRIPTOR.fields_by_name
    close = difflib.get_close_matches(unknown.group(2), list(fields), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _line(e: text_format.ParseError) -> int | None:
    line = getattr(e, "line", None)
    if line is None:
        m = re.match(r"(\d+):(\d+)", str(e))
        line = int(m.group(1)) if m else None
    return line


def _located(e: text_format.ParseError) -> str:
    line = _line(e)
    message = re.sub(r"^\d+:\d+ : ", "", str(e))
    return f"line {line}: {message}" if line is not None else message


def read_prototxt(path: str | os.PathLike):
    """The network of a ``.prototxt`` (V1 ``layers`` upgraded to ``layer``)."""
    data = _read(path, "model_file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"model_file '{path}' is not a text prototxt (is it the .caffemodel?)") from None
    return parse_prototxt(text, f"model_file '{path}'")


def read_caffemodel(path: str | os.PathLike):
    """The network of a binary ``.caffemodel`` with its blobs (V1 ``layers`` upgraded)."""
    data = _read(path, "weights_file")
    net = message_class("NetParameter")()
    try:
        net.ParseFromString(data)
    except DecodeError as e:
        raise ModelError(f"weights_file '{path}' is not a Caffe weights file or it is truncated "
                         f"({len(data)} bytes; protobuf: {e})") from None
    if not len(net.layer) and not len(net.layers):
        raise ModelError(f"weights_file '{path}' holds no layers: it is not a .caffemodel (or is empty)")
    return upgrade_v1(net, f"weights_file '{path}'")


def upgrade_v1(net, source: str):
    """Move old V1 ``layers`` into ``layer`` (type enum -> type string; same parameter messages), as Caffe's
    own upgrade does for the fields omct uses."""
    if not len(net.layers):
        return net
    if len(net.layer):
        raise ModelError(f"{source} mixes 'layer' and old V1 'layers' entries; use one format")
    types = v1_type_names()
    for old in net.layers:
        new = net.layer.add(name=old.name, type=types.get(old.type, str(old.type)))
        new.bottom.extend(old.bottom)
        new.top.extend(old.top)
        new.MergeFromString(blob_fields(b.SerializeToString() for b in old.blobs))
        new.include.extend(old.include)
        new.exclude.extend(old.exclude)
        new.loss_weight.extend(old.loss_weight)
        for field, value in old.ListFields():
            if field.name.endswith("_param") and field.name in new.DESCRIPTOR.fields_by_name:
                getattr(new, field.name).CopyFrom(value)
    del net.layers[:]
    logger.info("%s: upgraded %d V1 'layers' entries", source, len(net.layer))
    return net


def _in_test_phase(layer) -> bool:
    test = 1
    if any(rule.HasField("phase") and rule.phase != test for rule in layer.include):
        return False
    return not any(rule.HasField("phase") and rule.phase == test for rule in layer.exclude)


def load_net(model_file: str | os.PathLike, weights_file: str | os.PathLike):
    """The test-phase network of ``model_file`` with the blobs of ``weights_file`` (matched by layer name)."""
    net = read_prototxt(model_file)
    weights = read_caffemodel(weights_file)
    blobs = {layer.name: layer.blobs for layer in weights.layer if len(layer.blobs)}
    for i in reversed(range(len(net.layer))):  # deleted in place: re-adding layers would copy their blobs
        if not _in_test_phase(net.layer[i]) or net.layer[i].type in DROPPED_TYPES:
            del net.layer[i]
    for layer in net.layer:
        if len(layer.blobs) == 0 and layer.name in blobs:  # through bytes: upb copies big blobs value by value
            layer.MergeFromString(blob_fields(b.SerializeToString() for b in blobs[layer.name]))
    return net


def blob_array(blob) -> np.ndarray:
    """A blob's values with its shape (``shape.dim``, or the legacy num/channels/height/width)."""
    values = np.asarray(blob.double_data if len(blob.double_data) and not len(blob.data) else blob.data, np.float32)
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = tuple(int(v) for v in (blob.num, blob.channels, blob.height, blob.width))
    if int(np.prod(shape)) != values.size:
        raise ValueError(f"{values.size} values for shape {shape}")
    return values.reshape(shape)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits, n = n & 0x7F, n >> 7
        out.append(bits | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (a message, a string or a packed run)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def blob_bytes(array: np.ndarray) -> bytes:
    """A serialized ``BlobProto`` of ``array``: ``shape.dim`` and the float data as one packed run (building it
    value by value through protobuf costs seconds per ten million values)."""
    shape = _field(1, b"".join(_varint(int(d)) for d in np.shape(array)))  # BlobShape.dim, packed
    return _field(7, shape) + _field(5, np.ascontiguousarray(array, dtype="<f4").tobytes())


def blob_fields(serialized_blobs) -> bytes:
    """Serialized blobs as ``LayerParameter.blobs`` entries (field 7), to merge into a layer."""
    return b"".join(_field(7, b) for b in serialized_blobs)


def set_blob(blob, array: np.ndarray) -> None:
    """Store ``array`` in ``blob`` (float data, ``shape.dim``)."""
    blob.Clear()
    blob.MergeFromString(blob_bytes(array))


def without(message, fields: set[str]):
    """A copy of ``message`` without ``fields`` (the blobs, the layers): copying them is what costs."""
    out = type(message)()
    for field, value in message.ListFields():
        if field.name in fields:
            continue
        if (field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED):
            getattr(out, field.name).extend(value)
        elif field.message_type is not None:
            getattr(out, field.name).CopyFrom(value)
        else:
            setattr(out, field.name, value)
    return out


def caffemodel_bytes(head, layers) -> bytes:
    """A serialized ``NetParameter``: ``head`` (the net without layers) and ``layers`` as (layer without blobs,
    its serialized blobs), concatenated rather than copied into one message."""
    parts = [head.SerializeToString()]
    for layer, blobs in layers:
        parts.append(_field(100, layer.SerializeToString() + blob_fields(blobs)))
    return b"".join(parts)


def prototxt_text(net) -> str:
    """The network as prototxt text, without blobs."""
    copy = without(net, {"layer", "layers"})
    copy.layer.extend(without(layer, {"blobs"}) for layer in net.layer)
    copy.layers.extend(without(layer, {"blobs"}) for layer in net.layers)
    return text_format.MessageToString(copy)


def write_prototxt(net, path: str | os.PathLike) -> None:
    atomic_write_text(path, prototxt_text(net))


def write_caffemodel(net, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, net.SerializeToString())
