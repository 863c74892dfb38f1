"""One collection: documents in insertion order, their indexes, and the CRUD primitives.

Query matching, update operators, projections and sort order are mongomock's; this module decides
*which* documents mongomock looks at (through :mod:`qlib_ext.store.planner`) and keeps the indexes
and the change log right. Not thread-safe: the engine calls it under its single lock.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import bson
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument
from mongomock import filtering
from mongomock.collection import Collection as MockCollection
from mongomock.mongo_client import MongoClient as MockClient

from qlib_ext.store.indexes import FieldIndex, PairIndex
from qlib_ext.store.limits import check_insert, check_updated
from qlib_ext.store.planner import exact_count, plain, plan
from qlib_ext.store.uniques import UniqueIndex
from qlib_ext.store.wire import CODEC

logger = logging.getLogger(__name__)

DEFAULT_FIELDS = ("status", "priority", "filter")
"""Fields indexed in every collection: Qlib's claim filters on status and sorts on priority;
``create_task`` looks every task up by its whole ``filter`` document before inserting it."""

DEFAULT_PAIRS = (("status", "priority"),)
"""Compound (equality, order) indexes in every collection: exactly Qlib's claim."""

_MISSING = object()

# mongomock's update, projection and upsert helpers are Collection methods that touch no state.
# (Imported from mongomock's modules: its package stub types these names as pymongo's classes.)
_HELPER: MockCollection = MockClient().get_database("_helper").get_collection("_helper")


class WriteFailure(Exception):
    """A write broke a rule (duplicate key, immutable ``_id``); becomes a writeError reply."""

    def __init__(self, code: int, message: str, **details: Any):
        super().__init__(message)
        self.code = code
        self.details = details


def hid(value: Any) -> Any:
    """Hashable storage id of an ``_id`` value (embedded documents by their BSON bytes)."""
    if isinstance(value, dict):
        return ("__doc__", bson.encode(value))
    return value


