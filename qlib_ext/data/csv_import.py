"""Long-format CSV (one row per date and symbol) to a Qlib-format dataset.

Rules, in the order they are checked (the first problem stops the import, nothing is written):

1. Column names are matched case-insensitively, ignoring spaces/dashes, through :data:`ALIASES`
   (``ticker`` → symbol, ``adj_close`` → close, ...). ``date``, ``symbol`` and ``close`` are
   required; other columns are optional and unknown ones are ignored.
2. Every date must parse, every non-empty number must parse, ``close`` must be present, prices
   (and factor) must be > 0 and volume >= 0; errors name the file and line.
3. A (date, symbol) pair may appear once across all files.
4. Every symbol needs at least ``min_rows`` rows.

Missing optional columns are derived, with a warning: open/high/low from close, vwap from the
bar, factor = 1, volume left missing. If both a raw ``close`` and an adjusted ``adj_close`` are
given (and no factor), prices are adjusted the Qlib way: factor = adj_close / close, prices ×
factor, volume ÷ factor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qlib_ext.data.qlib_format import FIELDS, Panel, atomic_dir, write_panel
from qlib_ext.errors import DataError

logger = logging.getLogger(__name__)

ALIASES: dict[str, tuple[str, ...]] = {
    "date": ("date", "datetime", "trade_date", "trading_date", "timestamp", "time", "day"),
    "symbol": ("symbol", "ticker", "code", "instrument", "stock", "stock_code", "ts_code", "sec_code"),
    "open": ("open", "open_price"),
    "high": ("high", "high_price"),
    "low": ("low", "low_price"),
    "close": ("close", "close_price", "price", "adj_close", "adjclose", "adjusted_close"),
    "adj_close": (),  # filled in by _match_columns when both close and an adjusted close exist
    "volume": ("volume", "vol"),
    "vwap": ("vwap", "avg_price", "average_price"),
    "factor": ("factor", "adj_factor", "adjustment_factor"),
}
"""Canonical column → accepted spellings (after lower-casing and turning spaces/dashes into ``_``)."""

REQUIRED = ("date", "symbol", "close")
"""Columns every CSV file must have (under some alias)."""

ADJUSTED = ("adj_close", "adjclose", "adjusted_close")
"""Spellings of an adjusted close, used as such when a raw close is present as well."""

MIN_ROWS = 20
"""Fewest rows a symbol may have; shorter histories are an error, not silently dropped."""

BAR_FEATURES = "KMID KLEN KMID2 KUP KUP2 KLOW KLOW2 KSFT KSFT2 OPEN0 HIGH0 LOW0"
"""Alpha158 features that are constant when open/high/low are copies of close."""

VOLUME_FEATURES = "VMA* VSTD* WVMA* VSUMP* VSUMN* VSUMD* CORR* CORD*"
"""Alpha158 feature families that are missing (NaN) when volume is missing."""


@dataclass
class ImportSummary:
    """What :func:`import_csv` wrote; ``str()`` is the report the CLI prints, warnings included."""

    out: Path
    instruments: int
    benchmark: str | None
    rows: int
    first_day: str
    last_day: str
    days: int
    market: str
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        bench = f" + benchmark {self.benchmark}" if self.benchmark else ""
        head = (
            f"wrote {self.instruments} instruments{bench}, {self.rows} rows, {self.days} days "
            f"({self.first_day} .. {self.last_day}) to {self.out} (market '{self.market}')"
        )
        return "\n".join([head, *(f"warning: {w}" for w in self.warnings)])


def import_csv(
    files: Sequence[Path],
    out: Path,
    *,
    market: str = "all",
    benchmark: str | None = None,
    min_rows: int = MIN_ROWS,
    overwrite: bool = False,
) -> ImportSummary:
    """Convert long-format CSV files into a Qlib dataset at ``out`` (atomically).

    Args:
        files: CSV files; their rows are pooled (a symbol may be split across files).
        out: target directory; must be absent or empty unless ``overwrite``.
        market: instrument-list name written besides ``all``.
        benchmark: symbol kept as features only (not listed), e.g. an index for backtests.
        min_rows: fewest rows a symbol may have.
        overwrite: replace an existing dataset at ``out``.

    Returns:
        A summary; its ``warnings`` are also logged.

    Raises:
        DataError: the first problem found (file, line and what is wrong); ``out`` is untouched.
    """
    if not files:
        raise DataError("no CSV files given")
    notes: list[str] = []
    frame = pd.concat([read_one(Path(f), notes) for f in files], ignore_index=True)
    _check_duplicates(frame)
    _check_min_rows(frame, min_rows)
    frame["symbol"] = frame["symbol"].str.upper()
    bench = benchmark.upper() if benchmark else None
    if bench and bench not in set(frame["symbol"]):
        raise DataError(f"--benchmark {benchmark!r} is not a symbol of the input files")
    panel = to_panel(frame, bench)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_panel(tmp, panel, [market])
    for note in notes:
        logger.warning("import-csv: %s", note)
    cal = panel.calendar
    return ImportSummary(Path(out), len(panel.listed), bench, len(frame), f"{cal[0]:%Y-%m-%d}",
                         f"{cal[-1]:%Y-%m-%d}", len(cal), market, notes)


def read_one(path: Path, notes: list[str]) -> pd.DataFrame:
    """Read and validate one CSV file; return canonical columns plus ``file`` and ``line``.

    Args:
        path: the CSV file.
        notes: list that collects warnings (derived columns).
    """
    raw = _read_raw(path)
    cols = _match_columns(path, list(raw.columns))
    # Line numbers as a text editor shows them: header is line 1 (blank lines are kept, then dropped).
    raw["__line"] = np.arange(len(raw)) + 2
    raw = raw[(raw.drop(columns="__line") != "").any(axis=1)]
    df = pd.DataFrame({"file": str(path), "line": raw["__line"].to_numpy()})
    df["date"] = _parse_dates(path, raw, cols["date"])
    df["symbol"] = _parse_symbols(path, raw, cols["symbol"])
    for name, col in cols.items():
        if name not in ("date", "symbol"):
            df[name] = _parse_numbers(path, raw, col, name)
    _check_positive(path, df)
    return _complete(path, df, notes)


def _read_raw(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False,
                           encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: cannot read as CSV: {e}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e}") from e


def _match_columns(path: Path, columns: list[str]) -> dict[str, str]:
    """Map canonical names to the file's own column names."""
    norm = {c.strip().lower().replace(" ", "_").replace("-", "_"): c for c in columns}
    found: dict[str, str] = {}
    for name, spellings in ALIASES.items():
        hit = next((s for s in spellings if s in norm), None)
        if hit is not None:
            found[name] = norm[hit]
    # A raw close plus an adjusted close: keep both, the adjusted one becomes adj_close.
    adj = next((s for s in ADJUSTED if s in norm), None)
    if adj is not None and found.get("close") != norm[adj]:
        found["adj_close"] = norm[adj]
    missing = [r for r in REQUIRED if r not in found]
    if missing:
        need = "; ".join(f"{m} (any of: {', '.join(ALIASES[m])})" for m in missing)
        raise DataError(f"{path} line 1: missing required column {need}; found: {', '.join(columns)}")
    return found


