"""Decoding pool documents and artifacts as data, the module allow-list, fault classification: fast
checks with real pickles, a real sqlite MLflow and real pandas frames."""

from __future__ import annotations

import collections
import datetime as dt
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qlib_ext import defaults
from qlib_ext.errors import ModuleNotAllowed, TaskDecodeError
from qlib_ext.pool import allowlist, codec
from qlib_ext.tracking.artifacts import read_frame
from qlib_ext.worker import faults


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


TASK = {"model": {"class": "LGBModel", "module_path": "qlib.contrib.model.gbdt", "kwargs": {"lr": 0.1}},
        "dataset": {"class": "DatasetH", "module_path": "qlib.data.dataset",
                    "kwargs": {"handler": {"class": "Alpha158", "module_path": "qlib.contrib.data.handler"}}},
        "record": [{"class": "SignalRecord", "module_path": "qlib.workflow.record_temp"}, {"class": "SigAnaRecord"}],
        "qlib_ext": {"pool": "p", "coords": {"lr": 0.1}}}


def test_plain_data_decodes_and_anything_else_is_refused_before_it_runs(tmp_path):
    plain = {**TASK, "when": dt.datetime(2020, 1, 2), "od": collections.OrderedDict(a=1), "s": {1, 2}, "t": (1,)}
    assert codec.loads(pickle.dumps(plain)) == plain
    marker = tmp_path / "pwned"
    doc = {"_id": "x1", "def": pickle.dumps(Evil(marker)), "filter": {}}
    with pytest.raises(TaskDecodeError, match=r"task x1: field 'def'.*refused global posix\.system"):
        codec.decode_document(doc)
    assert not marker.exists()
    with pytest.raises(TaskDecodeError, match="refused global numpy"):  # no numpy objects in a task either
        codec.loads(pickle.dumps({"x": np.float64(1.0)}))
    with pytest.raises(TaskDecodeError, match="cannot be decoded"):
        codec.loads(b"not a pickle")


@pytest.mark.parametrize("task, message", [
    ([1, 2], "is a list, not a task dict"),
    ({"dataset": {}}, "key 'model' is missing"),
    ({"model": "LGBModel", "dataset": {}}, "key 'model' is a str"),
    ({**TASK, "qlib_ext": "x"}, "key 'qlib_ext' is a str"),
    ({"record": [], "qlib_ext": {"kind": "backtest"}}, "needs key 'qlib_ext.parent_run_id'"),
])
def test_malformed_task_is_named(task, message):
    with pytest.raises(TaskDecodeError, match=message):
        codec.check_shape(task, "t1")


def test_allow_list_checks_every_class_and_module_path():
    allowlist.check_modules(TASK, defaults.ALLOWED_MODULES)  # the shipped workflows' classes are all qlib.*
    cases = {"model.module_path": {**TASK, "model": {"class": "X", "module_path": "os"}},
             "model.class": {**TASK, "model": {"class": "subprocess.Popen"}},
             "dataset.kwargs.handler": {**TASK, "dataset": {"class": "DatasetH", "module_path": "qlib.data.dataset",
                                                            "kwargs": {"handler": "file:///tmp/h.pkl"}}},
             "record.0.module_path": {**TASK, "record": [{"class": "R", "module_path": "/tmp/evil.py"}]},
             "model.module_path ": {**TASK, "model": {"class": "M", "module_path": "qlibx.evil"}}}
    for where, task in cases.items():
        with pytest.raises(ModuleNotAllowed, match=f"task key {where.strip()} names"):
            allowlist.check_modules(task, defaults.ALLOWED_MODULES)
    allowlist.check_modules(cases["dataset.kwargs.handler"], (*defaults.ALLOWED_MODULES, "file://"))
    allowlist.check_modules(cases["model.module_path"], ("qlib.", "os"))


def test_worker_side_allow_list_wins_over_the_workflow(monkeypatch):
    monkeypatch.delenv(defaults.ALLOWED_MODULES_ENV, raising=False)
    assert allowlist.resolve(None, ["mylab."]) == (*defaults.ALLOWED_MODULES, "mylab.")
    monkeypatch.setenv(defaults.ALLOWED_MODULES_ENV, "qlib., fixtures")
    assert allowlist.resolve(None, ["mylab."]) == ("qlib.", "fixtures")
    assert allowlist.resolve(["qlib_ext.,x"], ["mylab."]) == ("qlib_ext.", "x")


