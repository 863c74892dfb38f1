"""Writing to the pool must not run code, and a bad task fails alone: real store, real worker and
cache-warm processes, a sqlite MLflow.

A pool gets one good ``ChaosModel`` task plus hand-written documents an attacker or a broken client
could insert: a ``def`` pickle whose ``__reduce__`` creates a file, a ``def`` that is a list, a task
without a model, and a plain-dict task naming a module outside the allow-list.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pymongo
import pytest
from bson.binary import Binary
from fixtures import write_chaos_workflow

from qlib_ext.api import submit
from qlib_ext.defaults import TASK_DB_NAME
from qlib_ext.pool.progress import status_report
from qlib_ext.worker.settings import worker_settings
from qlib_ext.worker.warm import waiting_tasks

TESTS_DIR = Path(__file__).resolve().parent
FAST = ["--lease-seconds", "5", "--heartbeat-seconds", "1", "--no-cache", "--threads", "1", "--exit-when-idle"]


class Evil:
    """Unpickling this runs ``touch MARKER`` (what ``pickle.loads`` of an attacker's ``def`` would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _doc(def_value: object, priority: int) -> dict:
    return {"def": Binary(pickle.dumps(def_value)), "filter": {"injected": priority}, "status": "waiting",
            "priority": priority, "attempt": 0, "max_attempts": 3, "errors": []}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "qlib_ext", *args], capture_output=True, text=True, timeout=300,
                          env=env)


BAD_RESULTS = """\
qlib_init:
    provider_uri: {provider}
    region: cn
experiment_name: bad_results
task:
    model:
        class: NaNModel
        module_path: fixtures
    dataset:
        class: DatasetH
        module_path: qlib.data.dataset
        kwargs:
            handler:
                class: DataHandlerLP
                module_path: qlib.data.dataset.handler
                kwargs:
                    instruments: csi300
                    start_time: 2015-01-05
                    end_time: 2016-07-15
                    data_loader:
                        class: QlibDataLoader
                        kwargs:
                            config:
                                feature: [["$close / Ref($close, 1) - 1"], ["RET1"]]
                                label: [["Ref($close, -2) / Ref($close, -1) - 1"], ["LABEL0"]]
            segments:
                train: [2015-03-30, 2015-12-04]
                valid: [2015-12-07, 2016-03-25]
                test: [2016-03-28, 2016-07-13]
    record:
        - class: SignalRecord
          module_path: qlib.workflow.record_temp
          kwargs: {{model: <MODEL>, dataset: <DATASET>}}
grid:
    pool: bad_results
    params:
        task.dataset.kwargs.segments.test: [[2016-03-28, 2016-07-13], [2014-03-03, 2014-06-30]]
"""


