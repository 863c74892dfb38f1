"""CRUD commands: insert, update, delete, find/getMore, findAndModify, count, distinct, aggregate.

Each handler takes ``(engine, db, body, sequences)`` and returns the reply document. They run under
the engine lock (see :mod:`qlib_ext.store.engine`).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import bson
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument
from mongomock import aggregate as mm_aggregate
from mongomock import filtering

from qlib_ext.store.collection import Collection, project
from qlib_ext.store.errors import CommandError

if TYPE_CHECKING:
    from qlib_ext.store.engine import Engine

logger = logging.getLogger(__name__)

FIRST_BATCH = 101
"""Documents in a cursor's first batch when the client names no batchSize (MongoDB's default)."""

BATCH_BYTES = 8 * 1024 * 1024
"""Soft cap on the BSON size of one batch (MongoDB caps at 16 MB)."""

_EMPTY = Collection("")


def _coll(engine: Engine, db: str, body: dict, create: bool = False) -> Collection:
    name = next(iter(body.values()))
    if not isinstance(name, str):
        raise CommandError(73, f"collection name must be a string, got {name!r}")
    return engine.collection(db, name, create=create) or _EMPTY


def _items(body: dict, sequences: dict, key: str) -> list[dict]:
    return list(body.get(key) or []) + sequences.get(key, [])


def _write_error(index: int, exc: Exception) -> dict[str, Any]:
    from qlib_ext.store.engine import error_reply_for

    reply = error_reply_for(exc)
    return {"index": index, "code": reply["code"], "errmsg": reply["errmsg"],
            **{k: reply[k] for k in ("keyPattern", "keyValue") if k in reply}}


def _reply_with_errors(reply: dict, errors: list[dict]) -> dict:
    if errors:
        reply["writeErrors"] = errors
    reply["ok"] = 1.0
    return reply


# ---------------------------------------------------------------------- writes
def cmd_insert(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    coll = _coll(engine, db, body, create=True)
    ordered, errors, n = body.get("ordered", True), [], 0
    for i, doc in enumerate(_items(body, seqs, "documents")):
        try:
            coll.insert(doc)
            n += 1
        except Exception as e:  # noqa: BLE001 - reported per document, like MongoDB
            errors.append(_write_error(i, e))
            if ordered:
                break
    return _reply_with_errors({"n": n}, errors)


def cmd_update(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    coll = _coll(engine, db, body, create=True)
    ordered, errors, upserted = body.get("ordered", True), [], []
    matched = modified = 0
    for i, stmt in enumerate(_items(body, seqs, "updates")):
        try:
            n, m, new_id = _update_one_statement(coll, stmt)
        except Exception as e:  # noqa: BLE001 - any statement error is a writeError in the reply, as MongoDB does
            errors.append(_write_error(i, e))
            if ordered:
                break
            continue
        matched, modified = matched + n, modified + m
        if new_id is not None:
            upserted.append({"index": i, "_id": new_id})
    reply: dict[str, Any] = {"n": matched + len(upserted), "nModified": modified}
    if upserted:
        reply["upserted"] = upserted
    return _reply_with_errors(reply, errors)


def _update_one_statement(coll: Collection, stmt: dict) -> tuple[int, int, Any]:
    for option in ("arrayFilters", "collation"):
        if stmt.get(option):
            raise NotImplementedError(f"update option {option!r}")
    spec, update = stmt.get("q") or {}, stmt["u"]
    found = coll.find(spec)
    docs = list(found) if stmt.get("multi") else list(itertools.islice(found, 1))
    modified = sum(coll.update_doc(doc, spec, update) for doc in docs)
    if docs or not stmt.get("upsert"):
        return len(docs), modified, None
    return 0, 0, coll.upsert_doc(spec, update)["_id"]


def cmd_delete(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    coll = _coll(engine, db, body)
    ordered, errors, n = body.get("ordered", True), [], 0
    for i, stmt in enumerate(_items(body, seqs, "deletes")):
        try:
            found = coll.find(stmt.get("q") or {})
            docs = list(itertools.islice(found, 1)) if stmt.get("limit") else list(found)
            for doc in docs:
                coll.delete(doc)
            n += len(docs)
        except Exception as e:  # noqa: BLE001 - any statement error is a writeError in the reply, as MongoDB does
            errors.append(_write_error(i, e))
            if ordered:
                break
    return _reply_with_errors({"n": n}, errors)


def cmd_find_and_modify(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    for option in ("arrayFilters", "collation"):
        if body.get(option):
            raise NotImplementedError(f"findAndModify option {option!r}")
    remove, update = bool(body.get("remove")), body.get("update")
    if remove == (update is not None):
        raise CommandError(9, "findAndModify needs exactly one of 'remove' and 'update'")
    coll = _coll(engine, db, body, create=not remove)
    query = body.get("query") or {}
    doc = next(coll.find(query, _sort_list(body.get("sort"))), None)
    fields, last = body.get("fields"), {"n": 0, "updatedExisting": False}
    value: dict[str, Any] | RawBSONDocument | None = None
    if doc is None:
        if body.get("upsert") and update is not None:  # not remove: exactly one of the two is given
            new = coll.upsert_doc(query, update)
            last.update(n=1, upserted=new["_id"])
            value = project(new, fields) if body.get("new") else None
    else:
        before = bson.encode(project(doc, fields))
        if update is None:  # remove
            coll.delete(doc)
        else:
            coll.update_doc(doc, query, update)
            last["updatedExisting"] = True
        last["n"] = 1
        value = project(doc, fields) if body.get("new") and not remove else RawBSONDocument(before)
    return {"lastErrorObject": last, "value": value, "ok": 1.0}


# ---------------------------------------------------------------------- reads
def _sort_list(sort: Any) -> list[tuple[str, int]] | None:
    if not sort:
        return None
    if not isinstance(sort, dict):
        raise CommandError(2, f"sort must be a document, got {sort!r}")
    out = []
    for key, direction in sort.items():
        if isinstance(direction, dict) or direction not in (1, -1):
            raise NotImplementedError(f"sort {{{key!r}: {direction!r}}} (only 1 and -1 are supported)")
        out.append((key, int(direction)))
    return out


def cmd_find(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    for option in ("collation", "min", "max", "let"):
        if body.get(option):
            raise NotImplementedError(f"find option {option!r}")
    coll = _coll(engine, db, body)
    flt = body.get("filter") or {}
    docs: Iterator[dict] = coll.find(flt, _sort_list(body.get("sort")))
    skip, limit = int(body.get("skip") or 0), int(body.get("limit") or 0)
    single = bool(body.get("singleBatch")) or limit < 0
    docs = itertools.islice(docs, skip, skip + abs(limit) if limit else None)
    return _first_batch(engine, f"{db}.{coll.name}", docs, body.get("projection"),
                        body.get("batchSize"), single)


def _first_batch(engine: Engine, ns: str, docs: Iterator[dict], projection: dict | None,
                 batch_size: int | None, single: bool) -> dict:
    size = FIRST_BATCH if batch_size is None else int(batch_size)
    batch = _take(docs, size or FIRST_BATCH, projection)
    cursor_id = 0
    rest = [] if single else list(docs)  # materialise now: later writes must not break iteration
    if rest:
        from qlib_ext.store.engine import Cursor

        cursor_id = engine.open_cursor(Cursor(ns, iter(rest), projection))
    return {"cursor": {"firstBatch": batch, "id": Int64(cursor_id), "ns": ns}, "ok": 1.0}


def _take(docs: Iterator[dict], count: int, projection: dict | None) -> list:
    batch, size = [], 0
    for doc in docs:
        out = project(doc, projection)
        encoded = bson.encode(out)  # encoded now: the document may change before the reply is sent
        batch.append(RawBSONDocument(encoded))
        size += len(encoded)
        if len(batch) >= count or size >= BATCH_BYTES:
            break
    return batch


def cmd_get_more(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    cursor_id = int(body["getMore"])
    cursor = engine.cursors.get(cursor_id)
    if cursor is None:
        raise CommandError(43, f"cursor id {cursor_id} not found")
    cursor.touched = time.monotonic()
    batch = _take(cursor.docs, int(body.get("batchSize") or 0) or 1 << 30, cursor.projection)
    peek = next(cursor.docs, None)
    if peek is None:
        del engine.cursors[cursor_id]
        cursor_id = 0
    else:
        cursor.docs = itertools.chain([peek], cursor.docs)
    return {"cursor": {"nextBatch": batch, "id": Int64(cursor_id), "ns": cursor.ns}, "ok": 1.0}


def cmd_kill_cursors(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    killed: list[Any] = []
    missing: list[Any] = []
    for cursor_id in body.get("cursors", []):
        (killed if engine.cursors.pop(int(cursor_id), None) else missing).append(cursor_id)
    return {"cursorsKilled": killed, "cursorsNotFound": missing, "cursorsAlive": [],
            "cursorsUnknown": [], "ok": 1.0}


def cmd_count(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    coll = _coll(engine, db, body)
    flt = body.get("query") or {}
    skip, limit = int(body.get("skip") or 0), abs(int(body.get("limit") or 0))
    return {"n": coll.count(flt, skip, limit), "ok": 1.0}


def cmd_distinct(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    coll, key, values = _coll(engine, db, body), body["key"], []
    for doc in coll.find(body.get("query") or {}):
        for value in filtering.iter_key_candidates(key, doc):
            for item in value if isinstance(value, list) else [value]:
                if item is not filtering.NOTHING and item not in values:
                    values.append(item)
    return {"values": values, "ok": 1.0}


_UNSUPPORTED_STAGES = {"$out", "$merge", "$lookup", "$graphLookup", "$unionWith", "$facet"}


def cmd_aggregate(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    pipeline = list(body.get("pipeline") or [])
    for stage in pipeline:
        bad = _UNSUPPORTED_STAGES.intersection(stage)
        if bad:
            raise NotImplementedError(f"aggregation stage {bad.pop()}")
    coll = _coll(engine, db, body)
    match = pipeline.pop(0)["$match"] if pipeline and "$match" in pipeline[0] else {}
    counted = _fast_count(coll, match, pipeline)
    if counted is not None:
        docs: list = counted
    else:
        docs = [copy.deepcopy(d) for d in coll.find(match)]
        docs = list(mm_aggregate.process_pipeline(docs, None, pipeline, None))
    ns = f"{db}.{coll.name}"
    return _first_batch(engine, ns, iter(docs), None, (body.get("cursor") or {}).get("batchSize"), False)


def _fast_count(coll: Collection, match: dict, pipeline: list[dict]) -> list | None:
    """``count_documents``' pipeline ($match, [$skip], [$limit], $group n: $sum 1) via the indexes."""
    skip = limit = 0
    stages = list(pipeline)
    if stages and set(stages[0]) == {"$skip"}:
        skip = int(stages.pop(0)["$skip"])
    if stages and set(stages[0]) == {"$limit"}:
        limit = int(stages.pop(0)["$limit"])
    if len(stages) != 1 or set(stages[0]) != {"$group"}:
        return None
    group = stages[0]["$group"]
    if group.get("_id") not in (1, None) or len(group) != 2:
        return None
    (name, expr), = ((k, v) for k, v in group.items() if k != "_id")
    if expr != {"$sum": 1}:
        return None
    n = coll.count(match, skip, limit)
    return [{"_id": group["_id"], name: n}] if n else []
