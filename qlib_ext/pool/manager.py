"""Qlib's ``TaskManager`` with what a many-worker pool needs: bulk dedup, leases, bounded retries,
fenced commits and a ``$group`` status count.

Documents keep Qlib's shape (``def``/``filter``/``status``/``priority``/``res``) so Qlib's own
``python -m qlib.workflow.task.manage -t POOL task_stat`` reads them; the extra fields are ours:
``hash`` (unique: dedup), ``attempt``, ``worker``, ``host``, ``lease_until`` (store clock),
``errors`` (one entry per failed attempt), ``outcome`` (the committed result as plain BSON); every
name is in :mod:`qlib_ext.pool.record`. Qlib unpickles every field whose name starts with ``def`` or
``res``, so ours never do; 0.1.0 called ``outcome`` ``result``, and :meth:`GridTaskManager.migrate`
renames it when a pool is opened.
"""

from __future__ import annotations

import datetime as dt
import logging
import pickle
import socket
import time
from dataclasses import dataclass
from typing import Any

import pymongo
from bson.binary import Binary
from pymongo.database import Database
from pymongo.errors import BulkWriteError, PyMongoError
from qlib.workflow.task.manage import TaskManager

from qlib_ext import defaults
from qlib_ext.errors import StoreError, TaskDecodeError
from qlib_ext.identity import digest
from qlib_ext.names import check_pool_name
from qlib_ext.pool.database import (  # the database-level functions, also importable from here
    POOLS_COLLECTION,
    find_pool_meta,
    load_pool_meta,
    open_db,
    pool_names,
    save_pool_meta,
    update_pool_meta,
)
from qlib_ext.pool.record import DOC_FORMAT, META, Doc, ErrorEntry, Outcome, PoolMeta, TaskMeta
from qlib_ext.pool.status import ADOPTABLE, UNFINISHED, TaskStatus
from qlib_ext.pool.worker_name import worker_id  # ``host:pid`` (+ scheduler job) stamped on claims

logger = logging.getLogger(__name__)

SUBMIT_CHUNK = 500
"""Tasks per lookup / insert command when submitting."""


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def task_hash(task: dict) -> str:
    """Stable identity of a task definition: sha1 of its canonical JSON, without the grid hash (editing a grid
    changes that for every point, and the points already run must stay deduplicated)."""
    meta = task.get(META)
    if isinstance(meta, dict) and TaskMeta.Field.GRID_HASH in meta:
        task = {**task, META: {k: v for k, v in meta.items() if k != TaskMeta.Field.GRID_HASH}}
    return digest(task)


@dataclass(frozen=True)
class Claim:
    """What a worker holds after claiming: enough to renew, fail or commit under fencing."""

    task: dict
    worker: str
    attempt: int

    @property
    def id(self) -> Any:
        return self.task[Doc.ID]


