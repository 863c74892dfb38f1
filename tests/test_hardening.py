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


@pytest.mark.slow
def test_injected_tasks_run_no_code_and_fail_alone(tmp_path, synth_provider, mongo_url):
    marker = tmp_path / "pwned"
    wf = write_chaos_workflow(tmp_path / "evil.yaml", synth_provider, 1, "evil", seconds=0.1)
    assert submit(wf, mongo_url=mongo_url, mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").new == 1
    bad = {
        "pickle": _doc(Evil(marker), 40),
        "list": _doc([1, 2, 3], 30),
        "no_model": _doc({"dataset": {"class": "TinyDataset", "module_path": "fixtures"}}, 20),
        "module": _doc({"model": {"class": "system", "module_path": "os"},
                        "dataset": {"class": "TinyDataset", "module_path": "fixtures"}}, 10),
    }
    with pymongo.MongoClient(mongo_url) as client:
        ids = {k: client[TASK_DB_NAME]["evil"].insert_one(d).inserted_id for k, d in bad.items()}

    # what `qlib-ext cache warm` reads (in this process: the CLI adds only a Qlib start-up)
    settings = worker_settings("evil", mongo_url=mongo_url, cache=True)
    assert [t["model"]["class"] for t in waiting_tasks(settings)] == []  # fixtures is not on the default list
    assert [t["model"]["class"] for t in waiting_tasks(replace(settings, allowed_modules=("fixtures",)))] == [
        "ChaosModel"]
    assert not marker.exists(), "cache warm unpickled the injected def"

    worker = _cli("-v", "worker", "--pool", "evil", "--mongo-url", mongo_url, "-n", "1", *FAST,
                  "--allow-module", "qlib.", "--allow-module", "fixtures")
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    assert not marker.exists(), "the worker unpickled the injected def"

    with pymongo.MongoClient(mongo_url) as client:
        docs = {d["_id"]: d for d in client[TASK_DB_NAME]["evil"].find({})}
    good = [d for i, d in docs.items() if i not in ids.values()]
    assert [d["status"] for d in good] == ["done"]  # the worker survived every bad task and ran the good one
    errors = {k: docs[i]["errors"] for k, i in ids.items()}
    assert {k: docs[i]["status"] for k, i in ids.items()} == dict.fromkeys(bad, "failed")
    assert all(len(e) == 1 and e[0]["attempt"] == 1 for e in errors.values()), errors  # failed at once
    assert "refused global posix.system" in errors["pickle"][0]["error"]
    assert "is a list, not a task dict" in errors["list"][0]["error"]
    assert "key 'model' is missing" in errors["no_model"][0]["error"]
    module_error = errors["module"][0]["error"]
    assert "task key model.module_path names module 'os'" in module_error and "(qlib., fixtures)" in module_error
