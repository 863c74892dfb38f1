"""Exceptions users can catch: one base class, a subclass per thing that can go wrong.

The embedded store's own exceptions (``store/``: ``CommandError``, ``LimitError``, ``WriteFailure``,
``ProtocolError``, ``IdleTimeout``) stay in that package on purpose: they are signals inside the MongoDB
wire server, each turned into a MongoDB error reply (code and message) or a closed connection before
anything leaves the server, so no qlib-ext caller ever sees one; what a caller sees is pymongo's error,
wrapped in :class:`StoreError` at the boundary.
"""

from __future__ import annotations

from typing import Any


class QlibExtError(Exception):
    """Base class of every error qlib-ext raises on purpose."""


class ConfigError(QlibExtError, ValueError):
    """A workflow YAML, a flag or a profile is invalid; the message names the file and key."""


class DataError(QlibExtError, ValueError):
    """Input data (CSV, a Qlib data directory) is unusable; the message names file and line."""


class StoreError(QlibExtError):
    """The task store (embedded store or MongoDB) cannot be reached or refused an operation."""


class TaskError(QlibExtError):
    """A task failed in a way the worker reports rather than retries."""


class TaskRejected(TaskError):
    """A task that can never succeed as written: it fails at once, without using its other attempts."""


class TaskDecodeError(TaskRejected, ValueError):
    """A pool document's ``def``/``res`` is not plain data (or not a valid task); the message names the task."""

    claim: Any = None  # the pool's Claim when the task was claimed before it failed to decode (the worker fails it)


class ModuleNotAllowed(TaskRejected):
    """A task names a class or module outside the worker's allow-list; the message names the key path."""


class ArtifactTampered(TaskRejected):
    """An artifact's bytes are not those its run committed to the pool (sha256 differs, or the pool recorded no such
    file): it is not read. The message names the run, the file and both digests."""


class BadResultError(TaskRejected):
    """A task ran but its result is meaningless (no predictions, all NaN, a backtest that never traded)."""


class InfraError(QlibExtError):
    """Something outside the task failed (MLflow, the store, the disk): retried without using an attempt."""


class LaunchError(QlibExtError):
    """A cluster scheduler (``sbatch``, ``kubectl``) is missing or refused a launch; the message says which command
    and what it printed."""


class TaskTimeout(TaskError, TimeoutError):
    """The task ran longer than its wall-clock limit and was killed (a failed attempt)."""


class TaskInterrupted(TaskError):
    """The task was stopped from outside: worker shutdown, lost lease or ``cancel --now``."""

    def __init__(self, reason: str):
        super().__init__(str(reason))
        self.reason = reason  # an EndReason (qlib_ext.pool.status) for the worker's own interrupts


class ChildTaskFailed(TaskError):
    """The task raised in its child process; ``str(e)`` is the child's formatted traceback, ``kind``
    whose fault it was (:func:`qlib_ext.worker.faults.classify`: "rejected", "infra", "recurring" or None)."""

    def __init__(self, text: str, kind: str | None = None):
        super().__init__(text)
        self.kind = kind
