"""The task database: connecting to it (:func:`open_db`, the one way every command, worker and report
opens it) and each pool's metadata, one document per pool in ``_qlib_ext_pools`` (``_id`` = pool name,
a :class:`PoolMeta`). The task documents themselves are :class:`qlib_ext.pool.manager.GridTaskManager`'s.

The submit writes a pool's metadata whole (how to run the pool: workflow, data, qlib_init, MLflow URI,
experiment, ``workers:``), a search proposer and the pool's migration a few fields at a time; workers,
reports and the reaper read it. Each write is one ``update_one`` with ``$set``: fields not written are kept.
"""

from __future__ import annotations

from typing import Any

import pymongo
from pymongo.database import Database
from pymongo.errors import PyMongoError

from qlib_ext import defaults
from qlib_ext.errors import StoreError
from qlib_ext.names import check_pool_name
from qlib_ext.pool.record import Doc, PoolMeta

POOLS_COLLECTION = "_qlib_ext_pools"
"""Collection holding one metadata document per pool (qlib_init, experiment, MLflow URI)."""


def open_db(mongo_url: str | None, db_name: str | None = None, *, worker: bool = False) -> Database:
    """Connect to the task database: the one way every command, worker and report opens it.

    Args:
        mongo_url: a MongoDB URL; ``None``/``"embedded"`` means the embedded store (started if needed).
        db_name: the database holding the pools (None: :func:`qlib_ext.defaults.task_db_name`, which
            ``--task-db`` sets).
        worker: a worker's client: no ping here, and an unreachable store fails each operation after
            ``STORE_TIMEOUT_SECONDS`` (pymongo's default is 30 s) so the worker retries with its own
            back-off; otherwise the store must answer a ping within ``STORE_PING_SECONDS``.

    Raises:
        StoreError: (not ``worker``) the store did not answer.
    """
    from qlib_ext.store import mask_url, resolve_mongo_url

    url = resolve_mongo_url(mongo_url)
    db_name = db_name or defaults.task_db_name()
    if worker:
        timeout_ms = int(defaults.STORE_TIMEOUT_SECONDS * 1000)
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            url, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms,
            socketTimeoutMS=max(timeout_ms, int(defaults.STORE_SOCKET_TIMEOUT_SECONDS * 1000)), tz_aware=False)
        return client[db_name]
    try:
        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=int(defaults.STORE_PING_SECONDS * 1000),
                                     tz_aware=False)
        client.admin.command("ping")
    except PyMongoError as e:
        raise StoreError(f"cannot reach the task store at {mask_url(url)}: {e}") from e
    return client[db_name]


def save_pool_meta(db: Database, pool: str, meta: PoolMeta) -> None:
    """Record how to run a pool (qlib_init, experiment, MLflow URI...) so workers need only its name.

    Writes the keys ``meta.to_dict()`` holds (for a new record: the submit's fields); other keys the
    document has (a search's hold, ``doc_format``) are kept.
    """
    check_pool_name(pool)
    db[POOLS_COLLECTION].update_one({Doc.ID: pool}, {"$set": meta.to_dict()}, upsert=True)


def update_pool_meta(db: Database, pool: str, **values: Any) -> None:
    """Set some fields of a pool's metadata (:class:`PoolMeta` field names), creating the document if needed.

    Raises:
        ValueError: a name is not a stored field of :class:`PoolMeta`.
    """
    unknown = sorted(set(values) - set(PoolMeta.stored_fields()))
    if unknown:
        raise ValueError(f"unknown pool metadata fields {unknown}; expected one of {PoolMeta.stored_fields()}")
    check_pool_name(pool)
    db[POOLS_COLLECTION].update_one({Doc.ID: pool}, {"$set": values}, upsert=True)


def pool_names(db: Database) -> list[str]:
    """Names of the pools submitted to ``db`` (those with a metadata document), sorted."""
    return sorted(d[Doc.ID] for d in db[POOLS_COLLECTION].find({}, {Doc.ID: 1}))


def qlib_pool_names(db: Database) -> list[str]:
    """Names of the pools Qlib made in ``db`` (``TrainerRM``, ``TaskManager.create_task``): collections holding
    task documents (``def`` and ``status``) but no metadata document of ours, sorted."""
    ours = set(pool_names(db))
    names = [n for n in db.list_collection_names() if n not in ours and not n.startswith(_INTERNAL_PREFIXES)]
    return sorted(n for n in names if _holds_tasks(db, n))


def all_pool_names(db: Database) -> list[str]:
    """Every pool of ``db``: submitted by qlib-ext or made by Qlib, sorted."""
    return sorted({*pool_names(db), *qlib_pool_names(db)})


_INTERNAL_PREFIXES = ("_qlib_ext", "system.")
"""Collections of a task database that are never pools."""


def _holds_tasks(db: Database, pool: str) -> bool:
    return db[pool].find_one({Doc.DEF: {"$exists": True}, Doc.STATUS: {"$exists": True}}, {Doc.ID: 1}) is not None


def find_pool_meta(db: Database, pool: str, fields: list[str] | None = None) -> PoolMeta | None:
    """The metadata of ``pool`` (only ``fields``, :class:`PoolMeta.Field` names, when given); None if it has none."""
    doc = db[POOLS_COLLECTION].find_one({Doc.ID: pool}, dict.fromkeys(fields, 1) if fields else None)
    return None if doc is None else PoolMeta.from_dict(doc)


def load_pool_meta(db: Database, pool: str) -> PoolMeta:
    """The metadata recorded by ``submit`` for ``pool``; for a pool Qlib made (task documents, no metadata) an
    empty one with ``qlib_made`` set.

    Raises:
        StoreError: ``pool`` is neither (the message lists the pools of the database, and ``--task-db``).
    """
    check_pool_name(pool)
    meta = find_pool_meta(db, pool)
    if meta is None and _holds_tasks(db, pool):
        return PoolMeta(pool=pool, qlib_made=True)
    if meta is None:
        raise StoreError(f"no pool named {pool!r} in database {db.name!r}; known pools: "
                         f"{', '.join(all_pool_names(db)) or '(none)'} — submit a workflow first, or name the "
                         f"database that holds it with --task-db (Qlib's task_db_name)")
    return meta
