"""Chaos benchmark: drain a pool while workers are killed with SIGKILL and the store is killed and restarted.

    .venv/bin/python benchmarks/chaos.py [--tasks 100] [--workers 4] [--chaos-seconds 60]

A 100-task grid of short ``tests/fixtures.py::ChaosModel`` tasks runs on 4 worker processes
(``qlib_ext.worker.group.WorkerGroup``, which restarts dead workers). Once the first task is done, for
``--chaos-seconds`` a driver SIGKILLs a random worker every ``--kill-every`` seconds (one holding a
task when there is one, so kills land mid-task) and SIGKILLs the embedded store every
``--store-every`` seconds, restarting it on the same port after ``--store-down`` seconds. Then it
waits (bounded) for the workers to drain the pool and prints, from the store, the worker logs and
MLflow: tasks done / failed / lost (not finished), tasks committed twice, and FINISHED runs per task.
Target: all done, 0 lost, 0 committed twice, exactly one FINISHED run per task, no RUNNING run.

It also times each mid-task kill until the killed task is taken back from the dead attempt (``back_*``: waiting
again, or already claimed anew) and until it runs again (``recovery_*``: claimed by a later attempt, or done),
median and max, polled every 0.2 s by the driver. On one host a dead worker's task is taken back by the
worker group's parent or the next step of any live worker (its process is gone), not after ``--lease``; it
runs again as soon as a worker is free (a killed worker's replacement first imports Qlib: seconds to a minute).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # ChaosModel / TinyDataset live in tests/fixtures.py


class Store:
    """The embedded store in a child process, restarted on the same port and directory."""

    def __init__(self, directory: Path, port: int):
        self.dir, self.port = directory, port
        self.url = f"mongodb://127.0.0.1:{port}/"
        self.proc: subprocess.Popen | None = None
        self.log = open(directory.parent / "store.log", "ab")  # noqa: SIM115 - lives as long as the benchmark

    def start(self) -> None:
        import pymongo

        self.proc = subprocess.Popen([sys.executable, "-m", "qlib_ext.store", "serve", "--dir", str(self.dir),
                                      "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with pymongo.MongoClient(self.url, serverSelectionTimeoutMS=200) as client:
                try:
                    client.admin.command("ping")
                    from qlib_ext.store import running_url

                    self.url = running_url(self.dir) or self.url  # with the store's credentials
                    return
                except pymongo.errors.PyMongoError:
                    time.sleep(0.1)
        raise RuntimeError("store did not come back")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(work: Path, args: argparse.Namespace) -> tuple[Store, object]:
    """Data, store, MLflow DB, the submitted pool and the worker settings."""
    from fixtures import write_chaos_workflow

    from qlib_ext.api import submit
    from qlib_ext.data.synth import write_synthetic
    from qlib_ext.worker.settings import worker_settings

    os.environ["QLIB_EXT_HOME"] = str(work / "home")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    os.environ["QLIB_EXT_ALLOWED_MODULES"] = "qlib.,qlib_ext.,fixtures"  # the workers' allow-list: the tasks' code
    write_synthetic(work / "data", instruments=5, days=120, seed=0)
    (work / "store").mkdir()
    store = Store(work / "store", _free_port())
    store.start()
    wf = write_chaos_workflow(work / "chaos.yaml", work / "data", args.tasks, "chaos", max_attempts=args.max_attempts,
                              seconds=args.task_seconds)
    mlflow_uri = f"sqlite:///{work / 'mlflow.db'}"
    print(submit(wf, mongo_url=store.url, mlflow_uri=mlflow_uri))
    settings = worker_settings("chaos", mongo_url=store.url, workers=args.workers, threads=1, cache=False,
                               lease_seconds=args.lease, heartbeat_seconds=args.heartbeat, grace_seconds=2,
                               task_timeout=args.task_timeout, log_level=20)
    return store, settings


def drive(store: Store, settings: object, args: argparse.Namespace) -> dict[str, int]:
    """Run the workers under chaos, then until they finish; return what the driver did."""
    from qlib_ext.worker.group import WorkerGroup

    group = WorkerGroup(settings, args.workers, max_restarts=10**6).start()
    rng = random.Random(args.seed)
    began = time.monotonic()
    _wait_first_task(store, settings)  # chaos starts once workers are up (imports take a while)
    start = time.monotonic()
    next_kill, next_store = start + args.kill_every, start + args.store_every
    did: collections.Counter = collections.Counter()
    pending: dict[object, tuple[float, int]] = {}  # task killed mid-attempt -> (kill time, its attempt)
    recovery: dict[str, list[float]] = {"back": [], "recovery": []}
    taken_back: set[object] = set()
    while True:
        group.poll()  # restart the killed (only while work remains)
        _recovered(store, settings, pending, recovery, taken_back)
        if not group.alive():
            break
        now = time.monotonic()
        if now - start > args.chaos_seconds + args.drain_seconds:
            group.stop()
            group.stop()
            did["timed_out"] += 1
            break
        if now - start < args.chaos_seconds:
            if now >= next_kill:
                victim = _pick_victim(group, store, settings, rng)
                if victim is not None:
                    os.kill(victim[0], signal.SIGKILL)
                    did["workers_killed"] += 1
                    did["killed_mid_task"] += victim[1] is not None
                    if victim[1] is not None:
                        pending[victim[1][0]] = (time.monotonic(), victim[1][1])
                next_kill = now + args.kill_every
            if now >= next_store:
                store.kill()
                time.sleep(args.store_down)
                store.start()
                did["store_restarts"] += 1
                next_store = time.monotonic() + args.store_every
        time.sleep(0.2)
    did["seconds"] = round(time.monotonic() - began)
    for name, seconds in recovery.items():
        if seconds:
            did[f"{name}_median_s"] = round(statistics.median(seconds), 1)
            did[f"{name}_max_s"] = round(max(seconds), 1)
        did[f"{name}_timed"] = len(seconds)
    did["recovery_not_seen"] = len(pending)
    return did


def _holders(store: Store, settings: object) -> dict[int, tuple[object, int]]:
    """pid -> (task id, attempt) of every running task."""
    import pymongo

    try:
        with pymongo.MongoClient(store.url, serverSelectionTimeoutMS=1000) as client:
            docs = client[settings.db_name]["chaos"].find({"status": "running"}, {"worker": 1, "attempt": 1})
            return {int(d["worker"].rsplit(":", 1)[1]): (d["_id"], d["attempt"]) for d in docs}
    except pymongo.errors.PyMongoError:
        return {}


def _recovered(store: Store, settings: object, pending: dict[object, tuple[float, int]],
               recovery: dict[str, list[float]], taken_back: set[object]) -> None:
    """Time each killed task until it is taken back (no longer running under the killed attempt) and until it
    runs again (a later attempt running, or done); failed ones are dropped."""
    import pymongo

    if not pending:
        return
    try:
        with pymongo.MongoClient(store.url, serverSelectionTimeoutMS=1000) as client:
            docs = list(client[settings.db_name]["chaos"].find({"_id": {"$in": list(pending)}},
                                                               {"status": 1, "attempt": 1}))
    except pymongo.errors.PyMongoError:
        return  # the store is down: try again next round
    now = time.monotonic()
    for d in docs:
        killed_at, attempt = pending[d["_id"]]
        later = d.get("attempt", 0) > attempt
        if d["_id"] not in taken_back and (d["status"] != "running" or later):
            recovery["back"].append(now - killed_at)
            taken_back.add(d["_id"])
        if d["status"] == "failed" or (later and d["status"] in ("running", "done")):
            if d["status"] != "failed":
                recovery["recovery"].append(now - killed_at)
            del pending[d["_id"]]


def _pick_victim(group: object, store: Store, settings: object,
                 rng: random.Random) -> tuple[int, tuple[object, int] | None] | None:
    """A random worker holding a task (so the kill lands mid-task), else any live one: (pid, (task, attempt) or
    None when idle)."""
    alive = {p.pid for p in group.procs if p.is_alive()}
    holders = _holders(store, settings)
    busy = sorted(alive & set(holders))
    if busy:
        pid = rng.choice(busy)
        return pid, holders[pid]
    return (rng.choice(sorted(alive)), None) if alive else None


def _wait_first_task(store: Store, settings: object, timeout: float = 600) -> None:
    import pymongo

    deadline = time.monotonic() + timeout
    with pymongo.MongoClient(store.url) as client:
        while time.monotonic() < deadline and not client[settings.db_name]["chaos"].find_one({"status": "done"}):
            time.sleep(0.5)


def measure(store: Store, settings: object, log_text: str) -> dict[str, object]:
    """Outcome from the store (statuses), the worker logs (commits) and MLflow (run statuses)."""
    import mlflow
    import pymongo

    with pymongo.MongoClient(store.url) as client:
        docs = list(client[settings.db_name]["chaos"].find({}, {"status": 1, "attempt": 1, "outcome.run_id": 1}))
    statuses = collections.Counter(d["status"] for d in docs)
    commits = collections.Counter(re.findall(r"committed task ([0-9a-f]{24})", log_text))
    client = mlflow.MlflowClient(settings.mlflow_uri)
    exp = client.get_experiment_by_name("chaos")
    runs = collections.defaultdict(collections.Counter)
    for run in client.search_runs([exp.experiment_id], max_results=50000):
        if run.data.tags.get("qlib_ext.kind") == "grid":  # the grid's parent run (MLflow UI), not an attempt
            continue
        runs[run.data.tags.get("qlib_ext.task_id")][run.info.status] += 1
    done = [d for d in docs if d["status"] == "done"]
    return {
        "tasks": len(docs), "done": statuses["done"], "failed": statuses["failed"],
        "lost": len(docs) - statuses["done"] - statuses["failed"],
        "committed_twice": sum(1 for d in docs if commits[str(d["_id"])] > 1),
        "committed_never_logged": sum(1 for d in done if commits[str(d["_id"])] == 0),
        "done_with_1_finished_run": sum(1 for d in done if runs[str(d["_id"])]["FINISHED"] == 1),
        "finished_run_is_committed": sum(1 for d in done if client.get_run(d["outcome"]["run_id"]).info.status
                                         == "FINISHED"),
        "runs_running": sum(c["RUNNING"] for c in runs.values()),
        "runs_killed": sum(c["KILLED"] for c in runs.values()),
        "runs_failed": sum(c["FAILED"] for c in runs.values()),
        "attempts_total": sum(d.get("attempt", 0) for d in docs),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--task-seconds", type=float, default=0.5, help="Sleep inside each task, s.")
    p.add_argument("--chaos-seconds", type=float, default=60, help="How long the driver kills things, s.")
    p.add_argument("--drain-seconds", type=float, default=300, help="Bound on the calm phase after, s.")
    p.add_argument("--kill-every", type=float, default=5, help="Interval between worker SIGKILLs, s.")
    p.add_argument("--store-every", type=float, default=12, help="Interval between store SIGKILLs, s.")
    p.add_argument("--store-down", type=float, default=2, help="How long the store stays down, s.")
    p.add_argument("--lease", type=float, default=6, help="Lease length, s.")
    p.add_argument("--heartbeat", type=float, default=0.5, help="Heartbeat interval, s.")
    p.add_argument("--max-attempts", type=int, default=10,
                   help="Attempts per task. A killed attempt counts (so a task that crashes its worker every time "
                        "ends failed); the driver aims at busy workers, so 3 can be used up by chaos alone.")
    p.add_argument("--task-timeout", type=float, default=None, help="Run tasks in timed child processes, s.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="Kept for inspection (default: a temp dir).")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="qlib-ext-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "workers.log"
    store, settings = setup(work, args)
    # Worker processes inherit fd 2: their logs (commits included) land in workers.log.
    saved = os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        did = drive(store, settings, args)
    finally:
        os.dup2(saved, 2)
    result = measure(store, settings, log_path.read_text(errors="replace"))
    store.stop()
    print(f"workdir {work}")
    print("driver: " + ", ".join(f"{k} {v}" for k, v in did.items()))
    print("result: " + ", ".join(f"{k} {v}" for k, v in result.items()))
    ok = (result["done"] == result["tasks"] and result["lost"] == 0 and result["committed_twice"] == 0
          and result["done_with_1_finished_run"] == result["tasks"] and result["runs_running"] == 0)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
