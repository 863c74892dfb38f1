"""The one rule for pool names: MongoDB's collection-name rules plus qlib-ext's own.

A pool name becomes a MongoDB collection, an ``_id`` in the pools collection, a quoted value in MLflow
filter strings (``tags.pool = '...'``), a directory under ``$QLIB_EXT_HOME/reports`` and a command-line
argument. So it is checked once, by :func:`check_pool_name`, at the edge of everything that takes one
(the workflow's ``grid.pool`` or file stem, every ``qlib-ext`` command and API taking a pool, the pool
manager), before anything is written.

Allowed: 1 to :data:`qlib_ext.defaults.POOL_NAME_MAX_CHARS` ASCII letters, digits, ``_``, ``-`` and
``.``; the first character a letter, digit or ``_`` (so never ``.``, ``..`` or an option such as
``--all``); no ``..`` and no trailing ``.`` (MongoDB refuses empty name parts); not ``system.*``
(MongoDB's) nor ``_qlib_ext*`` (qlib-ext's own collections). No quote, slash, space or control character.
"""

from __future__ import annotations

import re

from qlib_ext import defaults
from qlib_ext.errors import ConfigError

_CHARS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
RESERVED_PREFIXES = ("system.", "_qlib_ext")
"""Collection names a pool may not take: MongoDB's system collections, qlib-ext's own (pool metadata)."""

POOL_NAME_RULE = (f"1-{defaults.POOL_NAME_MAX_CHARS} ASCII letters, digits, '_', '-', '.', starting with a letter, "
                  "digit or '_', without '..' or a trailing '.', not starting with "
                  + " or ".join(repr(p) for p in RESERVED_PREFIXES))
"""The rule in words, for error messages and docs."""


def pool_name_problem(name: object) -> str | None:
    """What is wrong with ``name`` as a pool name, or None when it is valid."""
    if not isinstance(name, str):
        return f"a {type(name).__name__}, not a string"
    if not name:
        return "empty"
    if len(name) > defaults.POOL_NAME_MAX_CHARS:
        return f"{len(name)} characters long"
    if not _CHARS.match(name):
        bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "_.-"))), name[0])
        return f"character {bad!r} not allowed" + (" there" if bad in ".-" else "")
    if ".." in name or name.endswith("."):
        return "an empty part between dots (MongoDB refuses '..' and a trailing '.')"
    reserved = next((p for p in RESERVED_PREFIXES if name.startswith(p)), None)
    if reserved:
        return f"{reserved!r} names are reserved"
    return None


def check_pool_name(name: object, where: str = "") -> str:
    """Return ``name`` when it is a valid pool name.

    Args:
        name: the candidate.
        where: where it came from, for the message (e.g. ``"grid.pool of flow.yaml"``).

    Raises:
        ConfigError: naming the name, what is wrong and the rule.
    """
    problem = pool_name_problem(name)
    if problem is None:
        return name  # type: ignore[return-value]
    origin = f" ({where})" if where else ""
    raise ConfigError(f"invalid pool name {name!r}{origin}: {problem}; expected {POOL_NAME_RULE}")
