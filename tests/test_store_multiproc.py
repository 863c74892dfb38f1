"""Several processes against one store: claims never collide; only one background store starts."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys

import pymongo
import pytest

pytest.importorskip("qlib")

def _drain(url: str, db_name: str) -> list[int]:
    """One worker: claim tasks with Qlib's fetch_task until none is left (runs in a forked child)."""
    from qlib.config import C

    C["mongo"] = {"task_url": url, "task_db_name": db_name}
    from qlib.workflow.task.manage import TaskManager

    tm = TaskManager("pool")  # a new MongoClient in this process
    got = []
    while (task := tm.fetch_task()) is not None:
        got.append(task["def"]["n"])
        tm.commit_task_res(task, {"n": task["def"]["n"]})
    return got


@pytest.mark.slow
def test_four_processes_drain_400_tasks_each_exactly_once(mongo_url, task_db_name):
    from qlib.config import C

    C["mongo"] = {"task_url": mongo_url, "task_db_name": task_db_name}
    from qlib.workflow.task.manage import TaskManager

    tm = TaskManager("pool")
    tasks = [tm._encode_task({"def": {"n": n}, "filter": {"n": n}, "status": "waiting"}) for n in range(400)]
    tm.task_pool.insert_many(tasks)  # Qlib's own encoding, one round trip
    # fork: the children inherit the imported qlib (a fresh import takes ~10 s each on a busy box)
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.starmap(_drain, [(mongo_url, task_db_name)] * 4)
    claimed = [n for got in results for n in got]
    assert sorted(claimed) == list(range(400))  # every task, none twice
    assert sum(1 for got in results if got) >= 2  # the work really was shared
    assert tm.task_stat() == {"done": 400}


@pytest.mark.slow
def test_concurrent_resolve_starts_one_background_store(_isolated_home):
    code = "from qlib_ext.store import resolve_mongo_url; print(resolve_mongo_url('embedded'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    urls = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(urls) == 1
    url = urls.pop()
    assert pymongo.uri_parser.parse_uri(url)["nodelist"][0][0] == "127.0.0.1"
    with pymongo.MongoClient(url, serverSelectionTimeoutMS=5000) as client:  # credentials included
        assert client.db.c.insert_one({"x": 1}).acknowledged
    state = json.loads((_isolated_home / "store" / "store.json").read_text())
    import psutil

    servers = [p for p in psutil.process_iter(["cmdline"])
               if "qlib_ext.store" in " ".join(p.info["cmdline"] or [])
               and str(_isolated_home) in " ".join(p.info["cmdline"] or [])]
    assert [p.pid for p in servers] == [state["pid"]]
    assert os.getsid(state["pid"]) == state["pid"]  # detached: its own session


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_qlib_manage_cli_task_stat(tmp_path):
    """``python -m qlib.workflow.task.manage -t POOL task_stat`` has no URL flag: qlib's auto_init
    uses the default config (mongodb://localhost:27017/, db default_task_db, no credentials), so
    the store must listen on 27017 for it, without authentication (``--no-auth``, loopback only)."""
    if os.environ.get("QLIB_EXT_TEST_MONGO_URL"):
        pytest.skip("uses its own embedded store on port 27017")
    if not _port_free(27017):
        pytest.skip("port 27017 is taken on this machine")
    from store_fixtures import StoreProcess

    server = StoreProcess(tmp_path / "data")
    server.dir.mkdir()
    url = server.start(port=27017, args=("--no-auth",))
    try:
        from qlib.config import C

        C["mongo"] = {"task_url": url, "task_db_name": "default_task_db"}
        from qlib.workflow.task.manage import TaskManager

        tm = TaskManager("cli_pool")
        tm.create_task([{"n": n} for n in range(3)])
        tm.commit_task_res(tm.fetch_task(), 1)
        out = subprocess.run([sys.executable, "-m", "qlib.workflow.task.manage", "-t", "cli_pool", "task_stat"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        stat = dict(re.findall(r"^(\w+):\s+(\d+)$", out.stdout, re.M))  # fire prints "done:    1"
        assert stat == {"done": "1", "waiting": "2"}, out.stdout
    finally:
        server.stop()
