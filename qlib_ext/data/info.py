"""``qlib-ext data info``: what is in a Qlib-format dataset, read straight from its files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qlib_ext.data.qlib_format import read_calendar, read_instruments
from qlib_ext.errors import DataError


@dataclass
class DatasetInfo:
    """Summary of a dataset; ``str()`` is the report the CLI prints.

    Attributes:
        path: dataset directory.
        first_day, last_day, days: calendar range and length.
        markets: instrument-list name → number of instruments in it.
        instruments: instruments with a features folder.
        unlisted: instruments with features but in no list (benchmarks).
        fields: field name → share of missing values (NaN) over the instruments' spans.
        problems: files that are absent or inconsistent with the calendar.
    """

    path: Path
    first_day: str
    last_day: str
    days: int
    markets: dict[str, int]
    instruments: int
    unlisted: list[str]
    fields: dict[str, float]
    late_starts: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"dataset      {self.path}",
            f"calendar     {self.first_day} .. {self.last_day} ({self.days} trading days)",
            "markets      " + ", ".join(f"{m} ({n})" for m, n in sorted(self.markets.items())),
            f"features     {self.instruments} instruments"
            + (f"; not in any list: {', '.join(self.unlisted)}" if self.unlisted else ""),
            f"late start   {self.late_starts} listed instruments start after the first calendar day",
            "fields       missing share within each instrument's span:",
            *(f"  {name:<10} {share:7.2%}" for name, share in sorted(self.fields.items())),
        ]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def describe(path: Path) -> DatasetInfo:
    """Read the calendar, instrument lists and every feature file of the dataset at ``path``.

    Args:
        path: Qlib dataset directory (containing ``calendars/``, ``instruments/``, ``features/``).

    Raises:
        DataError: ``path`` has no calendar or no instrument lists.
    """
    path = Path(path)
    calendar = read_calendar(path)
    lists = sorted((path / "instruments").glob("*.txt"))
    if not lists:
        raise DataError(f"{path}: not a Qlib dataset (no instruments/*.txt)")
    markets = {p.stem: read_instruments(path, p.stem) for p in lists}
    listed = set().union(*markets.values())
    folders = sorted(p for p in (path / "features").glob("*") if p.is_dir())
    codes = {p.name.upper() for p in folders}
    missing, problems = _scan_features(folders, len(calendar))
    problems += [f"{code}: listed but has no features folder" for code in sorted(listed - codes)]
    starts = {code: span[0] for spans in markets.values() for code, span in spans.items()}
    first = f"{calendar[0]:%Y-%m-%d}"
    return DatasetInfo(
        path, first, f"{calendar[-1]:%Y-%m-%d}", len(calendar),
        {m: len(s) for m, s in markets.items()}, len(folders), sorted(codes - listed), missing,
        sum(1 for s in starts.values() if s > first), problems,
    )


def _scan_features(folders: list[Path], days: int) -> tuple[dict[str, float], list[str]]:
    """Return field → missing share across all instruments, and a list of problems found."""
    nan: dict[str, int] = {}
    total: dict[str, int] = {}
    problems: list[str] = []
    for folder in folders:
        for f in folder.glob("*.day.bin"):
            name = f.name.removesuffix(".day.bin")
            raw = np.fromfile(f, dtype="<f4")
            if len(raw) < 1 or not np.isfinite(raw[0]) or raw[0] + len(raw) - 1 > days:
                problems.append(f"{f}: start index or length does not fit the calendar ({days} days)")
                continue
            nan[name] = nan.get(name, 0) + int(np.isnan(raw[1:]).sum())
            total[name] = total.get(name, 0) + len(raw) - 1
    return {k: nan[k] / total[k] if total[k] else 1.0 for k in total}, problems
