"""The run session's one definition of the run options, and what it promises without running a grid:
every `qlib-ext run` flag is a `qlib_ext.run` keyword, bad keywords are ConfigErrors, the workers start
off the main thread."""

from __future__ import annotations

import dataclasses
import threading

import pytest

import qlib_ext
from qlib_ext.cli import main
from qlib_ext.errors import ConfigError
from qlib_ext.session.options import RUN, SUBMIT, WORKER, RunOptions, options_for
from qlib_ext.tables import text_table


def _params(command: str) -> set[str]:
    return {p.name for p in main.commands[command].params}


@pytest.mark.parametrize("command", [RUN, WORKER, SUBMIT])
def test_the_command_options_come_from_run_options(command):
    names = {name for name, _, _ in options_for(command)}
    extra = {RUN: {"file"}, WORKER: {"pool", "experiment", "trainer"}, SUBMIT: {"file"}}[command]
    assert _params(command) == names | extra


def test_every_run_flag_is_an_api_keyword():
    fields = {f.name for f in dataclasses.fields(RunOptions)}
    assert _params(RUN) - {"file"} == fields


def test_an_unknown_keyword_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        qlib_ext.run(tmp_path / "none.yaml", lease_secs=5)
    assert "unknown option(s) lease_secs; expected one of: " in str(e.value)
    assert "lease_seconds" in str(e.value) and "limit" in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"limit": 0}, "limit=0 is below its minimum 1"),
    ({"threads": "two"}, "threads='two' is not a int"),
    ({"cache": "no"}, "cache='no' is not a bool"),
])
def test_a_bad_value_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RunOptions.of(kwargs)


def test_a_bad_workflow_raises_instead_of_an_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        qlib_ext.run(bad, workers=1)


def test_options_coerce_and_keep_multiple_values():
    opts = RunOptions.of({"workers": "2", "lease_seconds": 5, "allow_module": "mylab."})
    assert (opts.workers, opts.lease_seconds, opts.allow_module, opts.cache) == (2, 5.0, ("mylab.",), True)


def test_workers_start_off_the_main_thread():
    # signal.signal raises there: run_workers must not install its Ctrl-C handler then
    from qlib_ext.worker.group import run_workers
    from qlib_ext.worker.settings import WorkerSettings

    settings = WorkerSettings(pool="p", mongo_url="mongodb://unused", mlflow_uri="sqlite://", provider_uri="/x")
    got: list = []
    thread = threading.Thread(target=lambda: got.append(run_workers(settings, 0, tick_seconds=0.01)))
    thread.start()
    thread.join(30)
    assert got == [0]


def test_text_table_aligns_columns_without_trailing_blanks():
    assert text_table([["a", "bb", "c"], ["ccc", "d", ""]]) == "a    bb  c\nccc  d"
    assert text_table([]) == ""
