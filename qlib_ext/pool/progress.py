"""What a person watching a pool sees: the live progress line and ``qlib-ext status``."""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections import defaultdict

from qlib_ext.pool.record import Doc, ErrorEntry
from qlib_ext.pool.status import TaskStatus
from qlib_ext.tables import printable


class Progress:
    """Prints done / running / failed / waiting, throughput and ETA; one line, redrawn on a TTY."""

    def __init__(self, pool: str, mongo_url: str, every_seconds: float = 1.0):
        from qlib_ext.pool.manager import GridTaskManager, open_db

        self.tm = GridTaskManager(pool, open_db(mongo_url))
        self.start = time.monotonic()
        self.first_done = self._done()
        self.every = every_seconds if sys.stdout.isatty() else 10.0
        self._last = 0.0
        self.note = ""  # what happens while no task has finished yet (e.g. the cache is being built)

    def _done(self) -> int:
        return self.tm.counts().get(TaskStatus.DONE.value, 0)

    def line(self) -> str:
        c = self.tm.counts()
        done = c.get("done", 0)
        elapsed = time.monotonic() - self.start
        rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
        left = c.get("waiting", 0) + c.get("running", 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        speed = f"{rate * 60:.1f} tasks/min  ETA {eta}" if rate > 0 or not self.note else self.note
        return (f"done {done}  running {c.get('running', 0)}  failed {c.get('failed', 0)}  "
                f"waiting {c.get('waiting', 0)}  | {speed}  [{elapsed:.0f}s]")

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        try:
            text = self.line()
        except Exception as e:  # noqa: BLE001 - a store hiccup must not stop the run
            text = f"(progress unavailable: {e})"
        end = "\r" if sys.stdout.isatty() else "\n"
        sys.stdout.write(printable(text, keep="").ljust(100) + end)
        sys.stdout.flush()

    def finish(self) -> None:
        self._last = 0.0
        sys.stdout.write(printable(self.line(), keep="").ljust(100) + "\n")


def status_report(pool: str, mongo_url: str | None) -> str:
    """Counts per status, running tasks grouped by host (worker, age), failed tasks with their last error."""
    from qlib_ext.pool.manager import GridTaskManager, open_db

    tm = GridTaskManager(pool, open_db(mongo_url))
    counts = tm.counts()
    lines = [f"pool {pool}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts
             else f"pool {pool}: empty"]
    now = tm.now()
    by_host: dict[str, list[str]] = defaultdict(list)
    for d in tm.running():
        started = d.get(Doc.STARTED_AT)
        age = (now - started).total_seconds() if isinstance(started, dt.datetime) else 0
        device = f"{d[Doc.DEVICE]}  " if d.get(Doc.DEVICE) else ""
        by_host[d.get(Doc.HOST, "?")].append(f"    {d[Doc.ID]}  {d.get(Doc.WORKER)}  {device}attempt "
                                             f"{d.get(Doc.ATTEMPT)}  {age:.0f}s  {d['name']}")
    for host, rows in sorted(by_host.items()):
        lines.append(f"running on {host}:")
        lines.extend(rows)
    failed = tm.failed()
    if failed:
        lines.append("failed:")
    for d in failed:
        errors = d.get(Doc.ERRORS) or []
        last = (errors or [{}])[-1].get(ErrorEntry.ERROR, "").strip().splitlines()
        lines.append(f"    {d[Doc.ID]}  {d['name']}  {len(errors)} attempts  "
                     f"last error: {last[-1] if last else '?'}")
    lines.extend(_infra_faults(tm))
    return "\n".join(lines)


def _infra_faults(tm) -> list[str]:
    """One line for unfinished tasks handed back after faults outside them (MLflow, store, disk)."""
    docs = tm.handed_back()
    if not docs:
        return []
    last = max(docs, key=lambda d: str((d.get(Doc.INFRA_ERROR) or {}).get(ErrorEntry.TIME, "")))
    cause = str((last.get(Doc.INFRA_ERROR) or {}).get(ErrorEntry.ERROR, "")).strip().splitlines()
    return [f"infrastructure faults: {len(docs)} unfinished tasks handed back without using an attempt "
            f"({sum(d[Doc.INFRA_RETRIES] for d in docs)} times); last: {cause[-1] if cause else '?'}"]
