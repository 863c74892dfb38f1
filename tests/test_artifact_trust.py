"""Artifacts are untrusted input: a crafted Arrow array is refused without a crash, and an artifact swapped
after its run was committed is refused by the workers and operators that would read it (issue 20 §3)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pymongo
import pytest
from grid_yaml import write_workflow
from test_grid_e2e import cli


class _HugeArrowArray:
    """Pickles as ``pyarrow.lib._restore_array`` of a string array claiming 10^9 values over an 8-byte buffer."""

    def __reduce__(self):
        data = (pa.string(), 10**9, 0, 0, [None, pa.py_buffer(b"\0" * 8), pa.py_buffer(b"")], [], None)
        return pa.lib._restore_array, (data,)


_READ = """
import sys
from qlib_ext.errors import TaskDecodeError
from qlib_ext.tracking.artifacts import read_frame
try:
    frame = read_frame(sys.argv[1])
except TaskDecodeError as e:
    print("REFUSED", e)
else:
    print("READ", len(frame), frame[len(frame) - 1])
"""


def _read_in_child(path) -> subprocess.CompletedProcess:
    """``read_frame(path)`` in a child process, so that a crash fails the test instead of killing pytest."""
    return subprocess.run([sys.executable, "-c", _READ, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def test_a_crafted_arrow_array_is_refused_without_a_crash(tmp_path):
    crafted = tmp_path / "report_normal_1day.pkl"
    crafted.write_bytes(pickle.dumps(_HugeArrowArray(), protocol=5))
    done = _read_in_child(crafted)
    assert done.returncode == 0, f"the read crashed (rc {done.returncode}): {done.stderr[-2000:]}"
    assert done.stdout.startswith("REFUSED"), done.stdout
    assert "Arrow array" in done.stdout and "too small" in done.stdout, done.stdout


def test_a_frame_with_arrow_strings_still_reads(tmp_path):
    from qlib_ext.tracking.artifacts import read_frame

    idx = pd.MultiIndex.from_product([pd.date_range("2020-01-01", periods=3, freq="B"), ["SH600000", "SZ000001"]],
                                     names=["datetime", "instrument"])
    frame = pd.DataFrame({"score": np.arange(6.0), "name": list("abcdef")}, index=idx)
    (tmp_path / "pred.pkl").write_bytes(pickle.dumps(frame, protocol=5))
    pd.testing.assert_frame_equal(read_frame(tmp_path / "pred.pkl"), frame)


# --------------------------------------------------------------------------- the pool vouches for artifacts
GRID = """
grid:
    pool: trust_e2e
    params: {task.model.kwargs.num_leaves: [8]}
    strategies: {topk: [5, 10]}
"""


def _artifact_file(client, run_id: str, name: str):
    from urllib.parse import urlparse

    return Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / name


def _swap(path, frame) -> None:
    """What someone with write access to the artifact store does: a valid pickle with other numbers."""
    path.write_bytes(pickle.dumps(frame, protocol=5))


def test_a_run_records_what_it_uploads_and_a_swapped_pred_pkl_is_refused(tmp_path, synth_provider):
    """In-process on real Qlib and MLflow: the ledger hashes what the recorder uploads, the recorder's loads are
    checked against it, and a backtest refuses a training run's pred.pkl swapped after its digests were taken."""
    from data_fixtures import init_qlib
    from qlib.workflow import R

    from qlib_ext.errors import ArtifactTampered
    from qlib_ext.pool.record import META, TaskMeta
    from qlib_ext.tracking.artifacts import ArtifactLedger, sha256_file
    from qlib_ext.worker.attempt import open_run
    from qlib_ext.worker.body import run_grid_task

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_qlib(synth_provider, mlflow_uri)
    idx = pd.MultiIndex.from_product([pd.date_range("2020-01-01", periods=3, freq="B"), ["SH600000", "SZ000001"]],
                                     names=["datetime", "instrument"])
    pred = pd.DataFrame({"score": np.arange(6.0)}, index=idx)
    with R.start(experiment_name="trust", recorder_name="train"):
        recorder = R.get_recorder()
        ledger = ArtifactLedger(recorder.id)
        ledger.guard(recorder)
        recorder.save_objects(**{"pred.pkl": pred, "label.pkl": pred})
        stored = _artifact_file(recorder.client, recorder.id, "pred.pkl")
        assert dict(ledger.stored()) == {"label.pkl": sha256_file(stored), "pred.pkl": sha256_file(stored)}
        pd.testing.assert_frame_equal(recorder.load_object("pred.pkl"), pred)
        _swap(stored, pred * -1.0)
        # the run's own loads read the bytes it uploaded, kept in memory: the swapped file is never read
        pd.testing.assert_frame_equal(recorder.load_object("pred.pkl"), pred)
        unkept = ArtifactLedger(recorder.id, memo_bytes=0)  # nothing kept: the load downloads and is refused
        unkept.digests = dict(ledger.stored())
        with pytest.raises(ArtifactTampered, match=f"run {recorder.id}: artifact 'pred.pkl'"):
            unkept.load(recorder.client, "pred.pkl")
        pd.testing.assert_frame_equal(unkept.load(recorder.client, "label.pkl"), pred)  # an intact one is read
        train_id = recorder.id

    task = {"record": [{"class": "PortAnaRecord", "module_path": "qlib.workflow.record_temp", "kwargs": {}}],
            META: TaskMeta(pool="trust", experiment="trust", run_name="bt", kind="backtest", parent_run_id=train_id,
                           parent_task_id="t1", parent_artifacts=ledger.stored()).to_dict()}
    run_id = open_run(mlflow_uri, task, "t2", "test:1", 1)
    with pytest.raises(ArtifactTampered, match=f"run {train_id}: artifact 'pred.pkl' has sha256"):
        run_grid_task(task, run_id)


