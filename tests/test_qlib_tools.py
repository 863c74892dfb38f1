"""Qlib's own TaskManager tools on pools qlib-ext wrote, and the migration of pools written by 0.1.0.

One small pool is written once for the module through ``qlib-ext run`` (a train-once grid whose
second model always fails), then given a running, a part_done and a waiting task: Qlib's
``task_stat``, ``query``, ``re_query``, ``wait`` and ``python -m qlib.workflow.task.manage`` must
read it, and every pickle in it must load with plain-data classes only.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import types

import pymongo
import pytest
from bson.binary import Binary
from grid_yaml import write_workflow
from store_fixtures import MONGO_URL_ENV

from qlib_ext import defaults
from qlib_ext.pool.database import POOLS_COLLECTION
from qlib_ext.pool.manager import GridTaskManager
from qlib_ext.pool.record import DOC_FORMAT, QLIB_ENCODED_PREFIXES, Doc, PoolMeta


@pytest.fixture
def db(mongo_url, task_db_name):
    client = pymongo.MongoClient(mongo_url)
    yield client[task_db_name]
    client.close()


@contextlib.contextmanager
def qlib_mongo(url: str, db_name: str):
    """Point Qlib's ``TaskManager`` at ``url``/``db_name`` through ``C["mongo"]`` (what qlib.init sets)."""
    from qlib.config import C
    from qlib.workflow.task.manage import TaskManager

    old = C.get("mongo")
    C["mongo"] = {"task_url": url, "task_db_name": db_name}
    try:
        yield TaskManager
    finally:
        C["mongo"] = old


@pytest.fixture
def qlib_tm(mongo_url, task_db_name):
    """Qlib's own ``TaskManager`` class, on the test's database."""
    with qlib_mongo(mongo_url, task_db_name) as tm_class:
        yield tm_class


def _old_done_doc(run_id: str) -> dict:
    """A done task as qlib-ext 0.1.0 committed it: the result pickled in ``res`` and plain in ``result``."""
    task = {"model": {"class": "M"}, "qlib_ext": {"run_name": run_id}}
    return {"def": Binary(pickle.dumps(task)), "filter": task, "status": "done", "priority": 0, "attempt": 1,
            "res": Binary(pickle.dumps({"run_id": run_id})), "result": {"run_id": run_id}}


@pytest.mark.parametrize("with_meta", [True, False])
def test_a_0_1_0_pool_is_renamed_on_open_and_qlib_reads_it(db, qlib_tm, with_meta):
    db["old"].insert_many([_old_done_doc("r1"), _old_done_doc("r2"),
                           {**_old_done_doc("w"), "status": "waiting", "res": None, "result": None}])
    db["old"].update_one({"status": "waiting"}, {"$unset": {"res": "", "result": ""}})
    if with_meta:
        db[POOLS_COLLECTION].insert_one({"_id": "old", PoolMeta.Field.EXPERIMENT: "e"})
    with pytest.raises(TypeError):  # the bug: Qlib unpickles the plain `result` (it starts with "res")
        qlib_tm("old").task_stat()

    tm = GridTaskManager("old", db)  # opening migrates
    assert qlib_tm("old").task_stat() == {"done": 2, "waiting": 1}
    assert [d["res"]["run_id"] for d in qlib_tm("old").query({"status": "done"})] == ["r1", "r2"]
    assert db["old"].count_documents({"result": {"$exists": True}}) == 0
    assert sorted(d["outcome"]["run_id"] for d in db["old"].find({"status": "done"})) == ["r1", "r2"]
    assert sorted(r["run_id"] for r in tm.results()) == ["r1", "r2"]
    if with_meta:
        assert db[POOLS_COLLECTION].find_one({"_id": "old"})[PoolMeta.Field.DOC_FORMAT] == DOC_FORMAT
    # twice is harmless, also when forced past the recorded format
    assert GridTaskManager("old", db).migrate() == 0
    db[POOLS_COLLECTION].update_one({"_id": "old"}, {"$unset": {PoolMeta.Field.DOC_FORMAT: ""}})
    assert GridTaskManager("old", db).migrate() == 0
    assert sorted(d["outcome"]["run_id"] for d in db["old"].find({"status": "done"})) == ["r1", "r2"]


# --------------------------------------------------------------------------- a pool qlib-ext wrote
POOL = "qlib_tools"
GRID = """
grid:
    pool: qlib_tools
    params: {{task.model.kwargs.num_leaves: {leaves}}}
    strategies: {{topk: [5, 10]}}
"""
"""num_leaves 1 fails in LightGBM on every attempt; 16 trains once and backtests twice (train-once)."""