class GridTaskManager(TaskManager):
    """A ``TaskManager`` for one pool, safe to use from any number of processes and hosts.

    Every state change is one atomic single-document operation guarded by the expected state
    (compare-and-set), so no locks are held and a lost race simply means "try the next task".
    Lease arithmetic uses the store's clock (from ``hello.localTime``), not the worker's. Opening a
    pool migrates documents written by 0.1.0 (:meth:`migrate`).
    """

    def __init__(self, task_pool: str, db: Database | None = None, migrate: bool = True):
        check_pool_name(task_pool)  # before the collection is named (qlib_ext.names)
        if db is None:
            super().__init__(task_pool)
        else:
            from qlib import get_module_logger

            self.task_pool = db[task_pool]
            self.logger = get_module_logger(self.__class__.__name__)
        self.pool_name = task_pool
        self._clock: tuple[dt.datetime, float] | None = None  # (store time, time.monotonic()) at last sync
        self.migrated = False
        if migrate:  # a worker defers it to its first step, where an unreachable store is retried
            self.migrate()

    # ------------------------------------------------------------------ format
    def migrate(self) -> int:
        """Rename 0.1.0's ``result`` field to ``outcome`` (Qlib unpickles every ``res*`` field); return how many.

        One ``update_many`` ``$rename`` guarded by ``$exists``: atomic per document, idempotent, done before this
        process reads any document (stop 0.1.0 workers first); ``doc_format`` in the metadata then skips the scan.
        """
        db = self.task_pool.database
        try:
            meta = find_pool_meta(db, self.pool_name, [PoolMeta.Field.DOC_FORMAT])
            if meta is not None and meta.doc_format >= DOC_FORMAT:
                self.migrated = True
                return 0
            done = self.task_pool.update_many({Doc.LEGACY_RESULT: {"$exists": True}},
                                              {"$rename": {Doc.LEGACY_RESULT: Doc.OUTCOME}}).modified_count
            if meta is not None:
                update_pool_meta(db, self.pool_name, doc_format=DOC_FORMAT)
        except PyMongoError as e:
            raise StoreError(f"pool {self.pool_name}: cannot migrate 0.1.0 '{Doc.LEGACY_RESULT}' fields: {e}") from e
        self.migrated = True
        if done:
            logger.warning("pool %s: renamed the 0.1.0 field %r to %r in %d tasks", self.pool_name,
                           Doc.LEGACY_RESULT, Doc.OUTCOME, done)
        return done

    # ------------------------------------------------------------------ clock
    def now(self) -> dt.datetime:
        """The store's current time (UTC, naive as BSON returns it).

        The store's clock read once, plus this process's monotonic clock since then: neither a
        skewed wall clock on this host nor a later step of it (NTP, an admin) moves lease
        arithmetic. Re-read every ``CLOCK_RESYNC_SECONDS`` (the monotonic clock stops while a host
        is suspended).
        """
        if self._clock is None or time.monotonic() - self._clock[1] > defaults.CLOCK_RESYNC_SECONDS:
            self.sync_clock()
        store_time, mono = self._clock  # type: ignore[misc]  # set by sync_clock
        return store_time + dt.timedelta(seconds=time.monotonic() - mono)

    def sync_clock(self) -> None:
        """Read the store's clock (``hello.localTime``), half the round trip added."""
        sent = time.monotonic()
        try:
            hello = self.task_pool.database.client.admin.command("hello")
        except PyMongoError as e:
            raise StoreError(f"cannot reach the task store: {e}") from e
        got = time.monotonic()
        remote = hello.get("localTime")
        if remote is None:  # a store that does not report its time: trust ours
            remote = dt.datetime.now(dt.timezone.utc)
        self._clock = (remote.replace(tzinfo=None) + dt.timedelta(seconds=(got - sent) / 2), got)

    # ------------------------------------------------------------------ submit
    def ensure_indexes(self) -> None:
        """Indexes the queue relies on: unique task hash, and status/priority for claims and counts."""
        self.task_pool.create_index(Doc.HASH, unique=True, sparse=True)
        self.task_pool.create_index([(Doc.STATUS, pymongo.ASCENDING), (Doc.PRIORITY, pymongo.DESCENDING)])

    def create_tasks(self, tasks: list[dict], max_attempts: int = defaults.MAX_ATTEMPTS) -> tuple[int, int]:
        """Insert the tasks not yet in the pool, in bulk. Returns ``(new, total)``.

        Unlike ``TaskManager.create_task`` (one ``find_one`` on the whole filter per task), this looks
        up hashes with indexed ``$in`` queries and inserts with ``insert_many``, both in chunks of
        ``SUBMIT_CHUNK`` so that no single command holds the store for long while workers claim. A
        concurrent submitter of the same task loses on the unique index and counts it as "already there".
        """
        self.ensure_indexes()
        by_hash = {task_hash(t): t for t in tasks}
        hashes = list(by_hash)
        existing: set[str] = set()
        for part in _chunks(hashes, SUBMIT_CHUNK):
            found = self.task_pool.find({Doc.HASH: {"$in": part}}, {Doc.HASH: 1, Doc.ID: 0})
            existing.update(d[Doc.HASH] for d in found)
        new = [h for h in hashes if h not in existing]
        inserted = 0
        for part in _chunks(new, SUBMIT_CHUNK):
            inserted += self._insert_new([self._new_doc(h, by_hash[h], max_attempts) for h in part])
        return inserted, len(tasks)

    def insert_prioritized(self, tasks: list[dict], priorities: list[int], status: str = TaskStatus.WAITING.value,
                           max_attempts: int = defaults.MAX_ATTEMPTS) -> int:
        """Insert the tasks not yet in the pool with these claim priorities and ``status`` (a search's
        queue: ``waiting``, or ``pruned`` for windows no worker may claim); return how many were new.

        A task already in the pool (same hash) is left as it is.
        """
        self.ensure_indexes()
        docs = []
        for task, priority in zip(tasks, priorities, strict=True):
            doc = self._new_doc(task_hash(task), task, max_attempts)
            doc.update({Doc.STATUS: status, Doc.PRIORITY: priority})
            docs.append(doc)
        return self._insert_new(docs)

    def move_status(self, hashes: list[str], old: str, new: str) -> int:
        """Move the tasks in ``hashes`` that are in status ``old`` to ``new``; return how many moved."""
        flt = {Doc.HASH: {"$in": list(hashes)}, Doc.STATUS: old}
        return self.task_pool.update_many(flt, {"$set": {Doc.STATUS: new}}).modified_count

    def by_hash(self, hashes: list[str]) -> list[dict]:
        """``hash``, ``status`` and the committed ``outcome`` (run id, metrics) of each task in ``hashes``."""
        projection = {Doc.HASH: 1, Doc.STATUS: 1, f"{Doc.OUTCOME}.{Outcome.METRICS}": 1,
                      f"{Doc.OUTCOME}.{Outcome.RUN_ID}": 1}
        return list(self.task_pool.find({Doc.HASH: {"$in": list(hashes)}}, projection))

    def _insert_new(self, docs: list[dict]) -> int:
        try:
            return len(self.task_pool.insert_many(docs, ordered=False).inserted_ids)
        except BulkWriteError as e:
            errors = e.details.get("writeErrors", [])
            if any(w.get("code") != 11000 for w in errors):
                raise
            return e.details.get("nInserted", 0)

    def _new_doc(self, h: str, task: dict, max_attempts: int) -> dict:
        doc = {Doc.DEF: task, Doc.FILTER: task, Doc.STATUS: TaskStatus.WAITING.value, Doc.PRIORITY: 0, Doc.HASH: h,
               Doc.ATTEMPT: 0, Doc.MAX_ATTEMPTS: max_attempts, Doc.ERRORS: [], Doc.CREATED_AT: self.now()}
        return self._encode_task(doc)

    # ------------------------------------------------------------------ claim / lease
    def claim(self, lease_seconds: float = defaults.LEASE_SECONDS, worker: str | None = None,
              query: dict | None = None, device: str | None = None,
              status: str = TaskStatus.WAITING.value) -> Claim | None:
        """Atomically move the highest-priority task in ``status`` (``waiting``; ``part_done`` for
        ``DelayTrainerRM``'s second stage) to running under a lease.

        Returns None when there is none. Qlib's ``fetch_task`` does the same find-and-update without owner,
        attempt or lease. ``device`` (``cuda:N``/``cpu``) is recorded for ``status``; ``claimed_from`` is
        where a failed attempt goes back to.
        """
        from qlib_ext.pool.liveness import stamp

        worker = worker or worker_id()
        now = self.now()
        flt = {**(query or {}), Doc.STATUS: status}
        fields: dict[str, Any] = {Doc.STATUS: TaskStatus.RUNNING.value, Doc.CLAIMED_FROM: status, Doc.WORKER: worker,
                                  Doc.HOST: worker.rsplit(":", 1)[0], Doc.STARTED_AT: now, Doc.RENEWED_AT: now,
                                  Doc.LEASE_UNTIL: now + dt.timedelta(seconds=lease_seconds), **stamp()}
        update: dict[str, Any] = {"$set": fields, "$inc": {Doc.ATTEMPT: 1}}
        if device is not None:
            fields[Doc.DEVICE] = device
        else:
            update["$unset"] = {Doc.DEVICE: ""}
        doc = self.task_pool.find_one_and_update(
            flt, update, sort=[(Doc.PRIORITY, pymongo.DESCENDING)], return_document=pymongo.ReturnDocument.AFTER
        )
        if doc is None:
            return None
        claim = Claim(task=doc, worker=worker, attempt=doc[Doc.ATTEMPT])
        try:
            self._decode_task(doc)
        except TaskDecodeError as e:
            e.claim = claim  # the task is ours now: the worker fails it with this reason
            raise
        return claim

    def _decode_task(self, task: dict) -> dict:
        """Qlib's decoding of ``def``/``res``, allowing plain data only (:mod:`qlib_ext.pool.codec`).

        Raises:
            TaskDecodeError: a field is not plain data; the message names the task and the field.
        """
        from qlib_ext.pool.codec import decode_document

        return decode_document(task)

    def _held(self, claim: Claim) -> dict:
        """The fencing filter: the task is still ours only if worker and attempt still match."""
        return {Doc.ID: claim.id, Doc.STATUS: TaskStatus.RUNNING.value, Doc.WORKER: claim.worker,
                Doc.ATTEMPT: claim.attempt}

    def renew(self, claim: Claim, lease_seconds: float = defaults.LEASE_SECONDS) -> bool:
        """Extend the lease; False means the lease was lost (reclaimed, cancelled or reset)."""
        now = self.now()
        update = {"$set": {Doc.LEASE_UNTIL: now + dt.timedelta(seconds=lease_seconds), Doc.RENEWED_AT: now}}
        return self.task_pool.update_one(self._held(claim), update).matched_count == 1

    def commit(self, claim: Claim, result: dict, status: str = TaskStatus.DONE.value, res: Any = None) -> bool:
        """Store the result if the task is still ours. False: someone else owns (or cancelled) it.

        ``outcome`` holds ``result``; Qlib's ``res`` holds ``res`` pickled (None: ``result``; a task Qlib
        submitted gets the run's Recorder there, as Qlib's ``run_task(task_train, ...)`` commits it).

        "Ours" means the lease is still held, or the lease expired and recovery put the task back
        (``waiting``, or ``failed`` when that was the last attempt) while nobody claimed it since:
        ``attempt`` unchanged. That adopts a result finished during a store outage, without ever
        recording a task twice — any new claim bumps ``attempt`` and fences us out.
        """
        adoptable = {Doc.ID: claim.id, Doc.ATTEMPT: claim.attempt, Doc.STATUS: {"$in": list(ADOPTABLE)}}
        pickled = Binary(pickle.dumps(result if res is None else res))
        update = {"$set": {Doc.STATUS: status, Doc.RES: pickled, Doc.OUTCOME: result,
                           Doc.WORKER: claim.worker, Doc.FINISHED_AT: self.now()},
                  "$unset": {Doc.LEASE_UNTIL: ""}}
        ok = self.task_pool.update_one({"$or": [self._held(claim), adoptable]}, update).matched_count == 1
        if not ok:
            logger.warning("pool %s: %s lost the lease on task %s (attempt %s); result discarded",
                           self.pool_name, claim.worker, claim.id, claim.attempt)
        return ok

    def fail(self, claim: Claim, error: str, count_attempt: bool = True, guard: dict | None = None,
             max_attempts: int | None = None, infra: bool = False) -> str | None:
        """Record a failed attempt: back to where it was claimed from (``waiting`` or ``part_done``) while
        attempts remain, else ``failed``.

        ``count_attempt=False`` hands the task back without using up an attempt (graceful stop);
        ``guard`` adds conditions to the compare-and-set (lease recovery requires an expired lease);
        ``max_attempts`` overrides the limit stamped on the task at submit (``worker --max-attempts``);
        ``max_attempts=claim.attempt`` fails the task now (it can never succeed). ``infra`` (with
        ``count_attempt=False``) records a fault outside the task: ``infra_retries`` counts them and
        ``infra_error`` keeps the last one. Returns the new status, or None if the lease was already lost.
        """
        if max_attempts is None:
            doc = self.task_pool.find_one({Doc.ID: claim.id}, {Doc.MAX_ATTEMPTS: 1})
            max_attempts = (doc or {}).get(Doc.MAX_ATTEMPTS, defaults.MAX_ATTEMPTS)
        exhausted = count_attempt and claim.attempt >= max_attempts
        back = claim.task.get(Doc.CLAIMED_FROM) or TaskStatus.WAITING.value
        status = TaskStatus.FAILED.value if exhausted else back
        entry = {ErrorEntry.ATTEMPT: claim.attempt, ErrorEntry.WORKER: claim.worker, ErrorEntry.TIME: self.now(),
                 ErrorEntry.ERROR: error}
        update: dict = {"$set": {Doc.STATUS: status}, "$unset": {Doc.LEASE_UNTIL: ""}}
        if count_attempt:
            update["$push"] = {Doc.ERRORS: entry}
        else:
            update["$inc"] = {Doc.ATTEMPT: -1}
        if infra and not count_attempt:
            update["$inc"][Doc.INFRA_RETRIES] = 1
            update["$set"][Doc.INFRA_ERROR] = entry
        ok = self.task_pool.update_one({**self._held(claim), **(guard or {})}, update).matched_count == 1
        return status if ok else None

    def reclaim_expired(self, max_attempts: int | None = None) -> list[Claim]:
        """Return running tasks whose lease expired to waiting (or ``failed`` when out of attempts).

        Safe to run from every worker at once: each update is guarded by the exact worker and
        attempt it saw, so a task is recovered once and a renewed lease is left alone.
        Returns the dead attempts this call recovered (their MLflow runs can then be ended).
        """
        now = self.now()
        stale = self.task_pool.find({Doc.STATUS: TaskStatus.RUNNING.value, Doc.LEASE_UNTIL: {"$lt": now}},
                                    {Doc.WORKER: 1, Doc.ATTEMPT: 1, Doc.CLAIMED_FROM: 1})
        return [c for d in list(stale) for c in self._recover(
            d, f"lease expired: worker {d.get(Doc.WORKER)} stopped renewing it", {Doc.LEASE_UNTIL: {"$lt": now}},
            max_attempts)]

    def reclaim_orphaned(self, max_attempts: int | None = None) -> list[Claim]:
        """Take back now, as :meth:`reclaim_expired` would after the lease (an attempt used), the running tasks
        whose holder ran on this host and is gone (killed, crashed): :mod:`qlib_ext.pool.liveness` judges it.
        Holders it cannot judge (another host or pid namespace, no ``/proc``) are left to their lease."""
        from qlib_ext.pool.liveness import Holder, scope

        flt = {Doc.STATUS: TaskStatus.RUNNING.value, Doc.HOST: socket.gethostname(), Doc.PID_SCOPE: scope(),
               Doc.LEASE_UNTIL: {"$exists": True}}  # Qlib's own fetch_task sets no lease: never ours to judge
        seen = self.task_pool.find(flt, {Doc.DEF: 0, Doc.FILTER: 0, Doc.RES: 0, Doc.OUTCOME: 0, Doc.ERRORS: 0})
        docs = [d for d in seen if (h := Holder.of(d)) is not None and h.gone()] if scope() else []
        return [c for d in docs for c in self._recover(
            d, f"worker {d.get(Doc.WORKER)} died: its process {d[Doc.PID]} is gone",
            {Doc.PID: d[Doc.PID], Doc.PID_START: d.get(Doc.PID_START)}, max_attempts)]

    def _recover(self, doc: Any, reason: str, guard: dict, max_attempts: int | None) -> list[Claim]:
        """Fail the attempt ``doc`` records, guarded by what was seen; ``[claim]`` if this call did it."""
        claim = Claim(task={Doc.ID: doc[Doc.ID], Doc.CLAIMED_FROM: doc.get(Doc.CLAIMED_FROM)},
                      worker=doc.get(Doc.WORKER), attempt=doc.get(Doc.ATTEMPT, 0))
        status = self.fail(claim, reason, guard=guard, max_attempts=max_attempts)
        if status is None:
            return []
        logger.warning("pool %s: reclaimed task %s from %s (%s) -> %s", self.pool_name, doc[Doc.ID], claim.worker,
                       reason, status)
        return [claim]

    # ------------------------------------------------------------------ operator commands
    def retry(self, task_id: Any = None, failed_only: bool = False) -> int:
        """Requeue failed (and cancelled) tasks, or the one ``task_id``: :func:`qlib_ext.pool.requeue.retry`."""
        from qlib_ext.pool.requeue import retry

        return retry(self, task_id, failed_only)

    def cancel(self, now: bool = False) -> int:
        """Cancel waiting and part_done tasks (running ones too ``now``): :func:`qlib_ext.pool.requeue.cancel`."""
        from qlib_ext.pool.requeue import cancel

        return cancel(self, now)

    # ------------------------------------------------------------------ stats
    def counts(self, query: dict | None = None) -> dict[str, int]:
        """Tasks per status, counted in the store (Qlib's ``task_stat`` unpickles every task).

        One indexed ``count_documents`` per known status; if they do not add up to the whole pool
        (someone used a status of their own), one ``$group`` over the pool counts everything.
        """
        query = query or {}
        counts = {s.value: self.task_pool.count_documents({**query, Doc.STATUS: s.value}) for s in TaskStatus}
        counts = {k: v for k, v in counts.items() if v}
        total = self.task_pool.count_documents(query) if query else self.task_pool.estimated_document_count()
        if sum(counts.values()) == total:
            return counts
        pipeline = [{"$match": query}, {"$group": {"_id": f"${Doc.STATUS}", "n": {"$sum": 1}}}]
        return {d["_id"]: d["n"] for d in self.task_pool.aggregate(pipeline)}

    def unfinished(self, statuses: tuple[str, ...] = UNFINISHED) -> int:
        """Tasks still in ``statuses`` (waiting, running or part-done); plus one while a search proposer holds the
        pool open (it queues more tasks as results come in, so workers must not exit when the queue runs dry)."""
        return self.task_pool.count_documents({Doc.STATUS: {"$in": list(statuses)}}) + int(self.search_open())

    def search_open(self) -> bool:
        """Whether a search proposer renewed its hold on this pool recently (``search_until`` in the future)."""
        meta = find_pool_meta(self.task_pool.database, self.pool_name, [PoolMeta.Field.SEARCH_UNTIL])
        until = meta.search_until if meta is not None else None
        return isinstance(until, dt.datetime) and until > self.now()

    def owners(self, task_ids: list[Any]) -> dict[Any, dict]:
        """``_id`` -> status, attempt, worker and committed run id of each of ``task_ids`` that exists."""
        cur = self.task_pool.find({Doc.ID: {"$in": list(task_ids)}},
                                  {Doc.STATUS: 1, Doc.ATTEMPT: 1, Doc.WORKER: 1, f"{Doc.OUTCOME}.{Outcome.RUN_ID}": 1})
        return {d[Doc.ID]: d for d in cur}

    def by_run_name(self, run_names: list[str]) -> dict[str, list[dict]]:
        """Run name -> the documents (status, started_at) of the tasks with that ``qlib_ext.run_name``."""
        key = f"{Doc.FILTER}.{META}.{TaskMeta.Field.RUN_NAME}"
        out: dict[str, list[dict]] = {}
        for d in self.task_pool.find({key: {"$in": list(run_names)}}, {Doc.STATUS: 1, Doc.STARTED_AT: 1, key: 1}):
            out.setdefault(_run_name(d), []).append(d)
        return out

    def committed_run(self, task_id: Any) -> tuple[str | None, str | None]:
        """``(status, committed run id)`` of one task; ``(None, None)`` if it is gone."""
        doc = self.task_pool.find_one({Doc.ID: task_id}, {Doc.STATUS: 1, f"{Doc.OUTCOME}.{Outcome.RUN_ID}": 1})
        if doc is None:
            return None, None
        return doc.get(Doc.STATUS), (doc.get(Doc.OUTCOME) or {}).get(Outcome.RUN_ID)

    def committed_artifacts(self, task_id: Any) -> list | None:
        """The artifact digests (``Outcome.ARTIFACTS``) of a done task; None if none were committed."""
        doc = self.task_pool.find_one({Doc.ID: task_id, Doc.STATUS: TaskStatus.DONE.value},
                                      {f"{Doc.OUTCOME}.{Outcome.ARTIFACTS}": 1})
        return ((doc or {}).get(Doc.OUTCOME) or {}).get(Outcome.ARTIFACTS)

    def waiting_documents(self) -> list[dict]:
        """``_id`` and the still-pickled ``def`` of each waiting task (the caller decodes and checks each)."""
        return list(self.task_pool.find({Doc.STATUS: TaskStatus.WAITING.value}, {Doc.DEF: 1}))

    def running(self) -> list[dict]:
        """Running tasks: ``_id``, worker, host, attempt, started_at, the lease and its holder's process
        (``renewed_at``, ``lease_until``, pid fields) and run name (``name``)."""
        key = f"{Doc.FILTER}.{META}.{TaskMeta.Field.RUN_NAME}"
        fields = (Doc.WORKER, Doc.HOST, Doc.STARTED_AT, Doc.ATTEMPT, Doc.DEVICE, Doc.RENEWED_AT, Doc.LEASE_UNTIL,
                  Doc.PID, Doc.PID_START, Doc.PID_SCOPE, key)
        cur = self.task_pool.find({Doc.STATUS: TaskStatus.RUNNING.value}, dict.fromkeys(fields, 1))
        return [{**d, "name": _run_name(d)} for d in cur]

    def failed(self, limit: int = 0) -> list[dict]:
        """Failed tasks (at most ``limit``, 0: all): ``_id``, ``errors`` and run name (``name``)."""
        cur = self.task_pool.find({Doc.STATUS: TaskStatus.FAILED.value},
                                  {Doc.ERRORS: 1, f"{Doc.FILTER}.{META}.{TaskMeta.Field.RUN_NAME}": 1}, limit=limit)
        return [{**d, "name": _run_name(d)} for d in cur]

    def set_max_attempts(self, max_attempts: int) -> int:
        """Stamp a new attempt limit on every unfinished (waiting, running or part_done) task; return how many."""
        flt = {Doc.STATUS: {"$in": list(UNFINISHED)}}
        return self.task_pool.update_many(flt, {"$set": {Doc.MAX_ATTEMPTS: max_attempts}}).modified_count

    def metas(self, status: str) -> list[dict]:
        """The ``qlib_ext`` blocks of the tasks in ``status`` (plain BSON from ``filter``; nothing unpickled)."""
        cur = self.task_pool.find({Doc.STATUS: status}, {f"{Doc.FILTER}.{META}": 1})
        return [(d.get(Doc.FILTER) or {}).get(META) or {} for d in cur]

    def handed_back(self) -> list[dict]:
        """Unfinished tasks handed back after infrastructure faults: ``infra_retries`` and ``infra_error``."""
        flt = {Doc.STATUS: {"$in": [TaskStatus.WAITING.value, TaskStatus.RUNNING.value]}, Doc.INFRA_RETRIES: {"$gt": 0}}
        return list(self.task_pool.find(flt, {Doc.INFRA_RETRIES: 1, Doc.INFRA_ERROR: 1}))

    def meta(self) -> PoolMeta:
        """This pool's metadata (written at submit), empty if it has none."""
        return find_pool_meta(self.task_pool.database, self.pool_name) or PoolMeta(pool=self.pool_name)

    def results(self) -> list[dict]:
        """Committed results of done tasks, with their task meta, without unpickling anything."""
        cur = self.task_pool.find({Doc.STATUS: TaskStatus.DONE.value},
                                  {Doc.OUTCOME: 1, f"{Doc.FILTER}.{META}": 1, Doc.ATTEMPT: 1, Doc.WORKER: 1})
        return [{Doc.ID: d[Doc.ID], "meta": d.get(Doc.FILTER, {}).get(META, {}), Doc.ATTEMPT: d.get(Doc.ATTEMPT),
                 Doc.WORKER: d.get(Doc.WORKER), **(d.get(Doc.OUTCOME) or {})} for d in cur]


def _run_name(doc: dict) -> str:
    return str(TaskMeta.of(doc.get(Doc.FILTER) or {}).run_name or "")


__all__ = ["GridTaskManager", "Claim", "task_hash", "worker_id", "open_db", "POOLS_COLLECTION", "find_pool_meta",
           "load_pool_meta", "pool_names", "save_pool_meta", "update_pool_meta"]
