"""Whose fault a failed attempt was: the task's, the task definition's, or the infrastructure's.

* **rejected** (:class:`~qlib_ext.errors.TaskRejected`): the task can never succeed as written (not
  plain data, malformed, a module outside the allow-list, a meaningless result): failed at once.
* **infra**: something outside the task failed — MLflow's database or server unreachable or
  unwritable, the task store away, the disk full. Retrying elsewhere or later may work, so the
  attempt is not counted (up to ``defaults.INFRA_RETRIES`` times).
* **recurring**: the task's own error, but one that comes back identically on every attempt — an
  import error, a keyword the model does not take, CatBoost's "poisson bootstrap is not supported on
  CPU": failed at once with the reason, as a rejection is (retrying would only repeat it).
* anything else is the task's own error: one attempt used; retries are kept for what can change.

:func:`describe` formats an error for the task document: the traceback, plus a last line naming the
root cause when the traceback's own last line does not (SQLAlchemy ends its messages with
"(Background on this error at: https://sqlalche.me/...)").
"""

from __future__ import annotations

import errno
import re
import traceback
from collections.abc import Iterator

from qlib_ext.errors import InfraError, StoreError, TaskRejected

REJECTED = "rejected"
INFRA = "infra"
RECURRING = "recurring"

RECURRING_TYPES = (ImportError, SyntaxError)
"""Exception types that recur identically on every attempt (a missing module or name, code that does not parse)."""

RECURRING_MESSAGES = re.compile(r"got an unexpected keyword argument|missing \d+ required (?:positional|keyword-only) "
                                r"argument|takes \d+ positional arguments? but \d+ (?:were|was) given|"
                                r"module '[\w.]+' has no attribute|not supported on CPU")
"""Messages of errors that recur identically: a bad keyword or argument count to a model or dataset class, a class
missing from its module, a setting the hardware cannot run (CatBoost: "poisson bootstrap is not supported on CPU")."""

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""OS errors that mean the disk, not the task, is at fault."""

INFRA_MESSAGES = ("unable to open database file", "database is locked", "attempt to write a readonly database",
                  "disk i/o error", "database or disk is full", "connection refused", "max retries exceeded",
                  "temporarily unavailable", "no space left on device")
"""Lower-case fragments of driver messages (sqlite, HTTP) that mean MLflow's backend is unusable."""

_INFRA_TYPES = frozenset({("sqlalchemy", "OperationalError"), ("sqlalchemy", "DatabaseError"),
                          ("sqlite3", "OperationalError"), ("sqlite3", "DatabaseError"),
                          ("requests", "ConnectionError"), ("urllib3", "MaxRetryError"),
                          ("pymongo", "ConnectionFailure"), ("pymongo", "AutoReconnect"),
                          ("pymongo", "ServerSelectionTimeoutError"), ("pymongo", "NetworkTimeout")})
"""(top-level module, class name) of driver exceptions that mean a backend is unreachable or unusable."""


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes/contexts, outermost first (cycles cut)."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _is_infra(exc: BaseException) -> bool:
    if isinstance(exc, (InfraError, StoreError)):
        return True
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return True
    if (type(exc).__module__.split(".")[0], type(exc).__name__) in _INFRA_TYPES:
        return True
    return type(exc).__name__ == "MlflowException" and any(m in str(exc).lower() for m in INFRA_MESSAGES)


def _is_recurring(exc: BaseException) -> bool:
    return isinstance(exc, RECURRING_TYPES) or RECURRING_MESSAGES.search(str(exc)) is not None


def classify(exc: BaseException) -> str | None:
    """``"rejected"``, ``"infra"``, ``"recurring"`` or None (the task's own error, worth another attempt) for an
    exception and its causes, in that order of precedence.

    A rejection anywhere in the chain wins (a task that wrapped it is still rejected); a fault outside the task
    wins over a recurring error (an import that failed on a full disk may work later).
    """
    causes = list(chain(exc))
    if any(isinstance(e, TaskRejected) for e in causes):
        return REJECTED
    if any(_is_infra(e) for e in causes):
        return INFRA
    if any(_is_recurring(e) for e in causes):
        return RECURRING
    return None


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of the innermost exception, its first line only (the driver's own words)."""
    inner = list(chain(exc))[-1]
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}".rstrip(": ")


def describe(exc: BaseException) -> str:
    """The traceback of ``exc``; a ``root cause: ...`` line appended when its last line is not the cause."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    cause = root_cause(exc)
    last = text.splitlines()[-1] if text else ""
    if cause not in last or "Background on this error" in last:
        text += f"\nroot cause: {cause}"
    return text
