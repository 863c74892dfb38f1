"""Index structures that keep queries on a large collection from scanning every document.

A :class:`FieldIndex` maps one (possibly dotted) field to the ids of the documents holding each
value, both hashed (equality, ``$in``) and sorted (ranges, sorted claims). Only plain scalars are
indexed exactly; documents whose value is an array, an embedded document or an exotic type go to a
``complex`` set that every lookup returns as well. Lookups therefore yield a *superset* of the
matches, and mongomock's matcher has the last word on every candidate: the indexes can make a query
fast, never wrong.

Keys are ``(rank, value)`` tuples whose rank follows MongoDB's BSON comparison order, so ordinary
tuple comparison sorts them the way MongoDB does, and ``1 == 1.0`` holds as in MongoDB.
"""

from __future__ import annotations

import bisect
import datetime
import enum
import math
from collections.abc import Iterator
from typing import Any, Final, Literal, TypeAlias

from bson.int64 import Int64
from bson.objectid import ObjectId


class _Complex(enum.Enum):
    """Type of :data:`COMPLEX`: a one-member enum, so ``key is COMPLEX`` narrows a :data:`Key`."""

    COMPLEX = "complex"


COMPLEX: Final = _Complex.COMPLEX
"""Marker key: the value cannot be placed in the index (array, sub-document, NaN, binary...)."""

Key: TypeAlias = tuple[Any, ...]
"""An index key: ``(rank, value)``, sorted entries append the sequence number."""

KeyOrComplex: TypeAlias = Key | Literal[_Complex.COMPLEX]
"""What the key functions return: a key, or :data:`COMPLEX`."""

_INF = float("inf")
RANK_NULL, RANK_NUMBER, RANK_STRING, RANK_OBJECT, RANK_ARRAY, RANK_BINARY = 1, 2, 3, 4, 5, 6
RANK_OBJECTID, RANK_BOOL, RANK_DATE = 7, 8, 9

MAX_KEY_DEPTH = 100
"""Embedded documents/arrays deeper than this (MongoDB's storage limit) are not hashed: COMPLEX."""


def scalar_key(value: Any) -> KeyOrComplex:
    """Index key of one value, or :data:`COMPLEX`."""
    if value is None:
        return (RANK_NULL, None)
    if isinstance(value, bool):
        return (RANK_BOOL, value)
    if isinstance(value, int | Int64):
        return (RANK_NUMBER, int(value))
    if isinstance(value, float):
        return COMPLEX if math.isnan(value) else (RANK_NUMBER, value)
    if isinstance(value, str):
        return (RANK_STRING, value)
    if isinstance(value, ObjectId):
        return (RANK_OBJECTID, value)
    if isinstance(value, datetime.datetime):
        # Stored datetimes are naive UTC; an aware one would not compare with them.
        return COMPLEX if value.tzinfo is not None else (RANK_DATE, value)
    return COMPLEX


def value_key(value: Any, _depth: int = 0) -> KeyOrComplex:
    """Hashable equality key of any value, embedded documents and arrays included, or COMPLEX.

    Documents compare regardless of field order (mongomock's dict ``==``), so the key is a superset
    for MongoDB's order-sensitive comparison too. Only for hash lookups: these keys do not sort the
    way MongoDB sorts documents. Values nested deeper than :data:`MAX_KEY_DEPTH` are COMPLEX, so
    the recursion is bounded whatever a (pre-limits) journal holds.
    """
    if isinstance(value, dict | list) and _depth >= MAX_KEY_DEPTH:
        return COMPLEX
    if isinstance(value, dict):
        items = [(k, value_key(v, _depth + 1)) for k, v in value.items()]
        if any(v is COMPLEX for _, v in items):
            return COMPLEX
        return (RANK_OBJECT, tuple(sorted(items, key=lambda item: item[0])))
    if isinstance(value, list):
        parts = [value_key(v, _depth + 1) for v in value]
        return COMPLEX if any(p is COMPLEX for p in parts) else (RANK_ARRAY, tuple(parts))
    if isinstance(value, bytes):
        return (RANK_BINARY, getattr(value, "subtype", 0), bytes(value))
    return scalar_key(value)


