"""Command dispatch plus the handshake, admin and namespace (collection, index) commands.

CRUD handlers live in :mod:`qlib_ext.store.crud`. Every handler takes
``(engine, db, body, sequences)`` and returns the reply document; the engine holds its lock.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mongomock import filtering

from qlib_ext import defaults
from qlib_ext.store import crud
from qlib_ext.store.errors import CommandError

if TYPE_CHECKING:
    from qlib_ext.store.engine import Engine

Handler = Callable[["Engine", str, dict, dict], dict]

MAX_WIRE_VERSION = 17
"""Wire version announced (MongoDB 6.0): pymongo 4.20 needs at least 9."""

SERVER_VERSION = "6.0.0"
"""Version string in buildInfo; matches :data:`MAX_WIRE_VERSION`."""

_ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
_INDEX_OPTIONS = {"key", "name", "unique", "sparse", "partialFilterExpression", "background", "v"}


def dispatch(engine: Engine, db: str, body: dict[str, Any], sequences: dict[str, list]) -> dict:
    """Run the command named by ``body``'s first key."""
    if not body:
        raise CommandError(9, "empty command document")
    name = next(iter(body))
    handler = COMMANDS.get(name) or COMMANDS.get(name.lower())
    if handler is None:
        raise CommandError(59, f"no such command: '{name}' (not supported by the embedded qlib-ext store)")
    if body.get("startTransaction") or body.get("autocommit") is False:
        raise CommandError(20, "transactions are not supported by the embedded qlib-ext store")
    return handler(engine, db, body, sequences)


