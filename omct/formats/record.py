"""The record file: AMCT's ``ScaleOffsetRecord`` in protobuf text format, one entry per layer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_encoding, text_format

from omct.errors import RecordError
from omct.fileio import atomic_write_text
from omct.formats.proto import ScaleOffsetRecord


@dataclass
class LayerRecord:
    """Quantization factors of one layer: input (``_d``), weights (``_w``) and, for integer kernels, output (``_o``).

    A weight-only layer (an embedding table lookup) quantizes no input: the format requires ``scale_d``, so it is
    1 with ``offset_d`` 0 and unused (the modified model's plan marks the layer weight-only); ``scale_w`` has one
    scale per table row."""

    scale_d: float
    offset_d: int
    scale_w: list[float] = field(default_factory=list)
    offset_w: list[int] = field(default_factory=list)
    scale_o: float | None = None
    offset_o: int | None = None
    bias_correction: list[float] = field(default_factory=list)  # added to the float bias before it is quantized
    nuq_levels: list[int] = field(default_factory=list)  # NUQ: per weight scale, the sorted INT8 levels it keeps
    # AdaRound: flat indices (gap-coded) of the weights that round the other way than round-to-nearest
    ada_flip: list[int] = field(default_factory=list)
    # dmq_balancer: per input channel, the layer reads its input divided by these and its weight multiplied
    dmq_factor: list[float] = field(default_factory=list)


def _f32(values) -> list[str]:
    """The shortest text of each value that reads back as the same float32 (the record stores float32)."""
    return [str(v) for v in np.asarray(values, np.float32).reshape(-1)]


def record_text(records: dict[str, LayerRecord]) -> str:
    """``records`` as AMCT's ScaleOffsetRecord in protobuf text format, fields in field-number order.

    Written directly rather than through protobuf's text printer, which formats each float in Python and took
    most of a small model's calibration time; a test checks that protobuf parses it to the same message."""
    chunks = []  # one string per layer: not every line of the file alive at once (records' peak, issue 17 item 7)
    for key, rec in records.items():
        lines = ["record {", f'  key: "{text_encoding.CEscape(key, as_utf8=True)}"', "  value {",
                  f"    scale_d: {_f32(rec.scale_d)[0]}", f"    offset_d: {int(rec.offset_d)}"]
        lines += [f"    scale_w: {v}" for v in _f32(rec.scale_w)]
        lines += [f"    offset_w: {int(v)}" for v in rec.offset_w]
        if rec.scale_o is not None:
            lines += [f"    scale_o: {_f32(rec.scale_o)[0]}", f"    offset_o: {int(rec.offset_o)}"]
        lines += [f"    bias_correction: {v}" for v in _f32(rec.bias_correction)]
        if rec.ada_flip:  # one line, protobuf's list syntax: a layer may have thousands
            # as Python ints, whose list text is protobuf's list syntax (3x faster than joining str of each)
            lines.append(f"    ada_flip: {np.asarray(rec.ada_flip, np.int64).reshape(-1).tolist()}")
        lines += [f"    dmq_factor: {v}" for v in _f32(rec.dmq_factor)]
        lines += [f"    nuq_levels: {int(v)}" for v in rec.nuq_levels]
        lines += ["  }", "}"]
        chunks.append("\n".join(lines) + "\n")
    return "".join(chunks) if chunks else "\n"


def write_record(path: str | Path, records: dict[str, LayerRecord]) -> None:
    text = record_text(records)
    atomic_write_text(path, text)
    global _last_written
    _last_written = (_digest(text), {k: _compact(r) for k, r in records.items()})


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode()).digest()


def _compact(rec: LayerRecord) -> LayerRecord:
    """A copy with its lists in numpy arrays (4-8 bytes a value against 32-36 in a Python list; held from calibration to
    save_model); ``_copy`` of it gives exactly ``_copy`` of ``rec``."""
    f32s = lambda v: np.array(v, np.float32).reshape(-1)  # noqa: E731 - always a copy: rec may change later
    ints = lambda v: np.array(v, np.int64).reshape(-1)  # noqa: E731
    return LayerRecord(float(np.float32(rec.scale_d)), int(rec.offset_d), f32s(rec.scale_w), ints(rec.offset_w),
                       None if rec.scale_o is None else float(np.float32(rec.scale_o)),
                       None if rec.offset_o is None else int(rec.offset_o), f32s(rec.bias_correction),
                       ints(rec.nuq_levels), ints(rec.ada_flip), f32s(rec.dmq_factor))


def _copy(rec: LayerRecord) -> LayerRecord:
    """As the file holds it: float32 values."""
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    # lists converted by numpy, not value by value in Python (the same floats; a CNN's lists hold ~10^4 values)
    f32s = lambda v: np.asarray(v, np.float32).reshape(-1).astype(np.float64).tolist()  # noqa: E731
    ints = lambda v: np.asarray(v, np.int64).reshape(-1).tolist()  # noqa: E731
    return LayerRecord(f32(rec.scale_d), int(rec.offset_d), f32s(rec.scale_w), ints(rec.offset_w),
                       None if rec.scale_o is None else f32(rec.scale_o), None if rec.offset_o is None else int(rec.offset_o),
                       f32s(rec.bias_correction), ints(rec.nuq_levels), ints(rec.ada_flip), f32s(rec.dmq_factor))