def doc_key(doc: dict[str, Any], path: str) -> KeyOrComplex:
    """Index key of ``doc`` at dotted ``path``; missing sorts and matches like null."""
    value: Any = doc
    for part in path.split("."):
        if isinstance(value, dict):
            if part not in value:
                return (RANK_NULL, None)
            value = value[part]
        elif isinstance(value, list):
            return COMPLEX  # a path through an array fans out: let the matcher decide
        else:
            return (RANK_NULL, None)
    if isinstance(value, dict):
        return value_key(value)  # an embedded document: equality lookups only
    return scalar_key(value)


class FieldIndex:
    """Hash and sorted index of one field. Not thread-safe: the engine lock guards it."""

    def __init__(self, path: str):
        self.path = path
        self.buckets: dict[Key, set[int]] = {}
        self.sorted: list[Key] = []  # (rank, value, seq), ascending
        self.complex: set[int] = set()
        self.objects: set[int] = set()  # embedded-document values: hashed, never in ``sorted``
        self.keys: dict[int, KeyOrComplex] = {}  # seq -> key last indexed

    def add(self, seq: int, doc: dict[str, Any]) -> None:
        """Index ``doc``, known by its insertion sequence number (the collection's internal id)."""
        key = doc_key(doc, self.path)
        self.keys[seq] = key
        if key is COMPLEX:
            self.complex.add(seq)
            return
        self.buckets.setdefault(key, set()).add(seq)
        if key[0] == RANK_OBJECT:
            self.objects.add(seq)
        else:
            bisect.insort(self.sorted, (*key, seq))

    def remove(self, seq: int) -> None:
        """Forget ``seq``; a no-op when it was never indexed."""
        key = self.keys.pop(seq, None)
        if key is None:
            return
        if key is COMPLEX:
            self.complex.discard(seq)
            return
        bucket = self.buckets[key]
        bucket.discard(seq)
        if not bucket:
            del self.buckets[key]
        if key[0] == RANK_OBJECT:
            self.objects.discard(seq)
            return
        i = bisect.bisect_left(self.sorted, (*key, seq))
        if i < len(self.sorted) and self.sorted[i][2] == seq:
            del self.sorted[i]

    def update(self, seq: int, doc: dict[str, Any]) -> None:
        """Re-index a document changed in place (cheap when the key did not change)."""
        if seq in self.keys and self.keys[seq] == doc_key(doc, self.path):
            return
        self.remove(seq)
        self.add(seq, doc)

    def equal(self, keys: list[Key]) -> set[int]:
        """Sequence numbers that may equal any of ``keys``. Read-only: may be the live bucket, not a copy."""
        if len(keys) == 1 and not self.complex:
            return self.buckets.get(keys[0], set())
        out = set(self.complex)
        for key in keys:
            out |= self.buckets.get(key, set())
        return out

    def between(self, rank: int, low: tuple[Any, bool] | None, high: tuple[Any, bool] | None) -> set[int]:
        """Sequence numbers that may lie in a range of one rank; ``low``/``high`` are ``(value, inclusive)``."""
        lst = self.sorted
        if low is None:
            start = bisect.bisect_left(lst, (rank,))
        else:
            start = bisect.bisect_left(lst, (rank, low[0]) if low[1] else (rank, low[0], _INF))
        if high is None:
            stop = bisect.bisect_left(lst, (rank + 1,))
        else:
            stop = bisect.bisect_left(lst, (rank, high[0], _INF) if high[1] else (rank, high[0]))
        return {entry[2] for entry in lst[start:stop]} | self.complex | self.objects

    def walk(self, descending: bool) -> Iterator[list[int]]:
        """Sequence numbers in sort order, in chunks; see :func:`walk_sorted`."""
        return walk_sorted(self.sorted, descending)

    def sort_key(self, seq: int) -> Key:
        """Key that sorts ``seq`` among the others; only while :meth:`sortable` holds.

        Raises:
            KeyError: ``seq`` was never indexed.
            TypeError: its value has no place in the sort order (:data:`COMPLEX`).
        """
        key = self.keys[seq]
        if key is COMPLEX:
            raise TypeError(f"index {self.path!r}: document {seq} has no sortable key")
        return key

    def sortable(self) -> bool:
        """Whether :meth:`walk` visits every document (no arrays, exotic values or documents)."""
        return not self.complex and not self.objects

    def __len__(self) -> int:
        return len(self.keys)


