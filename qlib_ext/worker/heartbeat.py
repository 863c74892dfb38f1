"""A thread that keeps a claimed task's lease alive while the task runs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from pymongo.errors import PyMongoError

from qlib_ext import defaults
from qlib_ext.errors import StoreError
from qlib_ext.pool.manager import Claim, GridTaskManager

logger = logging.getLogger(__name__)


class HeartbeatThread:
    """Context manager renewing ``claim``'s lease every ``interval`` seconds until exit.

    ``lost`` is set (and ``on_lost()`` called, from the heartbeat thread) when a renewal finds the
    task no longer ours (reclaimed, cancelled, reset): its result would be refused at commit, so the
    worker stops the task. A store outage is not a loss: renewals are retried until the store answers.
    """

    def __init__(self, tm: GridTaskManager, claim: Claim, lease_seconds: float, interval: float,
                 on_lost: Callable[[], None] | None = None):
        self._tm, self._claim = tm, claim
        self._lease, self._interval = lease_seconds, interval
        self._on_lost = on_lost
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.id}", daemon=True)

    def __enter__(self) -> HeartbeatThread:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + defaults.HEARTBEAT_JOIN_SLACK_SECONDS)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self._tm.renew(self._claim, self._lease):
                    logger.warning("heartbeat: lease on task %s lost by %s", self._claim.id, self._claim.worker)
                    self.lost.set()
                    if self._on_lost is not None:
                        self._on_lost()
                    return
            except (PyMongoError, StoreError) as e:
                logger.warning("heartbeat: renewing task %s failed (%s); retrying", self._claim.id, e)
            except Exception:  # noqa: BLE001 - a dead heartbeat would silently lose the lease
                logger.exception("heartbeat: unexpected error renewing task %s; retrying", self._claim.id)
