"""Queue speed on the embedded store: submit and status for 100 / 1,000 / 10,000 tasks with Qlib's
stock ``TaskManager`` (``create_task`` + ``task_stat``) vs qlib-ext's ``GridTaskManager``
(``create_tasks`` + ``counts``), and the per-task queue overhead (claim + heartbeat + commit).

    python benchmarks/queue_bench.py [--quick] [--sizes 100,1000,10000] [--stock-budget 120]

Prints a table and writes its section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import time
import uuid

import pymongo
from _common import machine_line, median, store_process, table, write_section


def make_tasks(n: int, salt: str) -> list[dict]:
    """Task dicts shaped like a real LightGBM/Alpha158 grid point (~1.5 KB each)."""
    base = {
        "model": {"class": "LGBModel", "module_path": "qlib.contrib.model.gbdt",
                  "kwargs": {"loss": "mse", "colsample_bytree": 0.8879, "subsample": 0.8789, "max_depth": 8}},
        "dataset": {"class": "DatasetH", "module_path": "qlib.data.dataset", "kwargs": {
            "handler": {"class": "Alpha158", "module_path": "qlib.contrib.data.handler",
                        "kwargs": {"start_time": "2017-01-03", "end_time": "2019-06-28", "instruments": "csi300",
                                   "fit_start_time": "2017-01-03", "fit_end_time": "2018-06-29"}},
            "segments": {"train": ["2017-01-03", "2018-06-29"], "valid": ["2018-07-02", "2018-12-28"],
                         "test": ["2019-01-02", "2019-06-28"]}}},
        "record": [{"class": "SignalRecord", "module_path": "qlib.workflow.record_temp"}],
    }
    tasks = []
    for i in range(n):
        t = {**base, "model": {**base["model"], "kwargs": {**base["model"]["kwargs"], "seed": i}}}
        t["qlib_ext"] = {"pool": salt, "coords": {"task.model.kwargs.seed": i}, "run_name": f"lgb seed={i}"}
        tasks.append(t)
    return tasks


def stock_submit(db, url: str, pool: str, tasks: list[dict], budget: float) -> tuple[float, int]:
    """Qlib's own create_task, in chunks so a quadratic run can be stopped at the budget."""
    from qlib.config import C
    from qlib.workflow.task.manage import TaskManager

    C["mongo"] = {"task_url": url, "task_db_name": db.name}  # the store's URL, credentials included
    tm = TaskManager(pool)
    start, done = time.perf_counter(), 0
    for i in range(0, len(tasks), 100):
        tm.create_task(tasks[i:i + 100])
        done = min(i + 100, len(tasks))
        if time.perf_counter() - start > budget:
            break
    return time.perf_counter() - start, done


def ours_submit(db, pool: str, tasks: list[dict]) -> float:
    from qlib_ext.pool.manager import GridTaskManager

    start = time.perf_counter()
    GridTaskManager(pool, db).create_tasks(tasks)
    return time.perf_counter() - start


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def submit_and_status(url: str, sizes: list[int], budget: float) -> list[list[object]]:
    from qlib.workflow.task.manage import TaskManager

    from qlib_ext.pool.manager import GridTaskManager

    db = pymongo.MongoClient(url)[f"bench_{uuid.uuid4().hex[:8]}"]
    rows = []
    for n in sizes:
        tasks = make_tasks(n, f"p{n}")
        ours = ours_submit(db, f"ours{n}", tasks)
        resubmit = ours_submit(db, f"ours{n}", tasks)
        stock, stock_done = stock_submit(db, url, f"stock{n}", tasks, budget)
        stock_txt = f"{stock:.2f}" if stock_done == n else f"> {stock:.0f} (stopped at {stock_done})"
        stock_rate = stock / stock_done * n
        ours_stat = timed(lambda n=n: GridTaskManager(f"ours{n}", db).counts())
        stock_stat = timed(lambda n=n: TaskManager(f"ours{n}").task_stat(), repeat=1 if n >= 10_000 else 3)
        rows.append([n, stock_txt, f"{ours:.2f}", f"{stock_rate / ours:.0f}x" + ("" if stock_done == n else "+"),
                     f"{resubmit:.2f}", f"{stock_stat * 1000:.0f}", f"{ours_stat * 1000:.1f}",
                     f"{stock_stat / ours_stat:.0f}x"])
        print(rows[-1], flush=True)
    return rows


def overhead(url: str, n: int = 200) -> dict[str, float]:
    """Median ms of claim, renew and commit per task on a pool of n tasks."""
    from qlib_ext.pool.manager import GridTaskManager

    db = pymongo.MongoClient(url)[f"bench_{uuid.uuid4().hex[:8]}"]
    tm = GridTaskManager("overhead", db)
    tm.create_tasks(make_tasks(n, "overhead"))
    claim_t, renew_t, commit_t = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        claim = tm.claim(lease_seconds=60)
        t1 = time.perf_counter()
        tm.renew(claim, 60)
        t2 = time.perf_counter()
        tm.commit(claim, {"run_id": "x", "metrics": {"IC": 0.1}})
        t3 = time.perf_counter()
        claim_t.append(t1 - t0)
        renew_t.append(t2 - t1)
        commit_t.append(t3 - t2)
    return {"claim": median(claim_t) * 1000, "renew": median(renew_t) * 1000, "commit": median(commit_t) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 tasks only")
    parser.add_argument("--sizes", default=None, help="comma-separated pool sizes")
    parser.add_argument("--stock-budget", type=float, default=120.0, help="seconds before stock submit is stopped")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([100, 1000] if args.quick else
                                                                        [100, 1000, 10_000])
    import qlib

    qlib.init(logging_level=40)
    with store_process() as url:
        rows = submit_and_status(url, sizes, args.stock_budget)
        ov = overhead(url)
    per_task = ov["claim"] + ov["commit"]
    # A 5-second task renews its lease about once (heartbeat 30 s): claim + commit + one renewal.
    share = (per_task + ov["renew"]) / 5000 * 100
    text = "\n\n".join([
        "## Queue: submit and status (embedded store)",
        machine_line(),
        table(["tasks", "stock create_task s", "ours create_tasks s", "submit speed-up", "resubmit (0 new) s",
               "stock task_stat ms", "ours counts ms", "status speed-up"], rows),
        "Stock = Qlib's `TaskManager.create_task` (one `find_one` on the whole filter + one insert per task) and "
        "`task_stat` (unpickles every task). Ours = `GridTaskManager.create_tasks` (`$in` lookups on the "
        "unique `hash` index + `insert_many`, 500 tasks per command) and `counts` (one indexed `count_documents` "
        "per status). Status times are medians of 3 (stock at 10,000: one run).",
        "## Queue overhead per task",
        table(["claim ms", "renew ms", "commit ms", "share of a 5 s task"],
              [[f"{ov['claim']:.2f}", f"{ov['renew']:.2f}", f"{ov['commit']:.2f}", f"{share:.2f} %"]]),
        "Medians over 200 tasks, one client, durable store.",
    ])
    print(text)
    write_section("queue_bench", text)


if __name__ == "__main__":
    main()