# ---------------------------------------------------------------------- handshake and admin
def cmd_hello(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    reply = {
        "ismaster": True, "maxBsonObjectSize": 16 * 1024 * 1024,
        "maxMessageSizeBytes": defaults.MAX_MESSAGE_BYTES, "maxWriteBatchSize": 100_000,
        "localTime": datetime.datetime.now(datetime.timezone.utc), "logicalSessionTimeoutMinutes": 30,
        "connectionId": 1, "minWireVersion": 0, "maxWireVersion": MAX_WIRE_VERSION,
        "readOnly": False, "ok": 1.0,
    }
    if "hello" in body or body.get("helloOk"):
        reply["helloOk"] = True
        reply["isWritablePrimary"] = True
    return reply


def cmd_build_info(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    return {"version": SERVER_VERSION, "versionArray": [6, 0, 0, 0], "gitVersion": "qlib-ext-embedded",
            "bits": 64, "maxBsonObjectSize": 16 * 1024 * 1024, "storageEngines": ["qlib-ext-journal"],
            "ok": 1.0}


def cmd_ok(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    return {"ok": 1.0}


def cmd_server_status(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    return {"host": platform.node(), "version": SERVER_VERSION, "process": "qlib-ext-store",
            "pid": os.getpid(), "uptime": 0.0, "ok": 1.0}


def cmd_list_databases(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    dbs = [{"name": name, "sizeOnDisk": 0, "empty": False} for name in engine.dbs]
    flt = body.get("filter")
    if flt:
        dbs = [d for d in dbs if filtering.filter_applies(flt, d)]
    if body.get("nameOnly"):
        dbs = [{"name": d["name"]} for d in dbs]
    return {"databases": dbs, "totalSize": 0, "ok": 1.0}


def cmd_db_stats(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    colls = engine.dbs.get(db, {})
    return {"db": db, "collections": len(colls), "objects": sum(len(c.docs) for c in colls.values()),
            "indexes": sum(1 + len(c.specs) for c in colls.values()), "ok": 1.0}


# ---------------------------------------------------------------------- collections
def cmd_list_collections(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    infos = [{"name": name, "type": "collection", "options": {}, "info": {"readOnly": False},
              "idIndex": _ID_INDEX} for name in engine.dbs.get(db, {})]
    flt = body.get("filter")
    if flt:
        infos = [i for i in infos if filtering.filter_applies(flt, i)]
    if body.get("nameOnly"):
        infos = [{"name": i["name"], "type": i["type"]} for i in infos]
    batch = (body.get("cursor") or {}).get("batchSize")
    return crud._first_batch(engine, f"{db}.$cmd.listCollections", iter(infos), None, batch, False)


def cmd_create(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    name = body["create"]
    if engine.collection(db, name) is not None:
        raise CommandError(48, f"Collection {db}.{name} already exists.")
    unsupported = {"capped", "validator", "timeseries", "viewOn", "clusteredIndex"} & set(body)
    if unsupported:
        raise NotImplementedError(f"create option {sorted(unsupported)[0]!r}")
    engine.collection(db, name, create=True)
    return {"ok": 1.0}


def cmd_drop(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    coll = engine.collection(db, body["drop"])
    if coll is None:
        raise CommandError(26, "ns not found")
    engine.drop_collection(db, body["drop"])
    return {"ns": f"{db}.{body['drop']}", "nIndexesWas": 1 + len(coll.specs), "ok": 1.0}


def cmd_drop_database(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    engine.drop_database(db)
    return {"dropped": db, "ok": 1.0}


# ---------------------------------------------------------------------- indexes
def _check_index_spec(spec: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(spec.get("key"), dict) or not spec["key"] or not spec.get("name"):
        raise CommandError(67, f"index spec needs a non-empty 'key' and a 'name': {spec}")
    for field, kind in spec["key"].items():
        if kind not in (1, -1, 1.0, -1.0, "hashed"):
            raise NotImplementedError(f"index type {kind!r} on {field!r} (only 1, -1 and 'hashed')")
    extra = set(spec) - _INDEX_OPTIONS
    if extra:
        raise NotImplementedError(f"index option {sorted(extra)[0]!r} (e.g. TTL expireAfterSeconds)")
    return {"v": 2, **{k: v for k, v in spec.items() if k not in ("v", "background")}}


def cmd_create_indexes(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    created = engine.collection(db, body["createIndexes"]) is None
    coll = engine.collection(db, body["createIndexes"], create=True)
    before, built = 1 + len(coll.specs), []
    try:
        for raw in body.get("indexes") or []:
            spec = _check_index_spec(raw)
            if spec["name"] == "_id_" or list(spec["key"]) == ["_id"]:
                continue
            existing = coll.specs.get(spec["name"])
            if existing is not None:
                if existing != spec:
                    raise CommandError(86, f"an index named {spec['name']!r} exists with different options")
                continue
            same_key = [n for n, s in coll.specs.items() if s["key"] == spec["key"]]
            if same_key:
                raise CommandError(85, f"index {same_key[0]!r} already exists with the same key")
            coll.create_index(spec)
            built.append(spec["name"])
    except Exception:
        for name in built:  # as in MongoDB, the indexes of one command are built together or not at all
            coll.drop_index(name)
        raise
    return {"createdCollectionAutomatically": created, "numIndexesBefore": before,
            "numIndexesAfter": 1 + len(coll.specs), "ok": 1.0}


def cmd_list_indexes(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    coll = engine.collection(db, body["listIndexes"])
    if coll is None:
        raise CommandError(26, f"ns does not exist: {db}.{body['listIndexes']}")
    specs = [_ID_INDEX, *coll.specs.values()]
    batch = (body.get("cursor") or {}).get("batchSize")
    return crud._first_batch(engine, f"{db}.{coll.name}", iter(specs), None, batch, False)


def cmd_drop_indexes(engine: Engine, db: str, body: dict, seqs: dict) -> dict:
    coll = engine.collection(db, body["dropIndexes"])
    if coll is None:
        raise CommandError(26, f"ns not found {db}.{body['dropIndexes']}")
    was, target = 1 + len(coll.specs), body.get("index")
    if target == "*":
        names = list(coll.specs)
    elif isinstance(target, dict):
        names = [n for n, s in coll.specs.items() if s["key"] == target]
    else:
        names = [target] if isinstance(target, str) else list(target or [])
    for name in names:
        if name not in coll.specs:
            raise CommandError(27, f"index not found with name [{name}]")
    if not names:
        raise CommandError(27, f"can't find index with key: {target}")
    for name in names:
        coll.drop_index(name)
    return {"nIndexesWas": was, "ok": 1.0}


COMMANDS: dict[str, Handler] = {
    "hello": cmd_hello, "ismaster": cmd_hello, "isMaster": cmd_hello,
    "ping": cmd_ok, "endSessions": cmd_ok, "killAllSessions": cmd_ok, "refreshSessions": cmd_ok,
    "buildInfo": cmd_build_info, "buildinfo": cmd_build_info, "serverStatus": cmd_server_status,
    "getLastError": cmd_ok, "whatsmyuri": cmd_ok, "dbStats": cmd_db_stats,
    "listDatabases": cmd_list_databases, "listCollections": cmd_list_collections,
    "create": cmd_create, "drop": cmd_drop, "dropDatabase": cmd_drop_database,
    "createIndexes": cmd_create_indexes, "listIndexes": cmd_list_indexes, "dropIndexes": cmd_drop_indexes,
    "insert": crud.cmd_insert, "update": crud.cmd_update, "delete": crud.cmd_delete,
    "find": crud.cmd_find, "getMore": crud.cmd_get_more, "killCursors": crud.cmd_kill_cursors,
    "findAndModify": crud.cmd_find_and_modify, "findandmodify": crud.cmd_find_and_modify,
    "count": crud.cmd_count, "distinct": crud.cmd_distinct, "aggregate": crud.cmd_aggregate,
}
