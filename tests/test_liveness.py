"""A killed worker's task comes back at once on its host, after a few heartbeats elsewhere (issue 20 §5).

Fast, on real parts: the embedded store over a socket, a real claiming process killed with SIGKILL, the
kernel's ``/proc``. The end-to-end test with ``qlib-ext worker`` processes is in ``test_reliability.py``.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pymongo
import pytest
from bson import ObjectId

from qlib_ext import defaults
from qlib_ext.pool.liveness import Holder, process_alive, scope, start_ticks
from qlib_ext.pool.manager import Claim, GridTaskManager
from qlib_ext.pool.progress import GONE, holder_note
from qlib_ext.workflow.spec import parse_workers

pytestmark = pytest.mark.skipif(scope() is None, reason="needs Linux /proc (boot id, pid namespace, process stat)")

@pytest.fixture
def tm(mongo_url, task_db_name):
    client = pymongo.MongoClient(mongo_url)
    yield GridTaskManager("live", client[task_db_name])
    client.close()


def _killed_claimer(mongo_url: str, db: str, pool: str) -> tuple[Claim, int]:
    """A forked process claims a task (600 s lease) with a client of its own and is SIGKILLed mid-task;
    its claim and pid. (Forked: it starts in milliseconds where a fresh interpreter imports Qlib for seconds.)"""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker": claim, report, then run until killed
        try:
            c = GridTaskManager(pool, pymongo.MongoClient(mongo_url)[db], migrate=False).claim(lease_seconds=600)
            os.write(write, f"{c.id} {c.worker} {c.attempt}\n".encode())
            signal.pause()
        finally:
            os._exit(1)
    os.close(write)
    with os.fdopen(read) as f:
        task_id, worker, attempt = f.readline().split()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return Claim(task={"_id": ObjectId(task_id)}, worker=worker, attempt=int(attempt)), pid


def test_a_dead_holder_on_this_host_is_taken_back_at_once_and_its_late_commit_refused(tm, mongo_url, task_db_name):
    tm.create_tasks([{"model": {"i": 0}}, {"model": {"i": 1}}])
    dead, pid = _killed_claimer(mongo_url, task_db_name, "live")
    mine = tm.claim(lease_seconds=600)  # a live holder (this process) on the same host
    doc = tm.task_pool.find_one({"_id": dead.id})
    assert (doc["host"], doc["pid"], doc["pid_scope"]) == (socket.gethostname(), pid, scope())
    assert isinstance(doc["pid_start"], int) and doc["renewed_at"] == doc["started_at"]

    note = holder_note(next(d for d in tm.running() if d["_id"] == dead.id), tm.now(), defaults.HEARTBEAT_SECONDS)
    assert note.startswith(f"{GONE}: process {pid} no longer runs on this host") and "lease ends in" in note
    assert holder_note(next(d for d in tm.running() if d["_id"] == mine.id), tm.now(), 10.0) == ""

    assert tm.reclaim_expired() == []  # the lease (600 s) has not expired ...
    back = tm.reclaim_orphaned()  # ... but its holder is gone: back at once, the live holder's task kept
    assert [(c.id, c.worker, c.attempt) for c in back] == [(dead.id, dead.worker, dead.attempt)]
    assert tm.reclaim_orphaned() == []  # a second sweep finds nothing
    doc = tm.task_pool.find_one({"_id": dead.id})
    assert doc["status"] == "waiting" and doc["attempt"] == 1 and "lease_until" not in doc  # an attempt used
    assert doc["errors"][0]["worker"] == dead.worker and f"process {pid} is gone" in doc["errors"][0]["error"]
    assert tm.task_pool.find_one({"_id": mine.id})["status"] == "running"

    again = tm.claim(lease_seconds=600)
    assert again.id == dead.id and again.attempt == 2
    assert not tm.commit(dead, {"run_id": "late"})  # fencing: the dead attempt's late result is refused
    assert tm.commit(again, {"run_id": "fresh"})


def test_only_a_surely_dead_process_of_this_host_and_pid_namespace_counts_as_gone(tm):
    me, start = os.getpid(), start_ticks(os.getpid())
    assert process_alive(me, start) and process_alive(me, None)
    assert not process_alive(me, start + 1)  # same pid, another start time: the pid was reused
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_alive(child.pid, None)
    host = socket.gethostname()
    assert Holder(host, child.pid, None, scope()).gone()
    assert not Holder("elsewhere", child.pid, None, scope()).gone()  # another host: its lease decides
    assert not Holder(host, child.pid, None, "other-boot/pid:[1]").gone()  # another container's pids
    assert not Holder(host, me, start, scope()).gone()

    # a task Qlib's own fetch_task set running (no lease) over our stale holder fields is never judged
    tm.create_tasks([{"model": {"i": 9}}])
    tm.task_pool.update_many({}, {"$set": {"status": "running", "host": host, "pid": child.pid, "pid_start": None,
                                           "pid_scope": scope(), "worker": f"{host}:{child.pid}", "attempt": 1}})
    assert tm.reclaim_orphaned() == []
    assert holder_note(tm.running()[0], tm.now(), 10.0) == ""  # nor called gone by `status`


def test_a_silent_holder_elsewhere_is_named_with_its_missed_heartbeats(tm):
    now = tm.now()
    doc = {"_id": 1, "host": "elsewhere", "renewed_at": now - dt.timedelta(seconds=45),
           "lease_until": now + dt.timedelta(seconds=15)}
    note = holder_note(doc, now, 10.0)
    assert note.startswith(f"{GONE}? no heartbeat for 45s (4 missed)") and "lease ends in 15s" in note
    assert holder_note({**doc, "renewed_at": now - dt.timedelta(seconds=5)}, now, 10.0) == ""
    lapsed = holder_note({**doc, "renewed_at": now, "lease_until": now - dt.timedelta(seconds=3)}, now, 10.0)
    assert "lease ended 3s ago" in lapsed and "next step of any worker" in lapsed


def test_the_default_lease_is_a_few_heartbeats_and_follows_a_heartbeat_given_alone(tmp_path: Path):
    assert defaults.LEASE_SECONDS == defaults.LEASE_HEARTBEATS * defaults.HEARTBEAT_SECONDS
    assert defaults.LEASE_HEARTBEATS <= 6, "other hosts must recover after a few missed heartbeats, not 20"
    # one renewal may hang for the socket timeout; the next one still lands inside the lease
    assert defaults.LEASE_SECONDS > 2 * defaults.HEARTBEAT_SECONDS + defaults.STORE_SOCKET_TIMEOUT_SECONDS
    wf = tmp_path / "w.yaml"
    assert parse_workers({"heartbeat_seconds": 2}, wf).lease_seconds == defaults.lease_for(2)
    assert parse_workers({"heartbeat_seconds": 2, "lease_seconds": 7}, wf).lease_seconds == 7
    assert parse_workers(None, wf).lease_seconds == defaults.LEASE_SECONDS


def test_a_heartbeat_flag_alone_lengthens_the_lease_it_would_outrun():
    from qlib_ext.pool.record import PoolMeta
    from qlib_ext.worker.settings import settings_from_meta

    meta = PoolMeta(pool="p", workers={"lease_seconds": 60.0, "heartbeat_seconds": 10.0})
    s = settings_from_meta("p", meta, mongo_url="m", provider_uri="d", heartbeat_seconds=30.0, cache=False)
    assert (s.heartbeat_seconds, s.lease_seconds) == (30.0, defaults.lease_for(30.0))
    s = settings_from_meta("p", meta, mongo_url="m", provider_uri="d", heartbeat_seconds=1.0, cache=False)
    assert (s.heartbeat_seconds, s.lease_seconds) == (1.0, 60.0)  # never shorter than the pool's
    s = settings_from_meta("p", meta, mongo_url="m", provider_uri="d", heartbeat_seconds=30.0, lease_seconds=40.0,
                           cache=False)
    assert s.lease_seconds == 40.0
