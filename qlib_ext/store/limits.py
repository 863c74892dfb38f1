"""MongoDB's document limits, checked before a write changes anything.

MongoDB refuses to store a document larger than 16 MiB or nested deeper than 100 levels, and
refuses any command nested deeper than 200 levels. The store checks the same limits, with
MongoDB's own error codes and messages (``src/mongo/db/ops/insert.cpp``,
``src/mongo/db/update/storage_validation.cpp``, ``update_stage.cpp``), *before* a document
reaches memory, an index or the journal. That bound is also what keeps every recursive helper
(the index key functions, mongomock's matcher and update code, the BSON codec) far from Python's
recursion limit, so no stored document can make a later command or a restart fail.

Depth counts levels of fields, as MongoDB does: ``{a: 1}`` is 1 level, ``{a: {b: 1}}`` 2; empty
embedded documents and arrays do not add a level.
"""

from __future__ import annotations

from typing import Any

import bson

MAX_BSON_OBJECT_SIZE = 16 * 1024 * 1024
"""Largest document MongoDB stores (``BSONObjMaxUserSize``), bytes."""

MAX_USER_DEPTH = 100
"""Deepest nesting of a stored document (``BSONDepth::getMaxDepthForUserStorage``), levels."""

MAX_COMMAND_DEPTH = 200
"""Deepest nesting of any command document (MongoDB's ``maxBSONDepth`` default), levels."""

OVERFLOW = 15
BAD_VALUE = 2
BSON_OBJECT_TOO_LARGE = 10334


class LimitError(Exception):
    """A document breaks one of MongoDB's limits; carries MongoDB's code for the reply."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def depth(value: Any, stop: int = MAX_COMMAND_DEPTH + 1) -> int:
    """Levels of fields in ``value`` (0 for a scalar or an empty container), counted up to ``stop``.

    Iterative, so it cannot hit the recursion limit whatever the input. Only non-empty containers
    are visited: a container whose fields are at level L holds its non-empty children at L + 1.
    """
    if not isinstance(value, dict | list) or not value:
        return 0
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > deepest:
            deepest = level
            if deepest >= stop:
                return deepest
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list) and child:
                stack.append((child, level + 1))
    return deepest


def check_command(body: dict[str, Any], sequences: dict[str, list]) -> None:
    """Refuse a command nested deeper than :data:`MAX_COMMAND_DEPTH` (queries included).

    An insert's documents are left to :func:`check_insert` (stricter, and run before each one is
    stored): walking them twice would double the cost of the biggest commands.
    """
    if next(iter(body), "") == "insert":
        body = {k: v for k, v in body.items() if k != "documents"}
        sequences = {k: v for k, v in sequences.items() if k != "documents"}
    if depth(body) > MAX_COMMAND_DEPTH or any(depth(d) > MAX_COMMAND_DEPTH - 2
                                              for docs in sequences.values() for d in docs):
        raise LimitError(OVERFLOW, f"BSONObj exceeds maximum nested object depth: {MAX_COMMAND_DEPTH}")


def check_insert(doc: dict[str, Any], upsert: bool = False) -> bytes:
    """BSON of a document about to be inserted, or LimitError (MongoDB's insert checks)."""
    encoded = bson.encode(doc)
    if len(encoded) > MAX_BSON_OBJECT_SIZE:
        if upsert:
            raise LimitError(17420, f"Document to upsert is larger than {MAX_BSON_OBJECT_SIZE}")
        raise LimitError(BAD_VALUE, f"object to insert too large. size in bytes: {len(encoded)}, "
                                    f"max size: {MAX_BSON_OBJECT_SIZE}")
    if depth(doc, MAX_USER_DEPTH + 1) > MAX_USER_DEPTH:
        raise LimitError(OVERFLOW, f"cannot insert document because it exceeds {MAX_USER_DEPTH} "
                                   "levels of nesting")
    return encoded


def check_updated(doc: dict[str, Any]) -> bytes:
    """BSON of a document after an update, or LimitError (MongoDB's update checks)."""
    encoded = bson.encode(doc)
    if len(encoded) > MAX_BSON_OBJECT_SIZE:
        raise LimitError(BSON_OBJECT_TOO_LARGE,
                         f"Resulting document after update is larger than {MAX_BSON_OBJECT_SIZE}")
    if depth(doc, MAX_USER_DEPTH + 1) > MAX_USER_DEPTH:
        raise LimitError(OVERFLOW, f"Document exceeds maximum nesting depth of {MAX_USER_DEPTH}")
    return encoded
