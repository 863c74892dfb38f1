"""What a person watching a pool sees: the live progress line and ``qlib-ext status``."""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections import defaultdict

from qlib_ext import defaults
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
    beat = float(tm.meta().workers.get("heartbeat_seconds") or defaults.HEARTBEAT_SECONDS)
    by_host: dict[str, list[str]] = defaultdict(list)
    gone = 0
    for d in tm.running():
        started = d.get(Doc.STARTED_AT)
        age = (now - started).total_seconds() if isinstance(started, dt.datetime) else 0
        note = holder_note(d, now, beat)
        gone += note.startswith(GONE)
        device = f"{d[Doc.DEVICE]}  " if d.get(Doc.DEVICE) else ""
        by_host[d.get(Doc.HOST, "?")].append(f"    {d[Doc.ID]}  {d.get(Doc.WORKER)}  {device}attempt "
                                             f"{d.get(Doc.ATTEMPT)}  {age:.0f}s  {d['name']}"
                                             + (f"\n      {note}" if note else ""))
    if gone:
        lines.append(f"{gone} running task(s) belong to workers that are gone; each says below when it returns")
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


GONE = "worker gone"
"""How ``status`` starts the note of a running task whose worker is gone or has stopped renewing its lease."""


def holder_note(doc: dict, now: dt.datetime, heartbeat_seconds: float) -> str:
    """What ``status`` says about a running task's holder: empty while it renews its lease; else that it is
    gone (its process ended, on this host; or silent for missed heartbeats) and when the task returns.

    Args:
        doc: a running task from :meth:`~qlib_ext.pool.manager.GridTaskManager.running`.
        now: the store's time.
        heartbeat_seconds: the pool's heartbeat interval (what "missed" counts in).
    """
    from qlib_ext.pool.liveness import Holder

    until, renewed = doc.get(Doc.LEASE_UNTIL), doc.get(Doc.RENEWED_AT)
    left = (until - now).total_seconds() if isinstance(until, dt.datetime) else None
    when = ("returns at the next step of any worker (its lease has ended)" if left is not None and left <= 0 else
            f"returns when its lease ends in {left:.0f}s" if left is not None else "returns when its lease ends")
    holder = Holder.of(doc) if until is not None else None  # no lease: Qlib's own fetch_task holds it, not ours
    if holder is not None and holder.gone():
        return (f"{GONE}: process {holder.pid} no longer runs on this host; the task returns at once when a worker "
                f"or run starts here, else {when.removeprefix('returns ')}")
    silent = (now - renewed).total_seconds() if isinstance(renewed, dt.datetime) else None
    if silent is not None and silent > 2 * heartbeat_seconds:
        return f"{GONE}? no heartbeat for {silent:.0f}s ({int(silent // heartbeat_seconds)} missed); {when}"
    if left is not None and left <= 0:
        return f"{GONE}? its lease ended {-left:.0f}s ago; {when}"
    return ""


def _infra_faults(tm) -> list[str]:
    """One line for unfinished tasks handed back after faults outside them (MLflow, store, disk)."""
    docs = tm.handed_back()
    if not docs:
        return []
    last = max(docs, key=lambda d: str((d.get(Doc.INFRA_ERROR) or {}).get(ErrorEntry.TIME, "")))
    cause = str((last.get(Doc.INFRA_ERROR) or {}).get(ErrorEntry.ERROR, "")).strip().splitlines()
    return [f"infrastructure faults: {len(docs)} unfinished tasks handed back without using an attempt "
            f"({sum(d[Doc.INFRA_RETRIES] for d in docs)} times); last: {cause[-1] if cause else '?'}"]
