"""Reusing ``create_quant_config``'s export in ``quantize_model``.

AMCT's call sequence hands the same module and input to both calls, and each has to trace it: the export is
the single largest cost of ``quantize_model`` on a CNN. The first export is kept (its serialised bytes, in one
slot) and reused by the next ``quantize_model`` only when it is provably the export a new trace would give:

* the same module object (held weakly: the slot empties when the model dies);
* the same state, compared by value: the module tree (names, types, ``forward``), training flags, forward
  hooks (by handle id: ids are never reused), every parameter, buffer and tensor attribute (shape, dtype,
  strides, device, version counter and a CRC-32 of its bytes: an in-place edit through ``.data`` does not
  bump the version counter) and the plain attributes (numbers, strings, tuples, config objects'
  fields; any other object by identity, held while cached so that its id cannot be reused);
* the same input values (not only shapes: a traced ``forward`` may branch on them);
* the same export options, up to the names of the graph inputs and outputs and the outputs' dynamic axes,
  which the exporter only writes into the graph's signature (``trace.RawExport.as_exported``).

The slot is emptied by ``quantize_model`` whatever it finds, so the bytes live only between the two calls.
What ``forward()`` reads outside the module and its inputs (global variables) is not covered.
"""

from __future__ import annotations

import enum
import gc
import threading
import weakref
import zlib
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from omct.pytorch.trace import RawExport

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, enum.Enum)
_NUMPY_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16,
                           torch.int8, torch.uint8, torch.bool})
_EXACT = frozenset({type(None), bool, int, float, str})
_MAX_DEPTH = 4
#: nn.Module state that a forward pass never reads (backward and state_dict hooks, the child modules, which are
#: walked one by one)
_NOT_TRACED = frozenset({"_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks",
                         "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                         "_non_persistent_buffers_set", "_modules"})


class _Unhashable(Exception):
    """A tensor whose bytes cannot be read here (meta, sparse, quantized): the export is not cached."""


def _tensor_key(t: torch.Tensor) -> tuple:
    if t.is_sparse or t.is_quantized or t.device.type == "meta" or t.is_nested:
        raise _Unhashable
    try:
        data = t.detach()
        if data.device.type == "cpu" and data.dtype in _NUMPY_DTYPES and data.is_contiguous():
            flat = data.numpy()  # no copy, and fewer torch calls: there are hundreds of small tensors
        else:
            flat = data.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        version = t._version  # an inference-mode tensor has none
    except (RuntimeError, TypeError) as e:
        raise _Unhashable from e
    return ("tensor", type(t), data.dtype, data.shape, data.stride(), data.storage_offset(), data.device,
            t.requires_grad, version, zlib.crc32(flat))


class _Fingerprint:
    """The values a trace depends on, as one comparable tuple; ``keep`` holds the objects compared by identity."""

    def __init__(self) -> None:
        self.keep: list[Any] = []
        self._tensors: dict[int, tuple] = {}

    def value(self, v: Any, depth: int = 0) -> Any:
        kind = type(v)
        if kind in _EXACT:  # the common case first: this walk is on the clock twice per quantization
            return (kind, v)
        if kind is dict or kind is OrderedDict:
            if not v:
                return kind
            if depth < _MAX_DEPTH:
                return (kind, tuple((self.value(k, depth + 1), self.value(x, depth + 1)) for k, x in v.items()))
        if isinstance(v, torch.Tensor):
            key = self._tensors.get(id(v))
            if key is None:
                key = self._tensors[id(v)] = _tensor_key(v)  # by value: no weight is kept
            return key
        if isinstance(v, _PLAIN):
            return (kind, v)
        if isinstance(v, nn.Module):  # the module tree is walked on its own: here only what sits where
            return ("module", kind)
        if depth < _MAX_DEPTH:
            if isinstance(v, tuple | list | set | frozenset):
                items = sorted(v, key=repr) if isinstance(v, set | frozenset) else v
                return (kind, tuple(self.value(x, depth + 1) for x in items))
            if isinstance(v, dict):
                return (kind, tuple((self.value(k, depth + 1), self.value(x, depth + 1)) for k, x in v.items()))
            fields = getattr(v, "__dict__", None)
            if isinstance(fields, dict) and not callable(v):  # a config object: its fields
                self.keep.append(v)
                return ("object", kind, id(v), self.value(fields, depth + 1))
        self.keep.append(v)  # compared by identity: kept alive, so that its id is not reused
        return ("object", kind, id(v))

    def module(self, model: nn.Module) -> tuple:
        glob = nn.modules.module
        parts: list[Any] = [tuple(getattr(glob, h, {}).keys()) for h in
                            ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_module_registration_hooks")]
        for name, m in model.named_modules(remove_duplicate=False):
            state = tuple((k, self.value(v, 1)) for k, v in vars(m).items() if k not in _NOT_TRACED)
            parts.append((name, type(m), type(m).forward, state))
        return tuple(parts)


def fingerprint(model: nn.Module, args: tuple) -> tuple[tuple, list[Any]] | None:
    """What the export of ``model(*args)`` depends on, and the objects it holds; None when it cannot be known."""
    fp = _Fingerprint()
    collecting = gc.isenabled()
    gc.disable()  # the walk builds many small tuples: collections would scan the whole heap again and again
    try:
        key = (fp.module(model), fp.value(args))
    except _Unhashable:
        return None
    finally:
        if collecting:
            gc.enable()
    return key, fp.keep


class ExportCache:
    """One slot: the latest export of a user's module, until the next ``take`` or until the module dies."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a collection inside a locked section may run _drop
        self._entry: tuple[weakref.ref, tuple, list[Any], RawExport] | None = None

    def clear(self) -> None:
        with self._lock:
            self._entry = None

    def remember(self, model: nn.Module, key: tuple[tuple, list[Any]] | None, raw: RawExport) -> None:
        """Keep ``raw`` (the export of ``model`` in the state ``key`` = ``fingerprint(...)`` describes)."""
        if key is None:
            self.clear()
            return
        ref = weakref.ref(model, lambda _ref: self._drop(_ref))
        with self._lock:
            self._entry = (ref, key[0], key[1], raw)

    def _drop(self, ref: weakref.ref) -> None:
        with self._lock:
            if self._entry is not None and self._entry[0] is ref:
                self._entry = None

    def holds(self, model: nn.Module) -> bool:
        """Whether the slot holds an export of ``model`` (so that fingerprinting it again can pay off)."""
        with self._lock:
            if self._entry is not None and self._entry[0]() is model:
                return True
            self._entry = None
            return False

    def take(self, model: nn.Module, key: tuple[tuple, list[Any]] | None) -> RawExport | None:
        """The kept export when ``model`` is the same object in the same state (``key``), else None; the slot
        is emptied either way."""
        with self._lock:
            entry, self._entry = self._entry, None
        if entry is None or key is None or entry[0]() is not model:
            return None
        return entry[3] if entry[1] == key[0] else None


#: create_quant_config -> quantize_model (and the automatic searches' prepare step)
CACHE = ExportCache()
