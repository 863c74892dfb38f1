"""Trial documents: the pool-side record of a search, from which any proposer rebuilds its study.

One document per trial in the collection ``_qlib_ext_trials`` (``_id`` = ``<pool>:<number>``) holds the
Optuna params, the trial's task dicts (one per rolling window, oldest first) and their hashes, how
many windows have been queued (``released``), each pruning decision (``judged``), and the final
state and objective value. The pool's task documents stay the source of truth for results: a trial's
value is computed from the committed results of its tasks.

Every change is one atomic single-document operation guarded by the expected state (compare-and-set),
so any number of proposers, on any hosts, may work on one search: the trial budget is enforced by the
unique ``_id`` (numbers ``0 .. n_trials-1`` only), and a trial leaves ``running`` exactly once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from enum import StrEnum

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from qlib_ext.pool.record import PoolMeta, Trial

logger = logging.getLogger(__name__)

TRIALS_COLLECTION = "_qlib_ext_trials"
"""Collection of the trial documents of every pool's search."""

class TrialState(StrEnum):
    """State of a trial document (Optuna's ``TrialState`` names, lower case)."""

    RUNNING = "running"
    COMPLETE = "complete"
    FAIL = "fail"
    PRUNED = "pruned"


FINISHED = (TrialState.COMPLETE.value, TrialState.FAIL.value, TrialState.PRUNED.value)
"""States a trial never leaves."""


class TrialStore:
    """The trial documents of one pool. Safe to use from any number of threads, processes and hosts."""

    def __init__(self, db: Database, pool: str):
        self.coll = db[TRIALS_COLLECTION]
        self.pool = pool

    def _id(self, number: int) -> str:
        return f"{self.pool}:{number}"

    def all(self, tasks: bool = True) -> list[dict]:
        """Every trial document of the pool, by number (without the task dicts unless ``tasks``)."""
        projection = None if tasks else {Trial.TASKS: 0}
        return sorted(self.coll.find({Trial.POOL: self.pool}, projection), key=lambda d: d[Trial.NUMBER])

    def count(self) -> int:
        """Trials reserved so far (any state)."""
        return self.coll.count_documents({Trial.POOL: self.pool})

    def get(self, number: int) -> dict | None:
        """The document of trial ``number``."""
        return self.coll.find_one({Trial.ID: self._id(number)})

    def reserve(self, n_trials: int, doc_for: Callable[[int], dict]) -> int | None:
        """Insert ``doc_for(number)`` as the lowest free trial number below ``n_trials``; None when the
        budget is spent.

        The number is the document's unique ``_id``, so two proposers racing for one number cannot both
        get it: the loser tries the next one, and nobody inserts number ``n_trials``.
        """
        number = self.count()
        while number < n_trials:
            try:
                self.coll.insert_one({**doc_for(number), Trial.ID: self._id(number), Trial.POOL: self.pool,
                                      Trial.NUMBER: number, Trial.STATE: TrialState.RUNNING.value,
                                      Trial.CREATED_AT: _now()})
                return number
            except DuplicateKeyError:
                number += 1
        return None

    def finish(self, number: int, state: str, value: float | list[float] | None = None, by: str = "") -> dict:
        """Move a running trial to ``state`` (once); return the document as it now is (``finished_by``
        names the caller that made the move)."""
        update = {"$set": {Trial.STATE: state, Trial.VALUE: value, Trial.FINISHED_AT: _now(), Trial.FINISHED_BY: by}}
        doc = self.coll.find_one_and_update({Trial.ID: self._id(number), Trial.STATE: TrialState.RUNNING.value}, update,
                                            return_document=ReturnDocument.AFTER)
        return doc or self.coll.find_one({Trial.ID: self._id(number)}) or {}

    def judge(self, number: int, step: int, decision: str) -> str:
        """Record the pruning decision at ``step`` unless one is recorded; return the recorded one."""
        key = f"{Trial.JUDGED}.{step}"
        self.coll.update_one({Trial.ID: self._id(number), key: {"$exists": False}}, {"$set": {key: decision}})
        doc = self.coll.find_one({Trial.ID: self._id(number)}, {Trial.JUDGED: 1}) or {}
        return (doc.get(Trial.JUDGED) or {}).get(str(step), decision)

    def release(self, number: int, released: int) -> bool:
        """Count one more queued window (``released`` -> ``released + 1``); False if another proposer did."""
        res = self.coll.update_one({Trial.ID: self._id(number), Trial.RELEASED: released,
                                    Trial.STATE: TrialState.RUNNING.value}, {"$set": {Trial.RELEASED: released + 1}})
        return res.modified_count == 1


def open_search(db: Database, pool: str, until: dt.datetime, owner: str) -> None:
    """Hold the pool open until ``until`` (store time): workers wait for proposals instead of exiting."""
    from qlib_ext.pool.database import update_pool_meta

    update_pool_meta(db, pool, search_until=until, search_owner=owner)


def close_search(db: Database, pool: str, done: bool) -> None:
    """Let workers exit once the queue is drained; ``done`` records that every trial finished."""
    from qlib_ext.pool.database import update_pool_meta

    finished = {PoolMeta.Field.SEARCH_DONE: True} if done else {}
    update_pool_meta(db, pool, search_until=None, **finished)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
