"""Warming the cache for a pool before workers start: real store, real Qlib in a child process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from grid_yaml import write_workflow

from qlib_ext.worker.warm import _distinct, backtests
from qlib_ext.workflow.sweep import split_records

GRID = """
grid:
    pool: warm
    params:
        task.model.kwargs.learning_rate: [0.05, 0.2]
"""


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "qlib_ext", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"qlib-ext {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_cache_warm_builds_each_entry_once_and_a_warm_run_uses_them(tmp_path, synth_provider, mongo_url):
    wf = write_workflow(tmp_path / "warm.yaml", synth_provider, GRID)
    common = ["--mongo-url", mongo_url, "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    cli("submit", str(wf), *common)
    first = cli("cache", "warm", "warm", "--mongo-url", mongo_url)
    assert "1 datasets and 1 backtest exchanges for 2 waiting tasks" in first and "(2 built)" in first
    # everything is there: the warmer signals at once, and the workers (still starting) must not miss it
    run = cli("run", str(wf), "-n", "2", *common)
    assert "(0 built)" in run and "done 2" in run
    listing = cli("cache", "ls")
    assert "3 entries" in listing and "Alpha158" in listing and "Exchange" in listing and "binned" in listing


def test_backtests_are_the_port_ana_record_configs():
    backtest = {"start_time": "2020-01-02", "end_time": "2020-06-30"}
    task = {"record": [{"class": "SignalRecord"}, {"class": "SigAnaRecord", "kwargs": {}},
                       {"class": "PortAnaRecord", "kwargs": {"config": {"backtest": backtest}}}]}
    assert backtests(task) == [backtest]
    assert backtests({"record": {"class": "PortAnaRecord", "kwargs": {"config": {"backtest": backtest}}}}) == [backtest]
    assert backtests({"model": {}}) == []
    # a fully qualified class is a PortAnaRecord here too, as it is for expansion and the sweep
    dotted = {"class": "qlib.workflow.record_temp.PortAnaRecord", "kwargs": {"config": {"backtest": backtest}}}
    assert backtests({"record": [dotted]}) == [backtest] and split_records({"record": [dotted]})[1] == [dotted]


def test_distinct_keeps_one_of_each_and_drops_none():
    a, b = {"x": 1, "y": [1, 2]}, {"y": [1, 2], "x": 1}
    assert _distinct([a, None, b, {"x": 2}]) == [a, {"x": 2}]
