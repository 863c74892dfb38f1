"""Plain-text output: the one column aligner behind every table the command line prints, and
:func:`printable`, which every line the command line prints passes through (stdlib only)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
"""Unicode bidirectional marks, embeddings, overrides and isolates: they reorder what a terminal shows."""

_CONTROLS = [*map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0)), *_BIDI]
"""Escaped by :func:`printable`: C0 controls (ESC, BEL, CR...), DEL, C1 controls (CSI, OSC...), bidi controls."""


@functools.lru_cache(maxsize=8)
def _escapes(keep: str) -> dict[int, str]:
    return {ord(c): c.encode("unicode_escape").decode("ascii") for c in _CONTROLS if c not in keep}


def printable(text: object, keep: str = "\n") -> str:
    """``text`` made safe for a terminal: control characters shown as Python escapes, other unicode intact.

    Pool data (axis values, pool names, run names, error messages) can hold terminal escape sequences:
    ``ESC]0;...BEL`` retitles the window, others move the cursor, rewrite earlier lines or answer back.
    Each control character becomes its escape (``\\x1b``, ``\\x07``, ``\\r``, ``\\u202e``), so the text is
    shown, not obeyed; letters in any script, emoji and accents are kept as they are.

    Args:
        text: anything; shown as ``str(text)``.
        keep: control characters left as they are (by default the newline between lines).
    """
    return str(text).translate(_escapes(keep))


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines pass through :func:`printable` (newlines and tabs kept, for tracebacks)."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102 - see the class
        return printable(super().format(record), keep="\n\t")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The log line of every qlib-ext process that logs to a terminal (the CLI, workers, the cache warmer)."""


def log_to_terminal(level: int | str) -> None:
    """``logging.basicConfig`` with :class:`PrintableFormatter` on the handler it adds (a host's own
    handlers, e.g. pytest's, are left as they are; nothing is added where the root logger has one)."""
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in root.handlers:
        if handler not in before:
            handler.setFormatter(PrintableFormatter(LOG_FORMAT))


def text_table(rows: Sequence[Sequence[object]]) -> str:
    """Rows (the first is usually the header) as left-aligned columns two spaces apart, no trailing blanks.

    Args:
        rows: equally long rows; each cell is shown as ``printable(cell)`` with every control character
            escaped, newlines too (a cell stays on its row).

    Returns:
        One line per row ("" for no rows).
    """
    cells = [[printable(c, keep="") for c in row] for row in rows]
    if not cells:
        return ""
    widths = [max(len(row[c]) for row in cells) for c in range(len(cells[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)