def walk_sorted(lst: list[Key], descending: bool, chunk: int = 128) -> Iterator[list[int]]:
    """Sequence numbers (last item of each ``(rank, value, seq)`` entry) in sort order, in chunks.

    Chunks make stopping early cheap. Ties keep insertion order in both directions, as mongomock's
    stable sort does.
    """
    if not descending:
        for i in range(0, len(lst), chunk):
            yield [entry[-1] for entry in lst[i:i + chunk]]
        return
    end = len(lst)
    while end > 0:
        last = lst[end - 1]
        start = bisect.bisect_left(lst, (last[0], last[1]), 0, end)
        for i in range(start, end, chunk):
            yield [entry[-1] for entry in lst[i:min(i + chunk, end)]]
        end = start


class PairIndex:
    """Equality on one field, order on another: a compound index ``{eq: 1, order: 1}``.

    It serves Qlib's claim (``{status: X}`` sorted by ``priority``) by walking just the documents
    with that status in priority order, so the first candidate is usually the answer, however many
    tasks the pool holds. Documents whose either value is not a plain scalar go to ``complex``;
    while any exist, the collection does not use this index.
    """

    def __init__(self, eq_path: str, order_path: str):
        self.eq_path, self.order_path = eq_path, order_path
        self.lists: dict[Key, list[Key]] = {}  # eq key -> sorted (rank, value, seq)
        self.keys: dict[int, tuple[Key, Key] | None] = {}  # seq -> (eq key, order key); None when complex
        self.complex: set[int] = set()

    def _key(self, doc: dict[str, Any]) -> tuple[Key, Key] | None:
        eq, order = doc_key(doc, self.eq_path), doc_key(doc, self.order_path)
        if eq is COMPLEX or order is COMPLEX or order[0] == RANK_OBJECT:
            return None
        return (eq, order)

    def add(self, seq: int, doc: dict[str, Any]) -> None:
        """Index ``doc`` under its sequence number."""
        key = self.keys[seq] = self._key(doc)
        if key is None:
            self.complex.add(seq)
        else:
            bisect.insort(self.lists.setdefault(key[0], []), (*key[1], seq))

    def remove(self, seq: int) -> None:
        """Forget ``seq`` (a no-op when unknown)."""
        if seq not in self.keys:
            return
        key = self.keys.pop(seq)
        if key is None:
            self.complex.discard(seq)
            return
        lst = self.lists[key[0]]
        i = bisect.bisect_left(lst, (*key[1], seq))
        if i < len(lst) and lst[i][-1] == seq:
            del lst[i]
        if not lst:
            del self.lists[key[0]]

    def update(self, seq: int, doc: dict[str, Any]) -> None:
        """Re-index a document changed in place."""
        if seq in self.keys and self.keys[seq] == self._key(doc):
            return
        self.remove(seq)
        self.add(seq, doc)

    def walk(self, eq_value: Any, descending: bool) -> Iterator[list[int]] | None:
        """Documents with ``eq_path == eq_value`` in order, or None if the index cannot tell."""
        key = value_key(eq_value) if isinstance(eq_value, dict) else scalar_key(eq_value)
        if key is COMPLEX or self.complex:
            return None
        return walk_sorted(self.lists.get(key, []), descending)
