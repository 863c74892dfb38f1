"""A thread that keeps a claimed task's lease alive while the task runs."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from pymongo.errors import PyMongoError

from qlib_ext.queue import Claim, GridTaskManager

logger = logging.getLogger(__name__)


class HeartbeatThread:
    """Context manager renewing ``claim``'s lease every ``interval`` seconds until exit.

    ``lost`` is set when a renewal finds the task no longer ours (reclaimed, cancelled, reset):
    the worker then knows its result will be refused at commit. A store outage is not a loss —
    renewals keep being retried until the lease would have expired anyway.
    """

    def __init__(self, tm: GridTaskManager, claim: Claim, lease_seconds: float, interval: float):
        self._tm, self._claim = tm, claim
        self._lease, self._interval = lease_seconds, interval
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.id}", daemon=True)

    def __enter__(self) -> HeartbeatThread:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self._tm.renew(self._claim, self._lease):
                    logger.warning("heartbeat: lease on task %s lost by %s", self._claim.id, self._claim.worker)
                    self.lost.set()
                    return
            except PyMongoError as e:
                logger.warning("heartbeat: renewing task %s failed (%s); retrying", self._claim.id, e)
