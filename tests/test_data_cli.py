"""``qlib-ext data ...``: help texts, the info report, and errors shown as one line with exit code 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from data_fixtures import SYNTH_DAYS, SYNTH_END, SYNTH_INSTRUMENTS, SYNTH_START

from qlib_ext.cli import main
from qlib_ext.data.info import describe
from qlib_ext.data.qlib_format import read_instruments
from qlib_ext.errors import DataError


@pytest.mark.parametrize(
    "args, expect",
    [
        (["data"], ["synth", "import-csv", "info"]),
        (["data", "synth"], ["--out", "--instruments", "--days", "--start", "--seed", "--market", "--overwrite"]),
        (["data", "import-csv"], ["FILES", "--out", "--market", "--benchmark", "--min-rows", "adj_close"]),
        (["data", "info"], ["PATH", "missing-data"]),
    ],
)
def test_help(args, expect):
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    for word in expect:
        assert word in result.output


def test_describe_synth_provider(synth_provider):
    info = describe(synth_provider)
    assert (info.first_day, info.last_day, info.days) == (SYNTH_START, SYNTH_END, SYNTH_DAYS)
    assert info.markets == {"all": SYNTH_INSTRUMENTS, "csi300": SYNTH_INSTRUMENTS}
    assert info.instruments == SYNTH_INSTRUMENTS + 1 and info.unlisted == ["SH000300"]
    assert set(info.fields) == {"open", "high", "low", "close", "volume", "vwap", "factor", "change"}
    assert info.fields["close"] == 0 and 0 < info.fields["change"] < 0.01  # first day of each has no change
    late = sum(1 for first, _ in read_instruments(synth_provider, "all").values() if first != SYNTH_START)
    assert info.late_starts == late and info.problems == []


def test_info_command_prints_report(synth_provider):
    result = CliRunner().invoke(main, ["data", "info", str(synth_provider)])
    assert result.exit_code == 0, result.output
    assert f"calendar     {SYNTH_START} .. {SYNTH_END} ({SYNTH_DAYS} trading days)" in result.output
    assert "not in any list: SH000300" in result.output and "close" in result.output


def test_info_reports_damaged_files(tmp_path):
    out = tmp_path / "d"
    CliRunner().invoke(main, ["data", "synth", "--out", str(out), "--instruments", "3", "--days", "40"])
    (out / "features" / "sh600000" / "close.day.bin").write_bytes(b"\x00\x00\x80\x7f" * 100)  # NaN start
    info = describe(out)
    assert len(info.problems) == 1 and "sh600000/close.day.bin" in info.problems[0]
    with pytest.raises(DataError, match="not a Qlib dataset"):
        describe(tmp_path)


def test_synth_and_import_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["data", "synth", "--out", str(tmp_path / "s"), "--instruments", "4",
                                  "--days", "40", "--seed", "3"])
    assert result.exit_code == 0 and "wrote 4 instruments x 40 days" in result.output
    again = runner.invoke(main, ["data", "synth", "--out", str(tmp_path / "s"), "--instruments", "4", "--days", "40"])
    assert again.exit_code == 2 and "error:" in again.output and "--overwrite" in again.output
    csv = tmp_path / "c.csv"
    csv.write_text("Date,Ticker,Close\n" + "".join(f"2021-01-{d:02d},x,{d}.5\n" for d in range(4, 9)))
    result = runner.invoke(main, ["data", "import-csv", str(csv), "--out", str(tmp_path / "q"), "--min-rows", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 instruments" in result.output and "warning:" in result.output
    bad = runner.invoke(main, ["data", "import-csv", str(csv), "--out", str(tmp_path / "q2")])
    assert bad.exit_code == 2 and "line 2: symbol X has 5 rows, fewer than the minimum 20" in bad.output
    assert not (tmp_path / "q2").exists()
