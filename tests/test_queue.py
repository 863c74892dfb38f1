"""The queue's promises against a real store over a real socket: dedup, leases, fencing, retries."""

from __future__ import annotations

import datetime as dt

import pymongo
import pytest

from qlib_ext.pool.manager import GridTaskManager, task_hash


def _task(i: int) -> dict:
    return {"model": {"class": "M", "kwargs": {"i": i}}, "dataset": {"class": "D"},
            "qlib_ext": {"pool": "p", "run_name": f"t{i}"}}


@pytest.fixture
def tm(mongo_url, task_db_name):
    client = pymongo.MongoClient(mongo_url)
    yield GridTaskManager("pool", client[task_db_name])
    client.close()


def _expire(tm: GridTaskManager, claim) -> None:
    past = tm.now() - dt.timedelta(seconds=5)
    tm.task_pool.update_one({"_id": claim.id}, {"$set": {"lease_until": past}})


def test_create_tasks_dedups_on_resubmit_and_keeps_qlib_shape(tm):
    assert tm.create_tasks([_task(i) for i in range(5)]) == (5, 5)
    assert tm.create_tasks([_task(i) for i in range(7)]) == (2, 7)
    doc = tm.task_pool.find_one({"hash": task_hash(_task(3))})
    assert doc["filter"]["model"]["kwargs"]["i"] == 3
    assert tm._decode_task(doc)["def"] == _task(3)
    # Qlib's own, unpickling task_stat agrees with our $group count.
    assert tm.task_stat() == tm.counts() == {"waiting": 7}


def test_editing_the_grid_keeps_finished_points_deduplicated(tm):
    tasks = [_task(i) for i in range(3)]
    for t in tasks:
        t["qlib_ext"]["grid_hash"] = "before"
    tm.create_tasks(tasks)
    edited = [_task(i) for i in range(4)]
    for t in edited:
        t["qlib_ext"]["grid_hash"] = "after"
    assert tm.create_tasks(edited) == (1, 4)


def test_claims_are_exclusive_stamp_a_lease_and_follow_priority(tm):
    tm.create_tasks([_task(i) for i in range(3)])
    tm.task_pool.update_one({"hash": task_hash(_task(2))}, {"$set": {"priority": 5}})
    first = tm.claim(lease_seconds=60, worker="a:1")
    assert first.task["def"]["model"]["kwargs"]["i"] == 2
    assert first.attempt == 1
    doc = tm.task_pool.find_one({"_id": first.id})
    assert doc["status"] == "running" and doc["worker"] == "a:1" and doc["host"] == "a"
    assert doc["lease_until"] > tm.now() + dt.timedelta(seconds=50)
    ids = {first.id, tm.claim(worker="b:1").id, tm.claim(worker="c:1").id}
    assert len(ids) == 3
    assert tm.claim(worker="d:1") is None


def test_expired_lease_is_recovered_once_and_the_old_owner_is_fenced_out(tm):
    tm.create_tasks([_task(0)])
    old = tm.claim(lease_seconds=60, worker="slow:1")
    assert len(tm.reclaim_expired()) == 0  # lease still valid
    _expire(tm, old)
    assert len(tm.reclaim_expired()) == 1
    assert len(tm.reclaim_expired()) == 0  # a second sweep finds nothing to do
    new = tm.claim(lease_seconds=60, worker="fast:2")
    assert new.id == old.id and new.attempt == 2
    assert not tm.renew(old)
    assert not tm.commit(old, {"run_id": "stale"})
    assert tm.commit(new, {"run_id": "fresh"})
    doc = tm.task_pool.find_one({"_id": new.id})
    assert doc["status"] == "done" and doc["outcome"] == {"run_id": "fresh"}
    assert [e["worker"] for e in doc["errors"]] == ["slow:1"]
    assert "lease expired" in doc["errors"][0]["error"]


def test_renewed_lease_is_not_recovered(tm):
    tm.create_tasks([_task(0)])
    claim = tm.claim(lease_seconds=60, worker="w:1")
    _expire(tm, claim)
    assert tm.renew(claim, lease_seconds=60)
    assert len(tm.reclaim_expired()) == 0
    assert tm.counts() == {"running": 1}


def test_failures_retry_until_max_attempts_then_fail(tm):
    tm.create_tasks([_task(0)], max_attempts=3)
    statuses = []
    for attempt in range(1, 4):
        claim = tm.claim(worker=f"w:{attempt}")
        assert claim.attempt == attempt
        statuses.append(tm.fail(claim, f"Traceback ...\nValueError: boom {attempt}"))
    assert statuses == ["waiting", "waiting", "failed"]
    assert tm.claim() is None
    doc = tm.task_pool.find_one({})
    assert [e["attempt"] for e in doc["errors"]] == [1, 2, 3]
    assert doc["errors"][-1]["error"].endswith("boom 3")


def test_handing_back_without_counting_an_attempt(tm):
    tm.create_tasks([_task(0)], max_attempts=1)
    claim = tm.claim(worker="w:1")
    assert tm.fail(claim, "worker stopped", count_attempt=False) == "waiting"
    again = tm.claim(worker="w:2")
    assert again.attempt == 1
    assert tm.task_pool.find_one({})["errors"] == []


def test_commit_result_is_plain_data_and_results_lists_it(tm):
    tm.create_tasks([_task(0), _task(1)])
    claim = tm.claim(worker="w:1")
    assert tm.commit(claim, {"run_id": "r1", "metrics": {"IC": 0.1}})
    rows = tm.results()
    assert len(rows) == 1
    assert rows[0]["run_id"] == "r1" and rows[0]["metrics"] == {"IC": 0.1}
    assert rows[0]["meta"]["run_name"] in ("t0", "t1")
    assert tm.counts() == {"done": 1, "waiting": 1}
    assert tm.unfinished() == 1
