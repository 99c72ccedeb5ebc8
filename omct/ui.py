"""What omct tells the user: one logger, progress bars when interactive, quiet in CI or on request."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

logger = logging.getLogger("omct")
#: the API's "what to call next" lines (AMCT's call sequence); the command line runs those steps itself and
#: silences this child logger, so its log speaks CLI
hints = logging.getLogger("omct.hints")
_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """Silence progress bars and informational messages (errors are still raised)."""
    global _quiet
    _quiet = quiet
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def is_quiet() -> bool:
    return _quiet or os.environ.get("OMCT_QUIET", "") not in ("", "0")


def _setup_logger() -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("omct: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if is_quiet() else logging.INFO)
    logger.propagate = False


_setup_logger()


def interactive() -> bool:
    return not is_quiet() and sys.stderr.isatty() and not os.environ.get("CI")


class Progress:
    """A progress bar on stderr when interactive; nothing otherwise."""

    def __init__(self, description: str, total: int | None):
        self._bar = None
        if interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def progress(description: str, total: int | None):
    bar = Progress(description, total)
    try:
        yield bar
    finally:
        bar.close()


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain aligned columns, every cell whole (layer names are what ``--skip`` needs, so nothing is cut)."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def shown_path(path: str | os.PathLike) -> str:
    """A path as messages print it: relative to the working folder when it lies inside it (the record file's
    path is stored absolute in the modified model, the others are printed as the user gave them)."""
    text = os.fspath(path)
    if os.path.isabs(text):
        try:
            rel = os.path.relpath(text)
        except ValueError:  # another drive (Windows)
            return text
        if not rel.startswith(os.pardir):
            return rel
    return text
