"""Identities of plain data: the one canonical JSON form and its digest.

A task's hash (dedup in the pool), a grid's hash and a configuration's id (the ``qlib_ext`` block), the
train-once grouping key and every cache key are digests of :func:`canonical_json`: key order never
matters, and dates from YAML, Timestamps and Paths all become strings. Changing this form changes every
stored hash, so pools and caches written before would no longer deduplicate or hit.

Standard library only (base layer): the workflow, the pool and the cache all use it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """``obj`` as compact JSON with sorted keys; anything JSON lacks (dates, Paths) as its ``str``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any, algorithm: str = "sha1", length: int | None = None) -> str:
    """Hex digest (``hashlib`` ``algorithm``) of :func:`canonical_json` ``obj``, cut to ``length`` characters."""
    return hashlib.new(algorithm, canonical_json(obj).encode()).hexdigest()[:length]
