"""Unique indexes: one owner id per key, checked before a write lands."""

from __future__ import annotations

from typing import Any

import bson
from mongomock import filtering

from qlib_ext.store.indexes import COMPLEX, scalar_key


def _part(value: Any) -> Any:
    key = scalar_key(value)
    # Arrays and sub-documents compare by their BSON bytes: exact, if stricter than MongoDB's
    # per-element (multikey) uniqueness.
    return ("bson", bson.encode({"v": value})) if key is COMPLEX else key


class UniqueIndex:
    """A unique (optionally sparse or partial) index over one or more fields."""

    def __init__(self, spec: dict[str, Any]):
        self.name = spec["name"]
        self.paths = list(spec["key"])
        self.sparse = bool(spec.get("sparse"))
        self.partial = spec.get("partialFilterExpression")
        self.owner: dict[tuple, Any] = {}
        self.key_of: dict[Any, tuple] = {}

    def key(self, doc: dict[str, Any]) -> tuple | None:
        """Index key of ``doc``, or None when the document is not in the index."""
        values = [filtering.resolve_key(p, doc) for p in self.paths]
        missing = [v is filtering.NOTHING for v in values]
        if self.sparse and all(missing):
            return None
        if self.partial is not None and not filtering.filter_applies(self.partial, doc):
            return None
        return tuple(_part(None if m else v) for v, m in zip(values, missing, strict=True))

    def check(self, seq: Any, doc: dict[str, Any]) -> None:
        """Raise WriteFailure if another document already holds ``doc``'s key."""
        from qlib_ext.store.collection import WriteFailure

        key = self.key(doc)
        if key is not None and self.owner.get(key, seq) != seq:
            pattern = {p: 1 for p in self.paths}
            value = {p: filtering.resolve_key(p, doc) for p in self.paths}
            value = {p: (None if v is filtering.NOTHING else v) for p, v in value.items()}
            raise WriteFailure(11000, f"E11000 duplicate key error index: {self.name} dup key: {value}",
                               keyPattern=pattern, keyValue=value)

    def add(self, seq: Any, doc: dict[str, Any]) -> None:
        """Record ``doc`` as the owner of its key."""
        key = self.key(doc)
        if key is not None:
            self.owner[key] = seq
            self.key_of[seq] = key

    def remove(self, seq: Any) -> None:
        """Forget ``seq``'s key."""
        key = self.key_of.pop(seq, None)
        if key is not None and self.owner.get(key) == seq:
            del self.owner[key]