def _bad(path: Path, raw: pd.DataFrame, mask: np.ndarray, what: str, col: str) -> DataError:
    """Error naming the first bad row of ``mask`` and how many more there are."""
    bad = raw[mask]
    first = bad.iloc[0]
    more = f" ({len(bad) - 1} more bad rows in this column)" if len(bad) > 1 else ""
    return DataError(f"{path} line {first['__line']}: {what} {first[col]!r} in column '{col}'{more}")


def _parse_dates(path: Path, raw: pd.DataFrame, col: str) -> pd.Series:
    text = raw[col].str.strip()
    dates = pd.to_datetime(text, errors="coerce", format="mixed")
    bad = dates.isna().to_numpy()
    if bad.any():
        raise _bad(path, raw, bad, "unparsable date", col)
    return dates.dt.normalize().to_numpy()


def _parse_symbols(path: Path, raw: pd.DataFrame, col: str) -> np.ndarray:
    sym = raw[col].str.strip()
    bad = (sym == "").to_numpy()
    if bad.any():
        raise _bad(path, raw, bad, "empty symbol", col)
    return sym.to_numpy()


def _parse_numbers(path: Path, raw: pd.DataFrame, col: str, name: str) -> np.ndarray:
    text = raw[col].str.strip().str.replace(",", "", regex=False)  # thousands separators
    num = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    bad = np.isnan(num) & (text != "").to_numpy()
    if bad.any():
        raise _bad(path, raw, bad, f"unparsable number for {name}:", col)
    if name in ("close", "adj_close") and np.isnan(num).any():
        raise _bad(path, raw, np.isnan(num), f"missing {name}:", col)
    return num