@pytest.mark.slow
def test_injected_malformed_and_meaningless_tasks_fail_alone_and_run_no_code(tmp_path, synth_provider, mongo_url):
    """One worker drains a pool of NaN-model tasks (one with a test segment before the calendar) into which
    documents were written by hand: nothing injected runs, each bad task fails at once with its reason."""
    marker = tmp_path / "pwned"
    wf = tmp_path / "bad.yaml"
    wf.write_text(BAD_RESULTS.format(provider=synth_provider))
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert submit(wf, mongo_url=mongo_url, mlflow_uri=mlflow_uri).new == 2
    bad = {  # claimed first (higher priority): the NaN tasks after them show the worker survived each one
        "pickle": _doc(Evil(marker), 40),
        "list": _doc([1, 2, 3], 30),
        "no_model": _doc({"dataset": {"class": "TinyDataset", "module_path": "fixtures"}}, 20),
        "module": _doc({"model": {"class": "system", "module_path": "os"},
                        "dataset": {"class": "TinyDataset", "module_path": "fixtures"}}, 10),
    }
    with pymongo.MongoClient(mongo_url) as client:
        ids = {k: client[TASK_DB_NAME]["bad_results"].insert_one(d).inserted_id for k, d in bad.items()}

    # what `qlib-ext cache warm` reads (in this process: the CLI adds only a Qlib start-up)
    settings = worker_settings("bad_results", mongo_url=mongo_url, cache=True)
    assert waiting_tasks(settings) == []  # tests/fixtures.py is not on the default allow-list
    allowed = replace(settings, allowed_modules=("qlib.", "fixtures"))
    assert [t["model"]["class"] for t in waiting_tasks(allowed)] == ["NaNModel", "NaNModel"]
    assert not marker.exists(), "cache warm unpickled the injected def"

    worker = _cli("worker", "--pool", "bad_results", "--mongo-url", mongo_url, "-n", "1", *FAST,
                  "--allow-module", "qlib.", "--allow-module", "fixtures")
    assert "all 6 tasks of pool bad_results failed" in worker.stdout + worker.stderr, worker.stdout[-3000:]
    assert not marker.exists(), "the worker unpickled the injected def"

    with pymongo.MongoClient(mongo_url) as client:
        docs = {d["_id"]: d for d in client[TASK_DB_NAME]["bad_results"].find({})}
    assert all(d["status"] == "failed" for d in docs.values()), {i: d["status"] for i, d in docs.items()}
    assert all(len(d["errors"]) == 1 and d["errors"][0]["attempt"] == 1 for d in docs.values())  # at once
    errors = {k: docs[i]["errors"][0]["error"] for k, i in ids.items()}
    assert "refused global posix.system" in errors["pickle"]
    assert "is a list, not a task dict" in errors["list"]
    assert "key 'model' is missing" in errors["no_model"]
    assert "task key model.module_path names module 'os'" in errors["module"] and "(qlib., fixtures)" in errors[
        "module"]
    by_test = {tuple(d["filter"]["dataset"]["kwargs"]["segments"]["test"]): d["errors"][0]["error"]
               for d in docs.values() if "dataset" in d.get("filter", {})}
    assert "BadResultError: predictions are all NaN" in by_test[("2016-03-28", "2016-07-13")]
    assert "BadResultError: no predictions: the model predicted 0 rows" in by_test[("2014-03-03", "2014-06-30")]
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("bad_results").experiment_id])
    task_runs = [r.info.status for r in runs if "qlib_ext.task_id" in r.data.tags]  # not the grid's parent run
    assert task_runs == ["FAILED", "FAILED"]  # nothing FINISHED, nothing to rank


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_unreachable_mlflow_hands_the_task_back_without_using_attempts(tmp_path, synth_provider, mongo_url):
    import signal
    import time

    wf = write_chaos_workflow(tmp_path / "infra.yaml", synth_provider, 1, "infra", seconds=0.1)
    assert submit(wf, mongo_url=mongo_url, mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").new == 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
           "QLIB_EXT_ALLOWED_MODULES": "qlib.,fixtures", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there: MLflow is down
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "qlib_ext", "-v", "worker", "--pool", "infra", "--mongo-url",
                             mongo_url, "--mlflow-uri", down, "-n", "1", *FAST], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    with pymongo.MongoClient(mongo_url) as client:
        pool = client[TASK_DB_NAME]["infra"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (pool.find_one({}).get("infra_retries") or 0) < 2:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        doc = pool.find_one({})
    assert doc.get("infra_retries", 0) >= 2, (tmp_path / "worker.log").read_text()[-3000:]
    assert doc["status"] == "waiting" and doc["attempt"] == 0 and doc["errors"] == []  # no attempt used
    cause = doc["infra_error"]["error"].strip().splitlines()[-1]
    assert cause.startswith("root cause: ") and "Connection refused" in cause, cause
    assert f"infrastructure faults: 1 unfinished tasks handed back without using an attempt " \
           f"({doc['infra_retries']} times); last: {cause}" in status_report("infra", mongo_url)

    # MLflow is back: the next worker runs the task on its first attempt
    worker = _cli("worker", "--pool", "infra", "--mongo-url", mongo_url, "-n", "1", *FAST,
                  env={"QLIB_EXT_ALLOWED_MODULES": "qlib.,fixtures"})
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    with pymongo.MongoClient(mongo_url) as client:
        doc = client[TASK_DB_NAME]["infra"].find_one({})
    assert doc["status"] == "done" and doc["attempt"] == 1 and doc["errors"] == []


LGB = ("class: LGBModel\n        module_path: qlib.contrib.model.gbdt\n"
       "        kwargs: {{num_boost_round: 5, num_leaves: 4, verbose: -1}}")
CACHED = BAD_RESULTS.replace("class: NaNModel\n        module_path: fixtures", LGB).replace(
    "bad_results", "full_disk").split("grid:")[0] + "grid:\n    pool: full_disk\n"


@pytest.mark.slow
def test_a_full_cache_disk_is_logged_once_and_the_task_builds_without_it(tmp_path, synth_provider, mongo_url):
    home = Path(os.environ["QLIB_EXT_HOME"])
    cache = home / "cache"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(cache)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("fills a real disk to ENOSPC, so it mounts an 8 KiB tmpfs, which needs root and mount(8); "
                    f"mount -t tmpfs failed here: {mounted.stderr.decode().strip()}")
    try:
        (cache / "filler").write_bytes(b"x" * 4096)
        wf = tmp_path / "full.yaml"
        wf.write_text(CACHED.format(provider=synth_provider))
        assert submit(wf, mongo_url=mongo_url, mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").new == 1
        worker = _cli("worker", "--pool", "full_disk", "--mongo-url", mongo_url, "-n", "1", "--threads", "1")
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
        logs = worker.stderr + "".join(p.read_text() for p in (home / "logs" / "full_disk").glob("*.log"))
        assert logs.count("building without the cache") == 1, logs[-3000:]
        assert "No space left on device" in logs
        with pymongo.MongoClient(mongo_url) as client:
            doc = client[TASK_DB_NAME]["full_disk"].find_one({})
        assert doc["status"] == "done" and doc["attempt"] == 1 and doc["errors"] == []
    finally:
        subprocess.run(["umount", str(cache)], check=False)
