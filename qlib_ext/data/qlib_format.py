"""Writing Qlib's file-based data format, shared by ``data synth`` and ``data import-csv``.

Layout (what Qlib's ``LocalProvider`` reads)::

    calendars/day.txt                  one ISO date a line
    instruments/<market>.txt           CODE<TAB>first date<TAB>last date
    features/<code lower>/<field>.day.bin
                                       little-endian float32: the calendar index of the first
                                       row, then one value per calendar day up to the last row

Everything is written into a temporary directory beside the target and renamed into place only
when complete, so a crash or a validation error never leaves a half-written dataset behind.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qlib_ext.errors import DataError

logger = logging.getLogger(__name__)

FIELDS = ("open", "high", "low", "close", "volume", "vwap", "factor", "change")
"""Fields written for every instrument (Qlib's cn_data set that Alpha158 and backtests use)."""

CALENDAR_FILE = Path("calendars") / "day.txt"
"""Calendar path inside a dataset."""


@dataclass
class Panel:
    """A dense day × instrument table per field; NaN where an instrument has no data.

    Attributes:
        calendar: the trading days, ascending, length T.
        symbols: instrument codes (upper case), length N.
        fields: field name → float array of shape (T, N).
        listed: symbols that go into the instrument lists; the rest (benchmarks) get features only.
    """

    calendar: pd.DatetimeIndex
    symbols: list[str]
    fields: dict[str, np.ndarray]
    listed: list[str] = field(default_factory=list)

    def spans(self) -> dict[str, tuple[int, int]]:
        """Return symbol → (first, last) calendar index with a valid close."""
        valid = np.isfinite(self.fields["close"])
        first = valid.argmax(axis=0)
        last = len(self.calendar) - 1 - valid[::-1].argmax(axis=0)
        has = valid.any(axis=0)
        return {s: (int(f), int(e)) for s, f, e, h in zip(self.symbols, first, last, has, strict=True) if h}


@contextlib.contextmanager
def atomic_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``out`` when the block succeeds.

    Args:
        out: final directory.
        overwrite: replace an existing non-empty ``out``; otherwise that is an error.

    Raises:
        DataError: ``out`` exists, is not empty, and ``overwrite`` is false.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: output path exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: output directory exists and is not empty (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, out: Path) -> None:
    # Two renames instead of rmtree-then-rename: `out` is never missing for longer than a rename.
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / "data")
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_panel(root: Path, panel: Panel, markets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Write ``panel`` in Qlib format under ``root`` (normally an :func:`atomic_dir`).

    Args:
        root: dataset directory to fill.
        panel: the data; instruments without any valid close are skipped.
        markets: instrument-list names to write besides ``all`` (each lists ``panel.listed``).

    Returns:
        symbol → (first, last) calendar index of every instrument written.
    """
    spans = panel.spans()
    write_calendar(root, panel.calendar)
    listed = {s: spans[s] for s in panel.listed if s in spans}
    for market in dict.fromkeys(["all", *markets]):
        write_instruments(root, market, listed, panel.calendar)
    write_features(root, panel, spans)
    return spans


def write_calendar(root: Path, calendar: pd.DatetimeIndex) -> None:
    """Write ``calendars/day.txt``."""
    path = root / CALENDAR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{d:%Y-%m-%d}\n" for d in calendar))


def write_instruments(
    root: Path, market: str, spans: Mapping[str, tuple[int, int]], calendar: pd.DatetimeIndex
) -> None:
    """Write ``instruments/<market>.txt`` with one ``CODE<TAB>start<TAB>end`` line per instrument."""
    path = root / "instruments" / f"{market.lower()}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (f"{s}\t{calendar[a]:%Y-%m-%d}\t{calendar[b]:%Y-%m-%d}\n" for s, (a, b) in sorted(spans.items()))
    path.write_text("".join(lines))


def write_features(root: Path, panel: Panel, spans: Mapping[str, tuple[int, int]]) -> None:
    """Write one ``.day.bin`` per instrument and field: leading start index, then float32 values."""
    cube = np.stack([panel.fields[f] for f in FIELDS]).astype("<f4")  # (F, T, N), converted once
    column = {s: j for j, s in enumerate(panel.symbols)}
    for symbol, (first, last) in spans.items():
        folder = root / "features" / symbol.lower()
        folder.mkdir(parents=True, exist_ok=True)
        block = cube[:, first : last + 1, column[symbol]]
        head = np.array([first], dtype="<f4")
        for k, name in enumerate(FIELDS):
            with open(folder / f"{name}.day.bin", "wb") as fh:
                head.tofile(fh)
                block[k].tofile(fh)
    logger.info("qlib_format: wrote %d instruments x %d fields under %s", len(spans), len(FIELDS), root)


def calendar_path(root: str | Path) -> Path:
    """The daily calendar file (``calendars/day.txt``) of the dataset at ``root`` (``~`` expanded)."""
    return Path(root).expanduser() / CALENDAR_FILE


def calendar_days(root: str | Path) -> list[str]:
    """The trading days of the dataset at ``root`` as written (ISO dates, ascending).

    Raises:
        DataError: ``root`` has no calendar.
    """
    path = calendar_path(root)
    if not path.is_file():
        raise DataError(f"{root}: not a Qlib dataset (missing {CALENDAR_FILE})")
    return path.read_text().split()


def read_calendar(root: str | Path) -> pd.DatetimeIndex:
    """Read ``calendars/day.txt`` of a dataset as dates.

    Raises:
        DataError: ``root`` has no calendar.
    """
    return pd.DatetimeIndex(pd.to_datetime(calendar_days(root)))


def read_instruments(root: Path, market: str) -> dict[str, tuple[str, str]]:
    """Read ``instruments/<market>.txt`` as code → (first date, last date)."""
    out: dict[str, tuple[str, str]] = {}
    for line in (Path(root) / "instruments" / f"{market}.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


def read_feature(root: Path, symbol: str, field_name: str) -> tuple[int, np.ndarray]:
    """Read one ``.day.bin``; return (first calendar index, float32 values)."""
    raw = np.fromfile(Path(root) / "features" / symbol.lower() / f"{field_name}.day.bin", dtype="<f4")
    return int(raw[0]), raw[1:]