class Collection:
    """Documents of one collection plus indexes. The engine lock guards every method.

    Documents are keyed internally by an insertion sequence number (a small int: fast to hash,
    and ascending order is MongoDB's natural order); ``ids`` maps each ``_id`` to it.
    """

    def __init__(self, name: str, db: str = "", log: Callable[[dict[str, Any]], None] | None = None):
        self.name = name
        self.db = db
        self._log = log or (lambda op: None)
        self.docs: dict[int, dict[str, Any]] = {}  # seq -> document, in insertion order
        self.ids: dict[Any, int] = {}  # hid(_id) -> seq
        self.next_seq = 0
        self.fields: dict[str, FieldIndex] = {f: FieldIndex(f) for f in DEFAULT_FIELDS}
        self.specs: dict[str, dict[str, Any]] = {}  # user index name -> createIndexes spec
        self.uniques: dict[str, UniqueIndex] = {}
        self.pairs: dict[tuple[str, str], PairIndex] = {p: PairIndex(*p) for p in DEFAULT_PAIRS}

    def _all_indexes(self) -> list:
        return [*self.fields.values(), *self.pairs.values()]

    # ------------------------------------------------------------------ indexes
    def create_index(self, spec: dict[str, Any]) -> None:
        """Add a user index (validated by the caller); raises WriteFailure on duplicate data.

        All or nothing: on any error the collection's indexes are as they were.
        """
        saved = (dict(self.fields), dict(self.pairs), dict(self.uniques))
        try:
            if spec.get("unique") and list(spec["key"]) != ["_id"]:
                unique = UniqueIndex(spec)
                for seq, doc in self.docs.items():
                    unique.check(seq, doc)
                    unique.add(seq, doc)
                self.uniques[spec["name"]] = unique
            for path in spec["key"]:
                if path != "_id" and path not in self.fields:
                    index = FieldIndex(path)
                    self._build(index)
                    self.fields[path] = index
            pair = tuple(spec["key"])[:2]
            if len(pair) == 2 and pair not in self.pairs:
                pair_index = PairIndex(*pair)
                self._build(pair_index)
                self.pairs[pair] = pair_index
        except BaseException:
            self.fields, self.pairs, self.uniques = saved
            raise
        self.specs[spec["name"]] = spec
        self._log({"o": "idx", "db": self.db, "c": self.name, "spec": spec})

    def _build(self, index: FieldIndex | PairIndex) -> None:
        for seq, doc in self.docs.items():
            index.add(seq, doc)

    def drop_index(self, name: str) -> None:
        """Remove a user index by name (the planner indexes of its fields are dropped too)."""
        spec = self.specs.pop(name)
        self._log({"o": "dropidx", "db": self.db, "c": self.name, "name": name})
        self.uniques.pop(name, None)
        still_used = set(DEFAULT_FIELDS) | {p for s in self.specs.values() for p in s["key"]}
        for path in spec["key"]:
            if path not in still_used:
                self.fields.pop(path, None)
        used_pairs = set(DEFAULT_PAIRS) | {tuple(s["key"])[:2] for s in self.specs.values()}
        for pair in [p for p in self.pairs if p not in used_pairs]:
            del self.pairs[pair]

    # ------------------------------------------------------------------ storage
    def _store(self, doc: dict[str, Any], encoded: bytes | None = None) -> None:
        """Add ``doc`` to the documents and every index, all or nothing, then journal it."""
        seq = self.next_seq
        for unique in self.uniques.values():
            unique.check(seq, doc)
        if encoded is None:
            encoded = bson.encode(doc)
        self.next_seq += 1
        try:
            self.docs[seq] = doc
            self.ids[hid(doc["_id"])] = seq
            for index in self._all_indexes():
                index.add(seq, doc)
            for unique in self.uniques.values():
                unique.add(seq, doc)
        except BaseException:
            self._unlink(seq, doc)
            raise
        self._put(encoded)

    def _unlink(self, seq: int, doc: dict[str, Any]) -> None:
        """Remove ``seq`` from the documents and every index (each removal is a no-op if absent)."""
        if self.ids.get(hid(doc["_id"])) == seq:
            del self.ids[hid(doc["_id"])]
        for index in self._all_indexes():
            index.remove(seq)
        for unique in self.uniques.values():
            unique.remove(seq)
        self.docs.pop(seq, None)

    def _put(self, encoded: bytes) -> None:
        self._log({"o": "put", "db": self.db, "c": self.name, "d": RawBSONDocument(encoded)})

    def insert(self, doc: dict[str, Any], upsert: bool = False) -> None:
        """Insert one document (``_id`` added when missing); nothing changes if it is refused."""
        if "_id" not in doc:
            doc = {"_id": ObjectId(), **doc}
        encoded = check_insert(doc, upsert)  # size, depth, keys and types, like a real server
        if hid(doc["_id"]) in self.ids:
            raise WriteFailure(11000, _dup_message(self.name, "_id_", {"_id": doc["_id"]}),
                               keyPattern={"_id": 1}, keyValue={"_id": doc["_id"]})
        self._store(doc, encoded)

    def delete(self, doc: dict[str, Any]) -> None:
        """Remove one stored document."""
        self._unlink(self.ids[hid(doc["_id"])], doc)
        self._log({"o": "del", "db": self.db, "c": self.name, "id": doc["_id"]})

    def get(self, value: Any) -> dict[str, Any] | None:
        """The document whose ``_id`` is ``value``, or None."""
        seq = self.ids.get(hid(value))
        return None if seq is None else self.docs[seq]

    def delete_id(self, value: Any) -> None:
        """Remove the document with ``_id`` ``value`` if present (journal replay)."""
        doc = self.get(value)
        if doc is not None:
            self.delete(doc)

    def put_replayed(self, doc: dict[str, Any]) -> None:
        """Journal replay: insert, or overwrite in place (keeping its natural-order position)."""
        old = self.get(doc["_id"])
        if old is None:
            self._store(doc)
            return
        previous = dict(old)
        old.clear()
        old.update(doc)
        try:
            self._reindex(self.ids[hid(doc["_id"])], old, previous)
        except BaseException:
            old.clear()
            old.update(previous)
            raise

    # ------------------------------------------------------------------ queries
    def find(self, flt: dict[str, Any], sort: list[tuple[str, int]] | None = None) -> Iterator[dict]:
        """Matching documents (live objects: callers must not mutate them), lazily."""
        candidates = plan(flt, self.ids, self.fields, hid)
        if sort:
            return self._sorted(flt, sort, candidates)
        return self._natural(flt, candidates)

    def count(self, flt: dict[str, Any], skip: int = 0, limit: int = 0) -> int:
        """Number of matches after ``skip``, at most ``limit`` (0: no limit)."""
        n = exact_count(flt, self.docs, self.fields)
        if n is None:
            found = itertools.islice(self.find(flt), skip + limit if limit else None)
            n = sum(1 for _ in found)
        n = max(0, n - skip)
        return min(n, limit) if limit else n

    def _natural(self, flt: dict[str, Any], candidates: set | None) -> Iterator[dict]:
        if candidates is None:
            order = list(self.docs)
            if not order:
                filtering.filter_applies(flt, {})  # still reject a bad filter
        else:
            order = sorted(candidates)
        for seq in order:
            doc = self.docs.get(seq)
            if doc is not None and filtering.filter_applies(flt, doc):
                yield doc

    def _sorted(self, flt: dict[str, Any], sort: list[tuple[str, int]], candidates: set | None
                ) -> Iterator[dict]:
        (path, direction), = sort if len(sort) == 1 else (("", 0),)
        chunks = self._pair_walk(flt, path, direction < 0)
        if chunks is not None:
            return self._matching(flt, itertools.chain.from_iterable(chunks))
        index = self.fields.get(path)
        if index is not None and index.sortable():
            return self._walk(flt, index, direction < 0, candidates)
        docs = list(self._natural(flt, candidates))
        for key, direction in reversed(sort):  # stable sorts, last key first: mongomock's way
            if key.startswith("$"):
                raise NotImplementedError(f"sorting by {key} is not supported")
            docs.sort(key=functools.partial(filtering.resolve_sort_key, key), reverse=direction < 0)
        return iter(docs)

    def _pair_walk(self, flt: dict[str, Any], order_path: str, descending: bool):
        """Chunks from a compound index whose equality field the filter pins, or None."""
        for (eq_path, pair_order), pair in self.pairs.items():
            cond = flt.get(eq_path, _MISSING)
            if isinstance(cond, dict) and set(cond) == {"$eq"}:
                cond = cond["$eq"]
            if pair_order == order_path and cond is not _MISSING and plain(cond):
                chunks = pair.walk(cond, descending)
                if chunks is not None:
                    return chunks
        return None

    def _matching(self, flt: dict[str, Any], seqs: Iterable[int]) -> Iterator[dict]:
        for seq in seqs:
            doc = self.docs.get(seq)
            if doc is not None and filtering.filter_applies(flt, doc):
                yield doc

    def _walk(self, flt: dict, index: FieldIndex, descending: bool, candidates: set | None
              ) -> Iterator[dict]:
        """Follow the sorted index; if it keeps passing non-candidates, sort the candidates instead.

        The budget bounds a claim late in a drain, when most of the index is already-claimed tasks.
        """
        budget = -1 if candidates is None else len(candidates) // 4 + 64
        visited: set[int] = set()
        for seq in itertools.chain.from_iterable(index.walk(descending)):  # lazy, under the engine lock
            if candidates is not None:
                if seq not in candidates:
                    budget -= 1
                    if budget == 0:
                        break
                    continue
                visited.add(seq)
            doc = self.docs.get(seq)
            if doc is not None and filtering.filter_applies(flt, doc):
                yield doc
        else:
            return
        rest = sorted(candidates - visited)
        rest.sort(key=index.sort_key, reverse=descending)  # stable: ties stay in seq order
        for seq in rest:
            doc = self.docs.get(seq)
            if doc is not None and filtering.filter_applies(flt, doc):
                yield doc

    # ------------------------------------------------------------------ updates
    def update_doc(self, doc: dict[str, Any], spec: dict, update: dict | list, upserting: bool = False
                   ) -> bool:
        """Apply ``update`` to stored ``doc`` in place; return whether it changed.

        All or nothing: on any error (a limit, a duplicate key, an update mongomock refuses) the
        document and every index are as they were and nothing reaches the journal.
        """
        before = bson.encode(doc)
        doc_id = hid(doc["_id"])
        seq = self.ids[doc_id]
        try:
            apply_update(doc, spec, update, upserting)
            if hid(doc.get("_id")) != doc_id:
                raise WriteFailure(66, "Performing an update on the path '_id' would modify the "
                                   "immutable field '_id'")
            after = check_updated(doc)
            if after != before:
                for unique in self.uniques.values():
                    unique.check(seq, doc)
                self._reindex(seq, doc, before)
        except BaseException:
            doc.clear()
            doc.update(bson.decode(before, CODEC))
            raise
        if after == before:
            return False
        self._put(after)
        return True

    def _reindex(self, seq: int, doc: dict[str, Any], previous: dict[str, Any] | bytes) -> None:
        """Re-index ``seq`` as ``doc``; on failure every index holds ``previous`` (or its BSON) again."""
        try:
            for index in self._all_indexes():
                index.update(seq, doc)
            for unique in self.uniques.values():
                unique.remove(seq)
                unique.add(seq, doc)
        except BaseException:
            if isinstance(previous, bytes):
                previous = bson.decode(previous, CODEC)
            for index in [*self._all_indexes(), *self.uniques.values()]:
                index.remove(seq)
                index.add(seq, previous)
            raise

    def upsert_doc(self, spec: dict, update: dict | list) -> dict[str, Any]:
        """Build and insert the document an upsert creates (mongomock's recipe)."""
        if spec.get("_id") is not None and not isinstance(spec["_id"], dict):
            _id = spec["_id"]
        elif isinstance(update, dict) and update.get("_id") is not None:
            _id = update["_id"]
        else:
            _id = ObjectId()
        doc, _ = _HELPER._discard_operators(_HELPER._expand_dots(dict(spec, _id=_id)))
        doc = dict(doc)
        apply_update(doc, spec, update, True)
        self.insert(doc, upsert=True)
        return doc


def apply_update(doc: dict[str, Any], spec: dict, update: dict | list, was_insert: bool) -> None:
    """Apply an update document, a replacement or a pipeline to ``doc`` in place (mongomock)."""
    if isinstance(update, list):
        _HELPER._apply_update_pipeline(doc, update, None)
    elif update and not any(k.startswith("$") for k in update):
        _HELPER._apply_update_document(doc, {"_id": doc.get("_id")}, update, was_insert)
    else:
        _HELPER._apply_update_document(doc, spec, update, was_insert)


def project(doc: dict[str, Any], projection: dict[str, Any] | None) -> dict[str, Any]:
    """The document as the client should see it (no copy when there is no projection)."""
    if not projection:
        return doc
    return _HELPER._copy_only_fields(doc, copy.deepcopy(projection), dict)


def _dup_message(coll: str, index: str, key: dict[str, Any]) -> str:
    return f"E11000 duplicate key error collection: {coll} index: {index} dup key: {key}"
