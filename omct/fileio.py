"""Atomic file writes: a temporary file in the target folder, then a rename, so nothing is half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omct.errors import OmctError


def prepare_parent(path: str | Path) -> Path:
    """Create the parent folder of ``path`` if needed; fail clearly if it cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OmctError(f"cannot create folder '{parent}' for '{path}': {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OmctError(f"cannot write to folder '{parent}' (permission denied); choose another output path")
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = prepare_parent(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
