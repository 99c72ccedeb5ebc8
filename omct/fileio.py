"""File safety: atomic writes (a temporary file in the target folder, then a rename, so nothing is
half-written) and the check that no output of a call overwrites one of its inputs."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from omct.errors import OmctError, OutputPathError

PathLike = str | os.PathLike


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


def temp_file_beside(path: Path) -> Path:
    """A new, empty hidden file in ``path``'s folder (``.<name>.<random>.tmp``), created exclusively with the mode a
    plain ``open`` gives (0666 less the umask), like the files beside it; what a write goes through before its
    rename onto ``path``. Why not mkstemp: its files are 0600, and reading the umask to widen them costs a file read."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` through a temporary file beside it and a rename."""
    path = prepare_parent(path)
    tmp = temp_file_beside(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _case_insensitive(folder: str) -> bool:
    """Whether ``folder`` (an existing directory) lives on a case-insensitive filesystem (macOS, Windows): the
    nearest folder name with letters, case swapped, still names the same folder."""
    path = os.path.realpath(folder)
    while True:
        head, name = os.path.split(path)
        if name.swapcase() != name:
            try:
                return os.path.samefile(path, os.path.join(head, name.swapcase()))
            except OSError:
                return False
        if head == path or not name:
            return False
        path = head


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file: through symlinks, ``..``, hard links (both exist) and
    case-insensitive filesystems; paths that do not exist yet are compared as normalised real paths."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.exists(a) and os.path.exists(b):
        try:
            return os.path.samefile(a, b)
        except OSError:
            pass  # unreadable: fall back to comparing the paths
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    if os.path.normcase(ra) == os.path.normcase(rb):
        return True
    (da, na), (db, nb) = os.path.split(ra), os.path.split(rb)
    if na.casefold() != nb.casefold():
        return False
    try:
        same_dir = os.path.samefile(da, db)
    except OSError:
        return False
    return same_dir and _case_insensitive(da)


def check_outputs(inputs: Mapping[str, PathLike | None], outputs: Mapping[str, PathLike | None]) -> None:
    """Refuse a call whose outputs would overwrite one of its inputs (or each other), before anything is written.

    Keys are what the user knows the paths by (argument names); ``None`` values are skipped. Raises
    OutputPathError naming both paths.
    """
    ins = [(k, v) for k, v in inputs.items() if v is not None and os.fspath(v) != ""]
    outs = [(k, v) for k, v in outputs.items() if v is not None and os.fspath(v) != ""]
    for i, (out_name, out) in enumerate(outs):
        for in_name, inp in ins:
            if same_file(out, inp):
                raise OutputPathError(f"{out_name} '{os.fspath(out)}' is the input {in_name} '{os.fspath(inp)}'; "
                                      "choose another path")
        for other_name, other in outs[:i]:
            if same_file(out, other):
                raise OutputPathError(f"{out_name} '{os.fspath(out)}' is also {other_name} '{os.fspath(other)}'; "
                                      "give each output its own path")
