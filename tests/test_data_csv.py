"""CSV import: round trip through Qlib, aliases, close-only input, and one error per bad input."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from data_fixtures import qlib_features

from qlib_ext.data.csv_import import import_csv
from qlib_ext.data.qlib_format import read_calendar, read_instruments
from qlib_ext.errors import DataError

SYMBOLS = ("SH600000", "SZ000001", "SH600519")


@pytest.fixture
def workdir(tmp_path):
    """An empty directory of its own (tmp_path also holds the test's qlib-ext home)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def make_rows(days: int = 30, seed: int = 0) -> pd.DataFrame:
    """Long-format bars for SYMBOLS plus an index; SZ000001 lists late, SH600519 misses a day."""
    rng = np.random.default_rng(seed)
    cal = pd.bdate_range("2021-03-01", periods=days)
    frames = []
    for k, sym in enumerate((*SYMBOLS, "SH000300")):
        close = 10 * (k + 1) * np.exp(np.cumsum(rng.normal(0, 0.02, days)))
        df = pd.DataFrame({
            "date": cal.strftime("%Y-%m-%d"), "symbol": sym, "open": close * rng.uniform(0.98, 1.02, days),
            "close": close, "volume": rng.integers(1_000, 1_000_000, days).astype(float),
        })
        df["high"] = np.maximum(df["open"], df["close"]) * 1.01
        df["low"] = np.minimum(df["open"], df["close"]) * 0.99
        frames.append(df)
    rows = pd.concat(frames, ignore_index=True)
    late = (rows["symbol"] == "SZ000001") & (rows["date"] < cal[5].strftime("%Y-%m-%d"))
    gap = (rows["symbol"] == "SH600519") & (rows["date"] == cal[10].strftime("%Y-%m-%d"))
    return rows[~late & ~gap].reset_index(drop=True)


def test_round_trip_csv_to_qlib_to_d_features(workdir):
    rows = make_rows()
    rows.to_csv(workdir / "bars.csv", index=False)
    summary = import_csv([workdir / "bars.csv"], workdir / "qlib", market="mine", benchmark="sh000300")
    assert summary.instruments == 3 and summary.benchmark == "SH000300" and summary.warnings == [
        f"{workdir / 'bars.csv'}: no vwap column: set to (open+high+low+close)/4; VWAP0 is approximate"
    ]
    assert set(read_instruments(workdir / "qlib", "mine")) == set(SYMBOLS)
    assert read_instruments(workdir / "qlib", "mine")["SZ000001"][0] == "2021-03-08"
    got = qlib_features(workdir / "qlib", "mine+SH000300", ["open", "high", "low", "close", "volume", "vwap",
                                                            "factor", "change"], workdir)
    for sym, want in rows.groupby("symbol"):
        have = got.xs(sym, level="instrument")
        want = want.set_index(pd.to_datetime(want["date"])).reindex(have.index)
        for name in ("open", "high", "low", "close", "volume"):
            np.testing.assert_array_equal(have[f"${name}"].to_numpy(np.float32), want[name].to_numpy(np.float32))
        vwap = (want["open"] + want["high"] + want["low"] + want["close"]) / 4
        np.testing.assert_array_equal(have["$vwap"].to_numpy(np.float32), vwap.to_numpy(np.float32))
        change = want["close"] / want["close"].ffill().shift(1) - 1
        np.testing.assert_allclose(have["$change"].to_numpy(float), change.to_numpy(float), rtol=1e-6)
        assert (have["$factor"].dropna() == 1).all()
    # The missing day of SH600519 is inside its span and reads back as NaN.
    assert got.xs("SH600519", level="instrument")["$close"].isna().sum() == 1


def test_close_only_input_works_and_warns(workdir, caplog):
    rows = make_rows()[["date", "symbol", "close"]].rename(columns={"date": "Date", "symbol": "Ticker",
                                                                    "close": "Adj Close"})
    rows.to_csv(workdir / "closes.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="qlib_ext.data.csv_import"):
        summary = import_csv([workdir / "closes.csv"], workdir / "qlib")
    text = str(summary)
    assert "warning:" in text and "KMID" in text and "VMA*" in text and "volume left missing" in text
    assert any("no open/high/low column" in r.getMessage() for r in caplog.records)
    assert any("no volume column" in r.getMessage() for r in caplog.records)
    got = qlib_features(workdir / "qlib", "all", ["open", "high", "low", "close", "vwap", "volume"], workdir)
    close = got["$close"]
    for name in ("$open", "$high", "$low", "$vwap"):
        pd.testing.assert_series_equal(got[name], close, check_names=False)
    assert got["$volume"].isna().all() and close.notna().sum() == len(rows)


def test_raw_and_adjusted_close_give_factor(workdir):
    rows = make_rows()
    rows["adj_close"] = rows["close"] * 2.5
    rows.rename(columns={"symbol": "CODE", "volume": "Vol"}).to_csv(workdir / "adj.csv", index=False)
    summary = import_csv([workdir / "adj.csv"], workdir / "qlib")
    assert any("factor = adj_close / close" in w for w in summary.warnings)
    got = qlib_features(workdir / "qlib", "SH600000", ["close", "factor", "volume"], workdir)
    want = rows[rows["symbol"] == "SH600000"]
    np.testing.assert_allclose(got["$factor"].to_numpy(float), 2.5, rtol=1e-6)
    np.testing.assert_allclose(got["$close"].to_numpy(float), want["adj_close"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["$volume"].to_numpy(float), want["volume"].to_numpy() / 2.5, rtol=1e-6)


def test_symbol_split_across_files(workdir):
    rows = make_rows()
    half = len(rows) // 2
    rows.iloc[:half].to_csv(workdir / "a.csv", index=False)
    rows.iloc[half:].to_csv(workdir / "b.csv", index=False)
    summary = import_csv([workdir / "a.csv", workdir / "b.csv"], workdir / "qlib", benchmark="SH000300")
    assert summary.rows == len(rows) and summary.days == len(read_calendar(workdir / "qlib"))


def _lines(days: int = 25) -> list[str]:
    """A valid CSV as text lines (line 1 is the header), 2 symbols x ``days`` rows, symbol-major."""
    cal = pd.bdate_range("2021-01-04", periods=days)
    out = ["date,symbol,open,high,low,close,volume"]
    for sym in ("AAA", "BBB"):
        out += [f"{d:%Y-%m-%d},{sym},10.0,11.0,9.0,10.5,1000" for d in cal]
    return out


def _set(lines: list[str], line: int, column: int, value: str) -> list[str]:
    cells = lines[line - 1].split(",")
    cells[column] = value
    lines[line - 1] = ",".join(cells)
    return lines


BAD = {
    "missing column": (lambda ls: [",".join(c for c in line.split(",")[:5]) for line in ls],
                       r"line 1: missing required column close \(any of: close, close_price, price, adj_close"),
    "unparsable date": (lambda ls: _set(ls, 4, 0, "2021-02-30"), r"line 4: unparsable date '2021-02-30'"),
    "unparsable number": (lambda ls: _set(ls, 5, 5, "12.3x"), r"line 5: unparsable number for close: '12.3x'"),
    "missing close": (lambda ls: _set(ls, 6, 5, ""), r"line 6: missing close: ''"),
    "duplicate": (lambda ls: _set(ls, 9, 0, ls[2].split(",")[0]),
                  r"line 3: duplicate \(date, symbol\) \(2021-01-05, AAA\) at .*bad.csv line 3, .*bad.csv line 9"),
    "zero price": (lambda ls: _set(ls, 7, 4, "0"), r"line 7: zero or negative low 0 \(symbol AAA, 2021-01-11\)"),
    "negative price": (lambda ls: _set(ls, 30, 2, "-1.5"), r"line 30: zero or negative open -1\.5 \(symbol BBB"),
    "negative volume": (lambda ls: _set(ls, 8, 6, "-5"), r"line 8: negative volume -5 \(symbol AAA"),
    "too few rows": (lambda ls: ls[:-6], r"line 27: symbol BBB has 19 rows, fewer than the minimum 20"),
    "ragged row": (lambda ls: _set(ls, 10, 6, "1000,7"), r"cannot read as CSV: .*line 10"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_line_and_problem_and_writes_nothing(workdir, case):
    mutate, message = BAD[case]
    path = workdir / "bad.csv"
    path.write_text("\n".join(mutate(_lines())) + "\n")
    with pytest.raises(DataError, match=message) as err:
        import_csv([path], workdir / "qlib")
    assert str(path) in str(err.value)
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.csv"]


def test_duplicate_across_files_names_both(workdir):
    lines = _lines()
    (workdir / "a.csv").write_text("\n".join(lines) + "\n")
    (workdir / "b.csv").write_text("\n".join([lines[0], lines[5]]) + "\n")
    with pytest.raises(DataError, match=r"a.csv line 6: duplicate .* at .*a.csv line 6, .*b.csv line 2"):
        import_csv([workdir / "a.csv", workdir / "b.csv"], workdir / "qlib")
    assert not (workdir / "qlib").exists()


def test_unknown_benchmark_and_blank_lines(workdir):
    lines = _lines()
    lines.insert(3, "")  # blank line 4: skipped, later lines keep their editor line numbers
    path = workdir / "ok.csv"
    path.write_text("\n".join(_set(lines, 6, 0, "bad-date")) + "\n")
    with pytest.raises(DataError, match="line 6: unparsable date 'bad-date'"):
        import_csv([path], workdir / "qlib")
    path.write_text("\n".join(_lines()) + "\n")
    with pytest.raises(DataError, match="--benchmark 'XYZ' is not a symbol"):
        import_csv([path], workdir / "qlib", benchmark="XYZ")
    assert not (workdir / "qlib").exists()
    assert str(import_csv([path], workdir / "qlib", min_rows=5)).startswith("wrote 2 instruments")
    assert len(read_calendar(workdir / "qlib")) == 25