class PlainUnpickler(pickle.Unpickler):
    """Loads builtins, datetime and collections only: stricter than Qlib's next restricted unpickler."""

    def find_class(self, module: str, name: str):
        if module in ("builtins", "datetime", "collections"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def _qlib_ext(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlib_ext", *args], capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.fixture(scope="module")
def pool(tmp_path_factory, synth_provider, _session_store, _session_cache_dir):
    """The module's pool: 3 done (a training task and its 2 backtests), 1 failed, 1 running, 1 part_done,
    1 waiting. Written by ``qlib-ext run -n 1`` and ``qlib-ext submit``; the running task is claimed by a
    worker that is not there, and Qlib's ``part_done`` (which our workers never write) set by hand."""
    url = os.environ.get(MONGO_URL_ENV) or _session_store.url
    tmp = tmp_path_factory.mktemp("qlib_tools")
    home = tmp / "home"
    home.mkdir()
    (home / "cache").symlink_to(_session_cache_dir, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"QLIB_EXT_HOME": str(home)}
    common = ["--mongo-url", url, "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    wf = write_workflow(tmp / "tools.yaml", synth_provider, GRID.format(leaves="[16, 1]"))
    run = _qlib_ext("run", str(wf), "-n", "1", "--max-attempts", "1", *common, env=env)
    more = write_workflow(tmp / "more.yaml", synth_provider, GRID.format(leaves="[16, 1, 8, 12, 24]"))
    submit = _qlib_ext("submit", str(more), *common, env=env)
    assert "3 new of 5" in submit.stdout, run.stdout + run.stderr + submit.stdout + submit.stderr
    client = pymongo.MongoClient(url)
    tm = GridTaskManager(POOL, client[defaults.TASK_DB_NAME])
    assert tm.claim(lease_seconds=3600, worker="gone:1") is not None
    part = tm.task_pool.find_one({Doc.STATUS: "waiting"}, {"_id": 1})
    tm.task_pool.update_one({"_id": part["_id"]}, {"$set": {Doc.STATUS: "part_done"}})
    assert tm.counts() == {"done": 3, "failed": 1, "running": 1, "part_done": 1, "waiting": 1}, run.stdout
    yield types.SimpleNamespace(url=url, tm=tm, provider=synth_provider)
    client.close()


EXPECTED = {"done": 3, "failed": 1, "running": 1, "part_done": 1, "waiting": 1}


@pytest.mark.slow
def test_qlib_task_stat_query_and_re_query_read_a_pool_qlib_ext_wrote(pool):
    with qlib_mongo(pool.url, defaults.TASK_DB_NAME) as tm_class:
        qtm = tm_class(POOL)
        assert qtm.task_stat() == EXPECTED
        docs = list(qtm.query())
        assert len(docs) == 7 and all(isinstance(d["def"], dict) and d["def"]["qlib_ext"]["run_name"] for d in docs)
        done = [d for d in docs if d["status"] == "done"]
        for d in done:  # Qlib's res: the committed result, a plain dict, the same as our outcome
            assert isinstance(d["res"], dict) and d["res"]["run_id"] == d[Doc.OUTCOME]["run_id"]
        assert {d["def"]["qlib_ext"].get("kind") for d in done} == {None, "backtest"}
        again = qtm.re_query(str(done[0]["_id"]))
        assert again["res"] == done[0]["res"] and again["def"] == done[0]["def"]
        assert [d["status"] for d in qtm.query({"status": "failed"})] == ["failed"]


@pytest.mark.slow
def test_qlib_manage_cli_task_stat_on_the_pool(pool):
    """``python -m qlib.workflow.task.manage`` has no URL flag: Qlib reads ``C["mongo"]``, which qlib.init
    sets (auto_init then keeps it). The module runs as ``__main__``, with the CLI's own argv."""
    boot = ("import runpy, sys, qlib; qlib.init(provider_uri=sys.argv.pop(1), "
            "mongo={'task_url': sys.argv.pop(1), 'task_db_name': sys.argv.pop(1)}); "
            "runpy.run_module('qlib.workflow.task.manage', run_name='__main__', alter_sys=True)")
    out = subprocess.run([sys.executable, "-c", boot, str(pool.provider), pool.url, defaults.TASK_DB_NAME,
                          "-t", POOL, "task_stat"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stat = dict(re.findall(r"^(\w+):\s+(\d+)$", out.stdout, re.M))  # fire prints "done:      3"
    assert stat == {k: str(v) for k, v in EXPECTED.items()}, out.stdout


@pytest.mark.slow
def test_every_pickled_field_loads_as_plain_data(pool):
    """Qlib's next release unpickles def/res with a restricted loader (builtins, datetime, collections,
    pandas, numpy, three Qlib classes): ours need only the first three."""
    pickled = 0
    for doc in pool.tm.task_pool.find({}):
        for key, value in doc.items():
            if key.startswith(QLIB_ENCODED_PREFIXES):
                assert key in (Doc.DEF, Doc.RES), f"field {key!r} would be unpickled by Qlib"
                PlainUnpickler(io.BytesIO(bytes(value))).load()
                pickled += 1
    assert pickled == 7 + 3  # every def, and the res of each done task


@pytest.mark.slow
def test_qlib_wait_returns_once_the_unfinished_tasks_finish(pool, monkeypatch):
    """``TaskManager.wait`` polls every 10 s (here 0.05 s) until nothing is waiting, running or part_done."""
    import qlib.workflow.task.manage as manage

    copy = pool.tm.task_pool.database["qlib_tools_wait"]
    copy.drop()
    copy.insert_many(list(pool.tm.task_pool.find({})))
    real_sleep = time.sleep
    monkeypatch.setattr(manage, "time", types.SimpleNamespace(sleep=lambda _s: real_sleep(0.05)))

    def finish_one_by_one() -> None:
        for status in ("running", "part_done", "waiting"):
            real_sleep(0.2)
            copy.update_one({"status": status}, {"$set": {"status": "done"}})

    with qlib_mongo(pool.url, defaults.TASK_DB_NAME) as tm_class:
        qtm = tm_class("qlib_tools_wait")
        finisher = threading.Thread(target=finish_one_by_one)
        started = time.monotonic()
        finisher.start()
        qtm.wait()
        waited = time.monotonic() - started
        finisher.join()
        assert qtm.task_stat() == {"done": 6, "failed": 1}
    assert 0.5 < waited < 10
    copy.drop()
