"""The engine: every database and collection, one lock, the journal and the open cursors.

Concurrency promise: :meth:`Engine.execute` runs each command entirely under one lock, so every
command is atomic with respect to every client (two racing ``findAndModify`` claims can never get
the same document). Replies are encoded under the lock too, so no client sees a half-updated
document. Waiting for the journal's fsync happens after the lock is released (group commit).
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import bson

from qlib_ext.store.collection import Collection
from qlib_ext.store.errors import CommandError, error_reply
from qlib_ext.store.journal import Journal
from qlib_ext.store.limits import LimitError, check_command

logger = logging.getLogger(__name__)

CURSOR_IDLE_SECONDS = 600.0
"""Open cursors not touched for this long are discarded (MongoDB's default cursor timeout)."""


@dataclass
class Cursor:
    """Results still to be sent by ``getMore``."""

    ns: str
    docs: Iterator[dict[str, Any]]
    projection: dict[str, Any] | None
    touched: float = field(default_factory=time.monotonic)


class Engine:
    """All data of one store. See the module docstring for the concurrency promise."""

    def __init__(self, journal: Journal | None = None):
        self.lock = threading.Lock()
        self.journal = journal
        self.dbs: dict[str, dict[str, Collection]] = {}
        self.cursors: dict[int, Cursor] = {}
        self.log: list[dict[str, Any]] = []  # journal ops of the command being run
        self.started = time.time()
        self.failure = ""  # set when the journal failed: the store then refuses every command
        self.on_failure: Callable[[], None] | None = None
        if journal is not None:
            self._replay(journal.open())

    # ------------------------------------------------------------------ running commands
    def execute(self, db: str, body: dict[str, Any], sequences: dict[str, list]) -> bytes:
        """Run one command atomically; return the encoded reply once its writes are durable.

        If the journal cannot be written or flushed, the store stops serving (every later
        command fails, ``on_failure`` is called): memory may then be ahead of the disk, and
        nothing must be acknowledged or read from it. A restart replays what was acknowledged.
        """
        with self.lock:
            if self.failure:
                return bson.encode(error_reply(1, self.failure))
            reply = self._run(db, body, sequences)
            try:
                lsn = self._commit_log()
            except OSError as e:
                return bson.encode(error_reply(1, self._fail(f"journal write failed: {e}")))
            encoded = bson.encode(reply)
        if lsn and self.journal is not None:  # a non-zero lsn comes from the journal
            try:
                self.journal.wait_durable(lsn)
            except OSError as e:
                return bson.encode(error_reply(1, self._fail(f"journal flush failed: {e}")))
        return encoded

    def _run(self, db: str, body: dict[str, Any], sequences: dict[str, list]) -> dict[str, Any]:
        from qlib_ext.store.commands import dispatch

        try:
            check_command(body, sequences)
            return dispatch(self, db, body, sequences)
        except CommandError as e:
            return error_reply(e.code, str(e))
        except Exception as e:  # noqa: BLE001 - turned into a MongoDB error reply
            return error_reply_for(e)

    def _fail(self, reason: str) -> str:
        self.failure = f"the embedded store stopped after a disk error ({reason}); restart it"
        logger.critical("store: %s", self.failure)
        if self.on_failure is not None:
            self.on_failure()
        return self.failure

    def _commit_log(self) -> int:
        ops, self.log = self.log, []
        if not ops or self.journal is None:
            return 0
        lsn = self.journal.append(ops)
        if self.journal.needs_compaction():
            self.journal.compact(self.state_records())
        return lsn

    # ------------------------------------------------------------------ namespaces
    @overload
    def collection(self, db: str, name: str, create: Literal[True]) -> Collection: ...

    @overload
    def collection(self, db: str, name: str, create: bool = False) -> Collection | None: ...

    def collection(self, db: str, name: str, create: bool = False) -> Collection | None:
        """The collection ``db.name``; created (and journaled) when ``create`` and missing."""
        colls = self.dbs.get(db)
        coll = colls.get(name) if colls else None
        if coll is None and create:
            _check_name(db, name)
            coll = self.dbs.setdefault(db, {})[name] = Collection(name, db, self.log_op)
            self.log_op({"o": "create", "db": db, "c": name})
        return coll

    def drop_collection(self, db: str, name: str) -> bool:
        """Drop ``db.name``; return whether it existed."""
        colls = self.dbs.get(db, {})
        if colls.pop(name, None) is None:
            return False
        if not colls:
            self.dbs.pop(db, None)
        self.log_op({"o": "dropc", "db": db, "c": name})
        return True

    def drop_database(self, db: str) -> None:
        """Drop a whole database (a no-op when missing)."""
        if self.dbs.pop(db, None) is not None:
            self.log_op({"o": "dropdb", "db": db})

    def log_op(self, op: dict[str, Any]) -> None:
        """Queue a journal op for the running command (collections call this for their writes)."""
        self.log.append(op)

    # ------------------------------------------------------------------ cursors
    def open_cursor(self, cursor: Cursor) -> int:
        """Register a cursor; return its id."""
        self._reap_cursors()
        cursor_id = random.getrandbits(62) + 1
        self.cursors[cursor_id] = cursor
        return cursor_id

    def _reap_cursors(self) -> None:
        deadline = time.monotonic() - CURSOR_IDLE_SECONDS
        for cursor_id in [c for c, cur in self.cursors.items() if cur.touched < deadline]:
            del self.cursors[cursor_id]

    # ------------------------------------------------------------------ durability
    def state_records(self) -> Iterator[dict[str, Any]]:
        """Records that rebuild the current state (the snapshot's content)."""
        for db, colls in self.dbs.items():
            for name, coll in colls.items():
                yield {"ops": [{"o": "create", "db": db, "c": name}]
                       + [{"o": "idx", "db": db, "c": name, "spec": s} for s in coll.specs.values()]}
                docs = iter(coll.docs.values())
                while batch := list(itertools.islice(docs, 500)):
                    yield {"ops": [{"o": "put", "db": db, "c": name, "d": d} for d in batch]}

    def _replay(self, records: Iterator[dict[str, Any]]) -> None:
        """Rebuild the state; an op that cannot be applied is logged and skipped, never fatal."""
        count = skipped = 0
        for record in records:
            for i, op in enumerate(record.get("ops") or []):
                try:
                    self._apply(op)
                except Exception as e:  # noqa: BLE001 - one bad entry must not keep the store down
                    skipped += 1
                    logger.error("store: replay skipped op %d of record %d (%s on %s.%s): %r",
                                 i, count, op.get("o"), op.get("db"), op.get("c"), e)
            count += 1
        self.log = []
        docs = sum(len(c.docs) for colls in self.dbs.values() for c in colls.values())
        logger.info("store: replayed %d records, %d documents%s", count, docs,
                    f", {skipped} ops skipped" if skipped else "")
        if count and self.journal is not None and self.journal.journal_bytes:
            self.journal.compact(self.state_records())

    def _apply(self, op: dict[str, Any]) -> None:
        kind, db = op["o"], op["db"]
        if kind == "dropdb":
            self.drop_database(db)
        elif kind == "dropc":
            self.drop_collection(db, op["c"])
        else:
            coll = self.collection(db, op["c"], create=True)
            if kind == "put":
                coll.put_replayed(op["d"])
            elif kind == "del":
                coll.delete_id(op["id"])
            elif kind == "idx":
                coll.create_index(op["spec"])
            elif kind == "dropidx":
                coll.drop_index(op["name"])

    def close(self) -> None:
        """Flush the journal; the engine must not be used afterwards."""
        with self.lock:
            if self.journal is not None:
                self.journal.close()


def error_reply_for(exc: Exception) -> dict[str, Any]:
    """MongoDB error reply for an exception raised while running a command."""
    import mongomock

    from qlib_ext.store.collection import WriteFailure

    if isinstance(exc, WriteFailure):
        return error_reply(exc.code, str(exc), **exc.details)
    if isinstance(exc, LimitError):
        return error_reply(exc.code, str(exc))
    if isinstance(exc, mongomock.OperationFailure):
        return error_reply(exc.code or 2, str(exc))
    if isinstance(exc, NotImplementedError):
        return error_reply(238, f"not supported by the embedded qlib-ext store: {exc}")
    if isinstance(exc, ValueError | TypeError | KeyError | bson.errors.InvalidDocument):
        return error_reply(2, f"bad value: {exc}")
    logger.exception("store: internal error")
    return error_reply(1, f"internal error in the embedded store: {exc!r}")


def _check_name(db: str, name: str) -> None:
    if not db or any(ch in db for ch in '/\\. "$\0'):
        raise CommandError(73, f"invalid database name {db!r}")
    if not name or "$" in name or "\0" in name or name.startswith("."):
        raise CommandError(73, f"invalid collection name {name!r}")