# The last record this process wrote (its text's digest), with its layers: save_model reads back the file
# calibration has just written, and text-format parsing is pure Python (tens of ms for a small CNN). Compared by
# content, so a record edited by hand in between is parsed as usual.
_last_written: tuple[bytes, dict[str, LayerRecord]] | None = None


_PENDING = "# omct: calibration pending:"


def _pending_text(seen: int, batch_num: int, layers: list[str]) -> str:
    # the count padded to batch_num's width, so that each batch's update has the same length
    return f"{_PENDING} {seen:>{len(str(batch_num))}} of {batch_num} batches for {len(layers)} layers: {' '.join(layers)}\n"


def write_pending_record(path: str | Path, seen: int, batch_num: int, layers: list[str]) -> None:
    """A record file with no factors yet, saying how far calibration got (read back by save_model's checks)."""
    atomic_write_text(path, _pending_text(seen, batch_num, layers))


def update_pending_record(path: str | Path, seen: int, batch_num: int, layers: list[str]) -> None:
    """``write_pending_record`` for a calibration that goes on: when ``path`` already is this calibration's
    pending record, only its count changes, written in place (same length, one write; the file was made
    atomically). Why: replacing a file (rename, or truncate and write) makes ext4 flush it, ~5 ms a batch on
    this host, which was most of a small CNN's forward pass. Anything else there: written afresh, atomically."""
    text = _pending_text(seen, batch_num, layers).encode("utf-8")
    at, width = len(_PENDING) + 1, len(str(batch_num))
    try:
        with open(path, "r+b") as f:
            old = f.read(len(text) + 1)
            if len(old) == len(text) and old[:at] == text[:at] and old[at + width:] == text[at + width:]:
                f.seek(at)
                f.write(text[at : at + width])
                return
    except OSError:
        pass
    write_pending_record(path, seen, batch_num, layers)


def pending_status(path: str | Path) -> str | None:
    """'calibration ran X of N batches ...' when ``path`` is a pending record, else None."""
    try:
        first = Path(path).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    if not first.startswith(_PENDING):
        return None
    seen, _, batch_num = first[len(_PENDING):].split(" batches")[0].split()[:3]
    layers = first.split(" layers: ", 1)[-1].split()
    shown = ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
    return (f"calibration ran {seen} of batch_num={batch_num} batches (layers {shown}); run "
            f"{int(batch_num) - int(seen)} more batch(es) through the calibration model before save_model")


def read_record(path: str | Path) -> dict[str, LayerRecord]:
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"record file '{path}' does not exist: run calibration (batch_num batches) first")
    text = path.read_text()
    if _last_written is not None and _last_written[0] == _digest(text):
        return {k: _copy(r) for k, r in _last_written[1].items()}
    try:
        msg = text_format.Parse(text, ScaleOffsetRecord())
    except text_format.ParseError as e:
        raise RecordError(f"{path}: not a valid record file ({e})") from None
    if not msg.record:
        status = pending_status(path)
        raise RecordError(f"record file '{path}' holds no factors: " + (status or "it is empty"))
    out = {}
    for entry in msg.record:
        v = entry.value
        if not v.HasField("scale_d"):
            raise RecordError(f"{path}: layer '{entry.key}' has no scale_d")
        if len(v.scale_w) != len(v.offset_w):
            raise RecordError(f"{path}: layer '{entry.key}' has {len(v.scale_w)} scale_w but {len(v.offset_w)} offset_w")
        if not np.isfinite(v.scale_d) or v.scale_d <= 0 or any(not np.isfinite(s) or s <= 0 for s in v.scale_w):
            raise RecordError(f"{path}: layer '{entry.key}' has a scale that is not a positive finite number")
        levels = np.asarray(v.nuq_levels, np.int64)
        rows = max(len(v.scale_w), 1)  # one table per weight scale
        if levels.size and (levels.size % rows or levels.size // rows > 128 or levels.min() < -128 or levels.max() > 127
                            or np.any(np.diff(levels.reshape(rows, -1), axis=1) < 0)):
            raise RecordError(f"{path}: layer '{entry.key}' has nuq_levels that are not one sorted table of at most "
                              "128 INT8 values per weight scale")
        out[entry.key] = LayerRecord(v.scale_d, v.offset_d, list(v.scale_w), list(v.offset_w),
                                     v.scale_o if v.HasField("scale_o") else None,
                                     v.offset_o if v.HasField("offset_o") else None, list(v.bias_correction),
                                     list(v.nuq_levels), list(v.ada_flip), list(v.dmq_factor))
    return out
