"""Fast checks of the reliability parts on their own: task runners and their timeouts, the stop
state, the spool replay, result adoption after a sweep, cancel and retry (real store, no workers)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import threading
import time

import pymongo
import pytest
from click.testing import CliRunner

from qlib_ext.cli import main
from qlib_ext.defaults import TASK_DB_NAME
from qlib_ext.errors import ChildTaskFailed, TaskInterrupted, TaskTimeout
from qlib_ext.pool.manager import GridTaskManager, save_pool_meta
from qlib_ext.pool.record import PoolMeta
from qlib_ext.worker import spool as spool
from qlib_ext.worker.loop import StopState, Worker
from qlib_ext.worker.settings import WorkerSettings
from qlib_ext.worker.timeouts import ChildProcessTask, InProcessTask


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return f"slept {seconds}"


def _raise() -> None:
    raise ValueError("boom in the child")


def _stubborn() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    time.sleep(60)


def _later(seconds: float, fn, *args) -> None:
    threading.Timer(seconds, fn, args).start()


def test_child_task_returns_its_result_and_reports_its_traceback():
    assert ChildProcessTask(timeout=10).run(_sleep, 0.01) == "slept 0.01"
    with pytest.raises(ChildTaskFailed, match=r"(?s)Traceback.*ValueError: boom in the child"):
        ChildProcessTask(timeout=10).run(_raise)


def test_child_task_is_killed_at_its_timeout_even_when_it_ignores_sigterm():
    start = time.monotonic()
    with pytest.raises(TaskTimeout, match="timed out after 0.5s"):
        ChildProcessTask(timeout=0.5).run(_sleep, 30)
    assert time.monotonic() - start < 5
    start = time.monotonic()
    with pytest.raises(TaskTimeout):
        ChildProcessTask(timeout=0.5, kill_after=0.5).run(_stubborn)
    assert time.monotonic() - start < 5


def test_child_and_in_process_tasks_can_be_interrupted_from_another_thread():
    child = ChildProcessTask(timeout=None)
    _later(0.3, child.interrupt, "lease lost")
    with pytest.raises(TaskInterrupted, match="lease lost"):
        child.run(_sleep, 30)
    here = InProcessTask()
    _later(0.3, here.interrupt, "worker stopped")
    start = time.monotonic()
    with pytest.raises(TaskInterrupted, match="worker stopped"):
        here.run(_sleep, 30)
    assert time.monotonic() - start < 5
    here.interrupt("too late")  # nothing running: no stray exception later
    assert here.run(_sleep, 0.01) == "slept 0.01"


def test_stop_state_interrupts_the_task_after_its_grace_period():
    stop, runner = StopState(grace_seconds=0.3), InProcessTask()
    stop.task_started(runner)
    _later(0.1, stop.request, signal.SIGTERM, None)
    start = time.monotonic()
    with pytest.raises(TaskInterrupted, match="worker stopped"):
        runner.run(_sleep, 30)
    stop.task_ended()
    assert stop.event.is_set() and 0.3 <= time.monotonic() - start < 5


# ---------------------------------------------------------------------- queue and spool on a real store
def _task(i: int) -> dict:
    return {"model": {"class": "M", "kwargs": {"i": i}}, "qlib_ext": {"pool": "p", "run_name": f"t{i}"}}


@pytest.fixture
def tm(mongo_url, task_db_name):
    client = pymongo.MongoClient(mongo_url)
    tm = GridTaskManager("pool", client[task_db_name])
    save_pool_meta(client[task_db_name], "pool", PoolMeta(mlflow_uri="sqlite:///unused.db", experiment="x"))
    yield tm
    client.close()


def _expire_and_sweep(tm: GridTaskManager) -> None:
    tm.task_pool.update_many({}, {"$set": {"lease_until": tm.now() - dt.timedelta(seconds=5)}})
    tm.reclaim_expired()


def test_result_finished_during_an_outage_is_adopted_unless_someone_claimed_it(tm):
    tm.create_tasks([_task(0), _task(1)])
    a, b = tm.claim(worker="a:1"), tm.claim(worker="b:1")
    _expire_and_sweep(tm)  # both leases lapsed while the store was away; both tasks back to waiting
    again = tm.claim(worker="c:1")  # one of them is claimed anew before its old owner commits
    mine, theirs = (a, b) if again.id == b.id else (b, a)
    assert tm.commit(mine, {"run_id": "late"})
    assert not tm.commit(theirs, {"run_id": "stale"})
    assert tm.commit(again, {"run_id": "fresh"})
    assert sorted(d["outcome"]["run_id"] for d in tm.task_pool.find({})) == ["fresh", "late"]


def test_spooled_result_of_a_dead_worker_is_replayed_on_the_next_start(tm, mongo_url, task_db_name, tmp_path):
    import mlflow

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = mlflow.MlflowClient(mlflow_uri)
    experiment = runs.create_experiment("x")
    tm.create_tasks([_task(0), _task(1)])
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    claims = [tm.claim(worker=dead, lease_seconds=60) for _ in range(2)]
    run_ids = [runs.create_run(experiment).info.run_id for _ in claims]  # RUNNING until the replay commits
    paths = [spool.write("pool", c, {"run_id": r, "metrics": {"IC": 0.1}})
             for c, r in zip(claims, run_ids, strict=True)]
    item = next(i for i in spool.pending("pool") if i.claim.id == claims[0].id)
    assert (item.claim.id, item.claim.worker, item.claim.attempt) == (claims[0].id, dead, 1)
    tm.task_pool.update_one({"_id": claims[1].id}, {"$inc": {"attempt": 1}})  # claimed again since: refused
    settings = WorkerSettings(pool="pool", mongo_url=mongo_url, mlflow_uri=mlflow_uri, provider_uri="",
                              db_name=task_db_name)
    Worker(settings, StopState(1))._replay_spool()
    done, taken = (tm.task_pool.find_one({"_id": c.id}) for c in claims)
    assert done["status"] == "done" and done["outcome"]["run_id"] == run_ids[0] and taken["status"] == "running"
    assert not any(p.exists() for p in paths)
    assert [runs.get_run(r).info.status for r in run_ids] == ["FINISHED", "KILLED"]


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_cancel_stops_claims_and_fences_running_tasks_out_retry_requeues(tm):
    tm.create_tasks([_task(i) for i in range(3)], max_attempts=1)
    running = tm.claim(worker="w:1")
    failed = tm.claim(worker="w:2")
    assert tm.fail(failed, "Traceback\nValueError: x") == "failed"
    assert tm.cancel() == 1
    assert tm.claim() is None and tm.renew(running)  # plain cancel: running ones finish
    assert tm.cancel(now=True) == 1
    assert not tm.renew(running) and not tm.commit(running, {"run_id": "r"})
    assert tm.counts() == {"cancelled": 2, "failed": 1}
    assert tm.unfinished() == 0  # so workers exit
    assert tm.retry(failed_only=True) == 1
    doc = tm.task_pool.find_one({"_id": failed.id})
    assert doc["status"] == "waiting" and doc["attempt"] == 0 and len(doc["errors"]) == 1
    assert tm.retry() == 2 and tm.counts() == {"waiting": 3}
    assert tm.retry(running.id) == 1  # a targeted task that is not running


def test_retry_and_cancel_commands(mongo_url):
    db = pymongo.MongoClient(mongo_url)[TASK_DB_NAME]
    save_pool_meta(db, "cmd", PoolMeta(mlflow_uri="sqlite:///unused.db", experiment="cmd"))
    tm = GridTaskManager("cmd", db)
    tm.create_tasks([_task(i) for i in range(3)], max_attempts=1)
    tm.fail(tm.claim(worker="w:1"), "Traceback\nValueError: x")
    cli, env = CliRunner(), {"QLIB_EXT_MONGO_URL": mongo_url}
    assert "1 tasks requeued" in cli.invoke(main, ["retry", "cmd", "--failed"], env=env).output
    assert "3 tasks cancelled" in cli.invoke(main, ["cancel", "cmd"], env=env).output
    task_id = str(tm.task_pool.find_one({})["_id"])
    assert "1 tasks requeued" in cli.invoke(main, ["retry", "cmd", "--task", task_id], env=env).output
    bad = cli.invoke(main, ["retry", "cmd", "--task", "nope"], env=env)
    assert bad.exit_code == 2 and "not a task id" in bad.output
    assert tm.counts() == {"waiting": 1, "cancelled": 2}
