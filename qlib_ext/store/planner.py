"""Turn a MongoDB filter into the candidate ids an index can vouch for.

Every function returns either ``None`` ("no index helps, scan everything") or a set of storage ids
that contains every document the filter can match. Filters are conjunctions, so any one indexed
clause gives a valid superset and several are intersected. The matcher then checks each candidate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from bson.regex import Regex

from qlib_ext.store.indexes import COMPLEX, RANK_NULL, FieldIndex, Key, scalar_key, value_key

_RANGE_OPS = {"$gt", "$gte", "$lt", "$lte"}


def plan(flt: dict[str, Any], ids: dict, fields: dict[str, FieldIndex], hid) -> set | None:
    """Candidate ids for ``flt``.

    Args:
        flt: the query filter.
        ids: ``hid(_id)`` -> sequence number, to resolve ``_id`` lookups directly.
        fields: the collection's field indexes by dotted path.
        hid: function mapping an ``_id`` value to its storage id.

    Returns:
        A superset of the matching sequence numbers, or ``None`` when no index applies.
    """
    result: set | None = None
    for key, cond in flt.items():
        if key == "$and" and isinstance(cond, list):
            subs = [plan(sub, ids, fields, hid) for sub in cond if isinstance(sub, dict)]
            found = [s for s in subs if s is not None]
            part = set.intersection(*found) if found else None
        elif key == "_id":
            part = _id_candidates(cond, ids, hid)
        elif key in fields:
            part = field_candidates(fields[key], cond)
        else:
            part = None
        if part is not None:
            result = part if result is None else result & part
            if not result:
                return result
    return result


def plain(value: Any) -> bool:
    """Whether ``value`` is a literal the indexes can look up (not a document, array or regex)."""
    return not isinstance(value, dict | list | re.Pattern | Regex)


def _id_candidates(cond: Any, ids: dict, hid) -> set | None:
    if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
        if "$eq" in cond and plain(cond["$eq"]):
            values = [cond["$eq"]]
        elif "$in" in cond and isinstance(cond["$in"], list) and all(map(plain, cond["$in"])):
            values = cond["$in"]
        else:
            return None
    elif plain(cond):
        values = [cond]
    else:
        return None
    return {ids[h] for h in map(hid, values) if h in ids}


def field_candidates(index: FieldIndex, cond: Any) -> set | None:
    """Candidate ids for one field condition (a value or an operator document)."""
    if not isinstance(cond, dict):
        if not plain(cond):
            return None
        key = scalar_key(cond)
        return None if key is COMPLEX else index.equal([key])
    if cond and not any(k.startswith("$") for k in cond):
        key = value_key(cond)  # embedded-document equality, e.g. Qlib's {"filter": task}
        return None if key is COMPLEX else index.equal([key])
    if not cond or not all(k.startswith("$") for k in cond):
        return None
    result: set | None = None
    for part in (_eq_part(index, cond), _in_part(index, cond), _range_part(index, cond)):
        if part is not None:
            result = part if result is None else result & part
    return result


def _eq_part(index: FieldIndex, cond: dict) -> set | None:
    if "$eq" not in cond or not plain(cond["$eq"]):
        return None
    key = scalar_key(cond["$eq"])
    return None if key is COMPLEX else index.equal([key])


def _in_part(index: FieldIndex, cond: dict) -> set | None:
    values = cond.get("$in")
    if not isinstance(values, list) or not all(map(plain, values)):
        return None
    keys = _scalar_keys(values)
    return None if keys is None else index.equal(keys)


def _range_part(index: FieldIndex, cond: dict) -> set | None:
    ops = [op for op in cond if op in _RANGE_OPS]
    keys = _scalar_keys(cond[op] for op in ops)
    if not ops or keys is None:
        return None
    bounds = dict(zip(ops, keys, strict=True))
    ranks = {key[0] for key in bounds.values()}
    if len(ranks) != 1 or RANK_NULL in ranks:
        return None  # mixed or null bounds: MongoDB's bracketing rules get subtle, scan instead
    low = high = None
    for op, key in bounds.items():
        if op in ("$gt", "$gte"):
            low = (key[1], op == "$gte")
        else:
            high = (key[1], op == "$lte")
    return index.between(ranks.pop(), low, high)


def _scalar_keys(values: Iterable[Any]) -> list[Key] | None:
    """Index keys of scalar ``values``, or None when any of them cannot be indexed."""
    keys: list[Key] = []
    for value in values:
        key = scalar_key(value)
        if key is COMPLEX:
            return None
        keys.append(key)
    return keys


def exact_count(flt: dict[str, Any], ids: dict, fields: dict[str, FieldIndex]) -> int | None:
    """Match count straight from an index when it is exact (one equality on a scalar), else None.

    A hash bucket holds exactly the documents whose (non-array) value equals the key under MongoDB's
    rules (``1 == 1.0``; null matches missing), so with no ``complex`` documents it is the answer.
    """
    if not flt:
        return len(ids)
    if len(flt) != 1:
        return None
    (path, cond), = flt.items()
    if isinstance(cond, dict) and set(cond) == {"$eq"}:
        cond = cond["$eq"]
    index = fields.get(path)
    if index is None or index.complex or not plain(cond):
        return None
    key = scalar_key(cond)
    return None if key is COMPLEX else len(index.buckets.get(key, ()))
