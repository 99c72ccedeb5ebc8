"""Load and save ONNX models with clear errors, atomic writes and external data for large models."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from omct.errors import ModelError
from omct.fileio import prepare_parent

#: Protobuf cannot serialise more than 2 GiB; models whose tensors approach it are saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: The newest IR version ONNX Runtime 1.2x-1.3x loads; onnx's helpers may stamp a newer one.
MAX_IR_VERSION = 10


def load_model(path: str | Path, what: str = "model") -> onnx.ModelProto:
    """Load ``path`` (external data included) or raise ModelError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{what} file '{path}' does not exist")
    if path.is_dir():
        raise ModelError(f"{what} path '{path}' is a folder; give the .onnx file")
    if path.stat().st_size == 0:
        raise ModelError(f"{what} file '{path}' is empty")
    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"{what} file '{path}' is not a readable ONNX model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'parse failed'}); is it corrupt or another format?") from None
    if not model.graph.node or not model.opset_import:
        raise ModelError(f"{what} file '{path}' is not an ONNX model (no graph nodes or opset); is it another format?")
    return model


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's initializers (protobuf's ByteSize fails beyond 2 GiB)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) or (len(t.float_data) * 4 + len(t.int32_data) * 4 + len(t.int64_data) * 8)
    return total


def save_model(model: onnx.ModelProto, path: str | Path, external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write ``model`` to ``path`` atomically; tensors go to ``<name>.data`` when the model is too large.

    Returns the files written. Nothing is left half-written: files are built in a temporary folder beside
    the target and renamed into place, data file first.
    """
    path = prepare_parent(path)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    external = tensor_bytes(model) > external_threshold
    tmpdir = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        tmp_model = Path(tmpdir) / path.name
        if external:
            data_name = path.name + ".data"
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            onnx.save_model(to_save, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=256)
            written = [path]
            if (Path(tmpdir) / data_name).exists():  # absent when no tensor reached size_threshold
                os.replace(Path(tmpdir) / data_name, path.parent / data_name)
                written.insert(0, path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
            written = [path]
        os.replace(tmp_model, path)
        return written
    except OSError as e:
        raise ModelError(f"cannot write '{path}': {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
