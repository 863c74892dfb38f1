"""Plain-text tables: the one column aligner behind every table the command line prints (stdlib only)."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(rows: Sequence[Sequence[object]]) -> str:
    """Rows (the first is usually the header) as left-aligned columns two spaces apart, no trailing blanks.

    Args:
        rows: equally long rows; each cell is shown as ``str(cell)``.

    Returns:
        One line per row ("" for no rows).
    """
    cells = [[str(c) for c in row] for row in rows]
    if not cells:
        return ""
    widths = [max(len(row[c]) for row in cells) for c in range(len(cells[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)