@pytest.mark.slow
def test_a_committed_outcome_records_its_artifacts_and_reproduce_refuses_a_swapped_task(
        tmp_path, synth_provider, mongo_url, shared_dataset_cache):
    from qlib_ext.tracking.artifacts import sha256_file

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    wf = write_workflow(tmp_path / "trust_e2e.yaml", synth_provider, GRID)
    common = ["--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri]
    cli("run", str(wf), "-n", "1", *common)
    tasks = pymongo.MongoClient(mongo_url)["default_task_db"]["trust_e2e"]
    training = tasks.find_one({"filter.qlib_ext.sweep": {"$exists": True}})
    backtest = tasks.find_one({"filter.qlib_ext.kind": "backtest"})
    assert training["status"] == backtest["status"] == "done"
    client = mlflow.MlflowClient(mlflow_uri)
    train_run = training["outcome"]["run_id"]
    _check_system_metrics_and_dataset(client.get_run(train_run), client.get_run(backtest["outcome"]["run_id"]))
    digests = dict(training["outcome"]["artifacts"])
    assert {"pred.pkl", "label.pkl", "task"} <= set(digests)
    assert sha256_file(_artifact_file(client, train_run, "pred.pkl")) == digests["pred.pkl"]
    assert dict(backtest["filter"]["qlib_ext"]["parent_artifacts"]) == {k: digests[k] for k in ("pred.pkl",
                                                                                               "label.pkl")}

    _swap(_artifact_file(client, train_run, "task"), {"model": {}})  # after the commit
    proc = subprocess.run([sys.executable, "-m", "qlib_ext", "reproduce", train_run, *common], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    assert train_run in proc.stderr and "'task'" in proc.stderr and "changed in the artifact store" in proc.stderr, \
        proc.stderr


def _check_system_metrics_and_dataset(train, backtest) -> None:
    """Issue 22 §2-3 on the same runs: MLflow's system metrics under the host's node id, one dataset input."""
    import socket

    for run in (train, backtest):
        system = [k for k in run.data.metrics if k.startswith(f"system/{socket.gethostname()}/")]
        assert any(k.endswith("/cpu_utilization_percentage") for k in system), sorted(run.data.metrics)
        assert any(k.endswith("/system_memory_usage_megabytes") for k in system), system
        assert "peak_rss_mb" in run.data.metrics and "time.backtest_s" in run.data.metrics or run is train
    (logged,) = train.inputs.dataset_inputs
    assert logged.dataset.name == "Alpha158 csi300" and len(logged.dataset.digest) == 12
    assert json.loads(logged.dataset.profile)["instruments"] > 0


def test_the_ledger_keeps_uploaded_bytes_only_within_its_budget(tmp_path):
    """Pure logic: a file over the room left is hashed but not kept; re-uploading a name frees its old room."""
    from qlib_ext.tracking.artifacts import ArtifactLedger, sha256_file

    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"x" * 6)
    big.write_bytes(b"y" * 20)
    ledger = ArtifactLedger("r1", memo_bytes=10)
    ledger.add_file(small, "a.pkl")
    ledger.add_file(big, "b.pkl")
    assert ledger.digests == {"a.pkl": sha256_file(small), "b.pkl": sha256_file(big)}
    assert set(ledger._memo) == {"a.pkl"}
    ledger.add_file(small, "c.pkl")  # 6 + 6 > 10: hashed only
    assert set(ledger._memo) == {"a.pkl"}
    ledger.add_file(small, "a.pkl")  # the same name again: its old bytes leave first
    assert set(ledger._memo) == {"a.pkl"} and ledger._memo_room == 4