def test_unwritable_mlflow_is_an_infrastructure_fault_named_by_its_root_cause(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setattr("mlflow.store.db.utils.MAX_RETRY_COUNT", 1)  # MLflow retries a bad DB for ~2 minutes
    blocked = tmp_path / "mlflow.db"
    blocked.mkdir()  # a directory where the DB file should be: sqlite cannot open it (even as root)
    with pytest.raises(Exception) as info:
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{blocked}").search_experiments()
    assert faults.classify(info.value) == faults.INFRA
    text = faults.describe(info.value)
    assert text.splitlines()[-1].startswith("root cause: ") and "unable to open database file" in text.splitlines()[-1]
    assert faults.classify(OSError(28, "No space left on device")) == faults.INFRA
    assert faults.classify(ValueError("poison")) is None
    assert faults.classify(RuntimeError("wrapped")) is None
    try:
        try:
            raise TaskDecodeError("bad def")
        except TaskDecodeError as e:
            raise RuntimeError("task failed") from e
    except RuntimeError as e:
        assert faults.classify(e) == faults.REJECTED


def test_errors_that_recur_identically_are_told_from_those_that_may_change():
    """Recurring: failed at the first attempt; a fault outside the task still wins (it may work later)."""
    import importlib

    recurring = [TypeError("__init__() got an unexpected keyword argument 'bogus'"),
                 TypeError("__init__() missing 1 required positional argument: 'd_feat'"),
                 AttributeError("module 'qlib.contrib.model.gbdt' has no attribute 'LGBModle'"),
                 RuntimeError("catboost_options.cpp:594: Error: poisson bootstrap is not supported on CPU")]
    try:
        importlib.import_module("qlib_ext_no_such_module")
    except ImportError as e:
        recurring.append(e)
    for exc in recurring:
        assert faults.classify(exc) == faults.RECURRING, exc
    for exc in (ValueError("poison"), MemoryError(), RuntimeError("CUDA out of memory"), TimeoutError("slow")):
        assert faults.classify(exc) is None, exc
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise ImportError("cannot write the module cache") from e
    except ImportError as e:
        assert faults.classify(e) == faults.INFRA


def test_artifacts_are_read_as_frames_and_a_crafted_pred_pkl_runs_nothing(tmp_path):
    import mlflow

    from qlib_ext.analysis.leaderboard import stitched_ic

    idx = pd.MultiIndex.from_product([pd.date_range("2020-01-01", periods=3, freq="B"), ["SH600000", "SZ000001"]],
                                     names=["datetime", "instrument"])
    pred = pd.DataFrame({"score": np.arange(6.0)}, index=idx)
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps(pred, protocol=5))
    pd.testing.assert_frame_equal(read_frame(tmp_path / "ok.pkl"), pred)
    marker = tmp_path / "pwned"
    crafted = tmp_path / "art"
    crafted.mkdir()
    (crafted / "pred.pkl").write_bytes(pickle.dumps(Evil(marker)))
    (crafted / "label.pkl").write_bytes(pickle.dumps(pred))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("x"))
    client.log_artifacts(run.info.run_id, str(crafted))
    assert stitched_ic([run.info.run_id], client) is None
    assert not marker.exists(), "the leaderboard unpickled a crafted pred.pkl"


def _disk_full() -> None:
    raise OSError(28, "No space left on device")


def _rejected() -> None:
    raise TaskDecodeError("bad def")


def test_a_task_child_reports_whose_fault_its_error_was():
    from qlib_ext.errors import ChildTaskFailed
    from qlib_ext.worker.timeouts import ChildProcessTask

    for fn, kind in ((_disk_full, faults.INFRA), (_rejected, faults.REJECTED), (_bad_value, None)):
        with pytest.raises(ChildTaskFailed) as info:
            ChildProcessTask(timeout=60).run(fn)
        assert info.value.kind == kind, (fn, info.value)


def _bad_value() -> None:
    raise ValueError("the task's own error")


def test_a_backtest_that_never_traded_and_empty_predictions_are_bad_results():
    from qlib_ext.errors import BadResultError
    from qlib_ext.worker.sanity import check_predictions, check_trades

    days = pd.date_range("2020-01-01", periods=5, freq="B")
    report = pd.DataFrame({"return": 0.0, "bench": 0.01, "cost": 0.0, "turnover": 0.0}, index=days)
    with pytest.raises(BadResultError, match=r"never traded over 5 steps \(turnover 0\)"):
        check_trades(report)
    check_trades(report.assign(turnover=[0.0, 0.3, 0.1, 0.0, 0.0]))
    with pytest.raises(BadResultError, match="no predictions: the model predicted 0 rows"):
        check_predictions(pd.DataFrame({"score": []}, dtype=float))
    with pytest.raises(BadResultError, match=r"predictions are all NaN \(2 rows"):
        check_predictions(pd.DataFrame({"score": [np.nan, np.nan]}))
    check_predictions(pd.DataFrame({"score": [np.nan, 0.1]}))
