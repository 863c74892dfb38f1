"""The schema (qlib_ext/pool/record.py) is the only place a pool field, a pool-metadata field or a qlib-ext
MLflow tag name is written as a string.

An AST scan of qlib_ext/: a string constant equal to a task-document field (``Doc``) or a pool-metadata field
(``PoolMeta``) fails where it is used as a field name: a subscript (``doc["status"]``), a dict key (a document,
a Mongo query, update or projection), the key argument of ``.get``/``.pop``/``.setdefault``, the field of a
``(field, direction)`` index or sort spec, or the first part of a dotted key (``"outcome.run_id"``). Names that
are also ordinary words ("status", "worker", "attempt") are therefore not flagged in prose, messages or log
lines. A string starting with ``qlib_ext.`` that equals a ``Tag`` value fails wherever it is, and so does the
pool-metadata collection's name outside the module that owns it.

The pool metadata is read and written only as a :class:`PoolMeta` (attributes), so its fields that are also
keys of the workflow YAML or of Qlib's config, which the submit copies into it (``provider_uri``, ``region``,
``qlib_init``, ``workers``, ``objective``, ``search``, ``experiment``, ``mlflow_uri``, ``data``), are not scanned:
the YAML loader and Qlib's config legitimately spell them. The embedded store (``store/``) is a MongoDB server:
the keys it spells (``filter``, ``host``, ``status``) are MongoDB's command fields, never a pool's.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from qlib_ext.pool.database import POOLS_COLLECTION
from qlib_ext.pool.record import Doc, PoolMeta, Tag, doc_fields

PACKAGE = Path(__file__).resolve().parent.parent / "qlib_ext"

SCHEMA = PACKAGE / "pool" / "record.py"

_SHARED_WITH_CONFIG = {PoolMeta.Field.PROVIDER_URI, PoolMeta.Field.REGION, PoolMeta.Field.QLIB_INIT,
                       PoolMeta.Field.WORKERS, PoolMeta.Field.OBJECTIVE, PoolMeta.Field.SEARCH,
                       PoolMeta.Field.EXPERIMENT, PoolMeta.Field.MLFLOW_URI, PoolMeta.Field.DATA}

FIELDS = (set(doc_fields()) - {Doc.ID}) | (set(PoolMeta.stored_fields()) - _SHARED_WITH_CONFIG)
"""Names that must come from the schema (``_id`` is MongoDB's own key, in every collection)."""

OWNERS = {POOLS_COLLECTION: "pool/database.py"}
"""Collection names and the one module that may spell them."""

TAGS = {v for k, v in vars(Tag).items() if k.isupper() and v.startswith("qlib_ext.")}

OTHER_CHANGE: set[str] = set()
"""Modules (relative to qlib_ext/) whose literals another change of issue 19 is rewriting."""

ELSEWHERE: dict[tuple[str, str], str] = {
    # (module, name): a key of another record that happens to share a schema field's name
}
"""Literals that are not pool fields: each with the record they belong to."""

NOT_SCANNED = ("store/",)
"""The embedded MongoDB server (see the module docstring)."""

_KEY_METHODS = {"get", "pop", "setdefault"}


def _field_literals(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``(line, string)`` of every string constant in a field-name position."""
    for node in ast.walk(tree):
        keys: list[ast.expr | None] = []
        if isinstance(node, ast.Subscript):
            keys = [node.slice]
        elif isinstance(node, ast.Dict):
            keys = list(node.keys)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _KEY_METHODS:
            keys = node.args[:1]
        elif isinstance(node, ast.Tuple) and len(node.elts) == 2:  # create_index / sort specs: (field, direction)
            keys = node.elts[:1]
        for key in keys:
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                yield key.lineno, key.value


def _tag_literals(tree: ast.AST, module: str) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in TAGS or OWNERS.get(node.value, module) != module:
                yield node.lineno, node.value


def hits(source: str, module: str) -> list[str]:
    """Every schema name written as a literal in ``source`` (of ``module``): ``module:line: 'name'``."""
    tree = ast.parse(source, module)
    found = [(line, text) for line, text in _field_literals(tree)
             if text.split(".", 1)[0] in FIELDS and (module, text.split(".", 1)[0]) not in ELSEWHERE]
    found += list(_tag_literals(tree, module))
    return [f"{module}:{line}: {text!r}" for line, text in sorted(set(found))]


def test_no_schema_name_is_written_outside_the_schema():
    modules = {path.relative_to(PACKAGE).as_posix(): path for path in sorted(PACKAGE.rglob("*.py")) if path != SCHEMA}
    found = [h for module, path in modules.items() if module not in OTHER_CHANGE and not module.startswith(NOT_SCANNED)
             for h in hits(path.read_text(), module)]
    assert not found, "write these names through qlib_ext.pool.record (Doc, PoolMeta.Field, Tag):\n" + "\n".join(found)


def test_the_scan_finds_each_kind_of_literal():
    sample = ('doc["status"]\n{"lease_until": 1}\nd.get("search_until")\n{"outcome.run_id": 1}\n'
              'x = "qlib_ext.pool"\nprint("status of the worker")\nsort = [("priority", -1)]\ndb["_qlib_ext_pools"]\n')
    assert [h.split(": ", 1)[1] for h in hits(sample, "sample.py")] == [
        "'status'", "'lease_until'", "'search_until'", "'outcome.run_id'", "'qlib_ext.pool'", "'priority'",
        "'_qlib_ext_pools'"]
