"""Qlib's own TaskManager tools on pools qlib-ext wrote, and the migration of pools written by 0.1.0."""

from __future__ import annotations

import pickle

import pymongo
import pytest
from bson.binary import Binary

from qlib_ext.pool.manager import POOLS_COLLECTION, GridTaskManager
from qlib_ext.pool.record import DOC_FORMAT, PoolMeta


@pytest.fixture
def db(mongo_url, task_db_name):
    client = pymongo.MongoClient(mongo_url)
    yield client[task_db_name]
    client.close()


@pytest.fixture
def qlib_tm(mongo_url, task_db_name):
    """Qlib's own ``TaskManager`` on a pool of the test's database (through ``C["mongo"]``, as qlib.init sets it)."""
    from qlib.config import C
    from qlib.workflow.task.manage import TaskManager

    old = C.get("mongo")
    C["mongo"] = {"task_url": mongo_url, "task_db_name": task_db_name}
    yield TaskManager
    C["mongo"] = old


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
        db[POOLS_COLLECTION].insert_one({"_id": "old", PoolMeta.EXPERIMENT: "e"})
    with pytest.raises(TypeError):  # the bug: Qlib unpickles the plain `result` (it starts with "res")
        qlib_tm("old").task_stat()

    tm = GridTaskManager("old", db)  # opening migrates
    assert qlib_tm("old").task_stat() == {"done": 2, "waiting": 1}
    assert [d["res"]["run_id"] for d in qlib_tm("old").query({"status": "done"})] == ["r1", "r2"]
    assert db["old"].count_documents({"result": {"$exists": True}}) == 0
    assert sorted(d["outcome"]["run_id"] for d in db["old"].find({"status": "done"})) == ["r1", "r2"]
    assert sorted(r["run_id"] for r in tm.results()) == ["r1", "r2"]
    if with_meta:
        assert db[POOLS_COLLECTION].find_one({"_id": "old"})[PoolMeta.DOC_FORMAT] == DOC_FORMAT
    # twice is harmless, also when forced past the recorded format
    assert GridTaskManager("old", db).migrate() == 0
    db[POOLS_COLLECTION].update_one({"_id": "old"}, {"$unset": {PoolMeta.DOC_FORMAT: ""}})
    assert GridTaskManager("old", db).migrate() == 0
    assert sorted(d["outcome"]["run_id"] for d in db["old"].find({"status": "done"})) == ["r1", "r2"]
