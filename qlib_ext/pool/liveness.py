"""Is a lease holder's process still there? Who holds a task, as the kernel names it.

A claim records the claiming process as the kernel knows it: its host, its pid, its start time (field 22 of
``/proc/<pid>/stat``, clock ticks after boot) and the *scope* in which that pid means that process: the
kernel's boot id and the pid namespace. A process on the same host and in the same scope can then tell
for sure that the holder is gone: no process with that pid, or one with another start time (the pid was
reused). Such a task need not wait for its lease: :meth:`qlib_ext.pool.manager.GridTaskManager.reclaim_orphaned`
takes it back at once. Anything uncertain counts as alive (another host, another container's pid namespace,
no ``/proc``, a process this user may not inspect), and the lease decides as before.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from qlib_ext.pool.record import Doc

logger = logging.getLogger(__name__)

PROC = Path("/proc")
"""Where the kernel publishes its processes (Linux)."""


@dataclass(frozen=True)
class Holder:
    """A lease holder as recorded at claim: host, pid, start ticks and scope (boot id + pid namespace)."""

    host: str
    pid: int
    start: int | None
    scope: str | None

    @classmethod
    def of(cls, doc: dict) -> Holder | None:
        """The holder recorded on a task document; None when the claim recorded none (an older worker, Qlib)."""
        pid = doc.get(Doc.PID)
        if not isinstance(pid, int) or not doc.get(Doc.PID_SCOPE):
            return None
        return cls(str(doc.get(Doc.HOST) or ""), pid, doc.get(Doc.PID_START), doc.get(Doc.PID_SCOPE))

    def local(self) -> bool:
        """Whether this process can judge the holder: same host name, same boot, same pid namespace."""
        return self.host == socket.gethostname() and self.scope == scope()

    def gone(self) -> bool:
        """True only when the holder is surely gone (judged locally); False when alive or unknown."""
        return self.local() and not process_alive(self.pid, self.start)


def stamp() -> dict:
    """The fields a claim records about the claiming process (none where there is no ``/proc``)."""
    here = scope()
    if here is None:
        return {}
    return {Doc.PID: os.getpid(), Doc.PID_START: start_ticks(os.getpid()), Doc.PID_SCOPE: here}


@functools.lru_cache(maxsize=1)
def scope() -> str | None:
    """``<boot id>/<pid namespace>`` of this process: where a pid names one process; None without ``/proc``."""
    try:
        boot = (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
        pidns = os.readlink(PROC / "self" / "ns" / "pid")
    except OSError:
        return None
    return f"{boot}/{pidns}"


def start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks after boot (``/proc/<pid>/stat`` field 22); None if unreadable."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": field 3 (state) onwards
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` (started at ``start`` ticks, when known) still runs, in this pid namespace.

    Gone: no process with that pid, or a zombie, or a process with that pid and another start time (reused).
    A process this user may not signal or read counts as alive: nothing is taken from a holder we cannot see.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = start_ticks(pid)
    if now is None:
        return True  # hidden from us (hidepid): alive as far as we can tell
    return not _zombie(pid) and (start is None or now == start)


def _zombie(pid: int) -> bool:
    """A killed process whose parent has not reaped it yet: it runs nothing any more."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].startswith("Z")