def _check_positive(path: Path, df: pd.DataFrame) -> None:
    for name in ("open", "high", "low", "close", "adj_close", "vwap", "factor", "volume"):
        if name not in df:
            continue
        values = df[name].to_numpy()
        bad = values < 0 if name == "volume" else values <= 0
        if bad.any():
            row = df[bad].iloc[0]
            kind = "negative" if name == "volume" else "zero or negative"
            raise DataError(f"{path} line {row['line']}: {kind} {name} {float(row[name]):g} "
                            f"(symbol {row['symbol']}, {row['date']:%Y-%m-%d})")


def _complete(path: Path, df: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Derive missing fields (and apply an adjusted close) so every row has all of FIELDS."""
    if "adj_close" in df and "factor" not in df:
        df["factor"] = df["adj_close"] / df["close"]
        for name in ("open", "high", "low", "close", "vwap"):
            if name in df:
                df[name] = df[name] * df["factor"]
        if "volume" in df:
            df["volume"] = df["volume"] / df["factor"]
        notes.append(f"{path}: close and adj_close both given: prices adjusted, factor = adj_close / close")
    df = df.drop(columns=["adj_close"], errors="ignore")
    missing_bar = [c for c in ("open", "high", "low") if c not in df]
    for name in missing_bar:
        df[name] = df["close"]
    if missing_bar:
        vwap = "" if "vwap" in df else " VWAP0"
        notes.append(f"{path}: no {'/'.join(missing_bar)} column: copied from close; Alpha158 features "
                     f"{BAR_FEATURES}{vwap} carry no information")
    if "vwap" not in df:
        df["vwap"] = (df["open"] + df["high"] + df["low"] + df["close"]) / 4
        if not missing_bar:
            notes.append(f"{path}: no vwap column: set to (open+high+low+close)/4; VWAP0 is approximate")
    if "volume" not in df:
        df["volume"] = np.nan
        notes.append(f"{path}: no volume column: volume left missing; Alpha158 features "
                     f"{VOLUME_FEATURES} are missing (NaN) and volume limits in backtests cannot apply")
    if "factor" not in df:
        df["factor"] = 1.0
    return df


def _check_duplicates(frame: pd.DataFrame) -> None:
    key = pd.DataFrame({"d": frame["date"], "s": frame["symbol"].str.upper()})
    dup = key.duplicated(keep=False).to_numpy()
    if dup.any():
        rows = frame[dup]
        first = rows.iloc[0]
        twin = rows[(key[dup]["d"] == first["date"]).to_numpy() & (key[dup]["s"] == first["symbol"].upper()).to_numpy()]
        where = ", ".join(f"{r.file} line {r.line}" for r in twin.itertuples())
        raise DataError(f"{first['file']} line {first['line']}: duplicate (date, symbol) "
                        f"({first['date']:%Y-%m-%d}, {first['symbol']}) at {where}")


def _check_min_rows(frame: pd.DataFrame, min_rows: int) -> None:
    counts = frame.groupby(frame["symbol"].str.upper())["line"].count()
    short = counts[counts < min_rows]
    if len(short):
        sym = short.index[0]
        row = frame[frame["symbol"].str.upper() == sym].iloc[0]
        others = f" (and {len(short) - 1} more symbols)" if len(short) > 1 else ""
        raise DataError(f"{row['file']} line {row['line']}: symbol {sym} has {short.iloc[0]} rows, "
                        f"fewer than the minimum {min_rows}{others}")


def to_panel(frame: pd.DataFrame, benchmark: str | None) -> Panel:
    """Pivot validated rows into a :class:`Panel` on the union calendar of all symbols.

    Days inside a symbol's span without a row (suspensions) stay NaN; ``change`` is the close
    over the symbol's previous available close, minus 1.
    """
    calendar = pd.DatetimeIndex(np.sort(frame["date"].unique()))
    symbols = sorted(frame["symbol"].unique())
    idx = frame.set_index(["date", "symbol"])
    fields = {}
    for name in FIELDS:
        if name == "change":
            continue
        wide = idx[name].unstack("symbol").reindex(index=calendar, columns=symbols)
        fields[name] = wide.to_numpy(dtype=float)
    close = pd.DataFrame(fields["close"])
    fields["change"] = (close / close.ffill().shift(1) - 1).where(close.notna()).to_numpy()
    listed = [s for s in symbols if s != benchmark]
    return Panel(calendar, symbols, fields, listed=listed)
