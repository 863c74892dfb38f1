"""MongoDB's limits before anything changes; all-or-nothing writes; a replay that cannot fail."""

from __future__ import annotations

import logging

import bson
import pymongo
import pytest

from qlib_ext.store.engine import Engine
from qlib_ext.store.journal import Journal
from qlib_ext.store.limits import MAX_BSON_OBJECT_SIZE, depth


def _deep(levels: int, leaf: object = 1) -> object:
    """A value with ``levels`` levels of fields: ``_deep(1) == {"a": 1}``."""
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


def _engine(path) -> Engine:
    return Engine(Journal(path, 1 << 30))


def _cmd(engine: Engine, body: dict) -> dict:
    return bson.decode(engine.execute("db", body, {}))


def _ok(engine: Engine, body: dict) -> dict:
    reply = _cmd(engine, body)
    assert reply["ok"] == 1.0 and "writeErrors" not in reply, reply
    return reply


def _code(reply: dict) -> int:
    return reply["writeErrors"][0]["code"] if "writeErrors" in reply else reply["code"]


def _state(engine: Engine) -> dict:
    """Everything a client could observe: documents in natural order, index specs, index answers."""
    coll = engine.collection("db", "c")
    return {"docs": [bson.encode(d) for d in coll.docs.values()], "specs": dict(coll.specs),
            "waiting": coll.count({"status": "waiting"}), "k7": [d["_id"] for d in coll.find({"k": 7})],
            "by_filter": [d["_id"] for d in coll.find({"filter": {"x": 1}})]}


def test_depth_counts_levels_of_fields_like_mongodb():
    assert depth(_deep(1)) == 1 and depth(_deep(100)) == 100
    assert depth({"a": {}, "b": []}) == 1  # empty documents and arrays add no level
    assert depth({"a": [[1]]}) == 3
    assert depth(_deep(5000), stop=201) == 201  # iterative: no RecursionError


REJECTED = [  # (what, command, MongoDB's code)
    ("insert 101 levels", {"insert": "c", "documents": [{"_id": "deep", "filter": _deep(100)}]}, 15),
    ("insert over 16 MB", {"insert": "c", "documents": [{"_id": "big", "pad": "x" * MAX_BSON_OBJECT_SIZE}]}, 2),
    ("490 levels under filter", {"insert": "c", "documents": [{"_id": "d490", "filter": _deep(489)}]}, 15),
    ("update to 101 levels", {"update": "c", "updates": [{"q": {"_id": 1}, "u": {"$set": {"n": _deep(100)}}}]}, 15),
    ("update over 16 MB", {"update": "c", "updates": [{"q": {"_id": 2}, "u": {"$set": {"p3": "y" * (9 << 20)}}}]},
     10334),
    ("upsert 101 levels", {"update": "c", "updates": [{"q": {"_id": "up"}, "u": {"$set": {"n": _deep(100)}},
                                                      "upsert": True}]}, 15),
    ("findAndModify to 101 levels", {"findAndModify": "c", "query": {"_id": 3},
                                     "update": {"$set": {"status": _deep(100)}}}, 15),
    ("findAndModify over 16 MB upsert", {"findAndModify": "c", "query": {"_id": "fup"}, "upsert": True,
                                         "update": {"$set": {"p": "z" * MAX_BSON_OBJECT_SIZE}}}, 17420),
    ("update to a duplicate key", {"update": "c", "updates": [{"q": {"_id": 4}, "u": {"$set": {"k": 5}}}]}, 11000),
    ("update of _id", {"update": "c", "updates": [{"q": {"_id": 4}, "u": {"$set": {"_id": 99}}}]}, 66),
    ("unique index over duplicates", {"createIndexes": "c", "indexes": [{"key": {"status": 1}, "name": "s_u",
                                                                        "unique": True}]}, 11000),
    ("bad update operator", {"update": "c", "updates": [{"q": {"_id": 4}, "u": {"$inc": {"status": 1}}}]}, None),
]


def test_every_rejected_write_changes_nothing_and_a_restart_rebuilds_the_same_state(tmp_path):
    engine = _engine(tmp_path)
    _ok(engine, {"createIndexes": "c", "indexes": [{"key": {"k": 1}, "name": "k_1", "unique": True}]})
    _ok(engine, {"insert": "c", "documents": [
        {"_id": i, "k": i, "status": "waiting", "filter": {"x": i % 3}, "p2": "y" * (8 << 20) if i == 2 else ""}
        for i in range(10)]})
    _ok(engine, {"insert": "c", "documents": [{"_id": "at_limit", "filter": _deep(99)}]})  # 100 levels: fine
    for what, body, code in REJECTED:
        before = _state(engine)
        reply = _cmd(engine, body)
        assert reply["ok"] == 0 or "writeErrors" in reply, (what, reply)
        if code is not None:
            assert _code(reply) == code, (what, reply)
        assert _state(engine) == before, what
        # accepted writes between the rejected ones
        _ok(engine, {"update": "c", "updates": [{"q": {"_id": 0}, "u": {"$inc": {"n": 1}}}]})
    _ok(engine, {"findAndModify": "c", "query": {"status": "waiting"}, "sort": {"k": -1},
                 "update": {"$set": {"status": "running"}}})
    _ok(engine, {"update": "c", "updates": [{"q": {"_id": "new"}, "u": {"$set": {"k": 77}}, "upsert": True}]})
    _ok(engine, {"delete": "c", "deletes": [{"q": {"_id": 9}, "limit": 1}]})
    expected = _state(engine)
    assert expected["docs"][0] == bson.encode({"_id": 0, "k": 0, "status": "waiting", "filter": {"x": 0},
                                               "p2": "", "n": len(REJECTED)})
    engine.close()
    again = _engine(tmp_path)
    assert _state(again) == expected
    assert _code(_cmd(again, {"insert": "c", "documents": [{"k": 5}]})) == 11000  # unique index came back
    again.close()


def test_replay_skips_what_it_cannot_apply_and_keeps_the_rest(tmp_path, caplog):
    journal = Journal(tmp_path, 1 << 30)
    list(journal.open())
    # As an older version journaled them: a document 490 levels deep under an indexed field, an op
    # that cannot apply, and ordinary documents around them.
    journal.append([{"o": "create", "db": "db", "c": "c"}, {"o": "put", "db": "db", "c": "c", "d": {"_id": 1}}])
    journal.append([{"o": "put", "db": "db", "c": "c", "d": {"_id": 2, "filter": _deep(489), "status": "waiting"}}])
    journal.append([{"o": "put", "db": "db", "c": "c", "d": {"no_id": True}},
                    {"o": "idx", "db": "db", "c": "c", "spec": {"name": "broken"}},
                    {"o": "put", "db": "db", "c": "c", "d": {"_id": 3}}])
    journal.close()
    caplog.set_level(logging.ERROR, logger="qlib_ext.store")
    engine = _engine(tmp_path)
    coll = engine.collection("db", "c")
    assert sorted(d["_id"] for d in coll.docs.values()) == [1, 2, 3]
    assert coll.count({"status": "waiting"}) == 1
    assert "replay skipped op 0 of record 2" in caplog.text
    # indexes over the deep field build: the key function does not recurse past MongoDB's 100 levels
    specs = [{"key": {"filter.a": 1, "status": 1}, "name": "fa"}, {"key": {"filter": 1}, "name": "f_u", "unique": True}]
    assert _code(_cmd(engine, {"createIndexes": "c", "indexes": specs})) == 11000  # 1 and 3: both null
    assert engine.collection("db", "c").specs == {}  # neither index: one command, built together or not at all
    specs[1]["sparse"] = True
    _ok(engine, {"createIndexes": "c", "indexes": specs})
    assert _ok(engine, {"count": "c", "query": {"filter.a.a": {"$exists": True}}})["n"] == 1
    # It stays too deep to update (as MongoDB would refuse the result), but it can be read and deleted.
    assert _code(_cmd(engine, {"update": "c", "updates": [{"q": {"_id": 2}, "u": {"$set": {"status": "x"}}}]})) == 15
    assert _ok(engine, {"find": "c", "filter": {"status": "waiting"}})["cursor"]["firstBatch"][0]["_id"] == 2
    _ok(engine, {"update": "c", "updates": [{"q": {"_id": 3}, "u": {"$set": {"status": "done"}}}]})
    engine.close()
    third = _engine(tmp_path)  # the compacted snapshot restarts too
    assert third.collection("db", "c").count({"status": "done"}) == 1
    _ok(third, {"delete": "c", "deletes": [{"q": {"_id": 2}, "limit": 1}]})
    third.close()


def test_a_journal_write_error_stops_the_store_instead_of_serving_unjournaled_state(tmp_path, monkeypatch):
    engine = _engine(tmp_path)
    _ok(engine, {"insert": "c", "documents": [{"_id": 1}]})
    stopped = []
    engine.on_failure = lambda: stopped.append(True)

    def full_disk(ops):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.journal, "append", full_disk)
    reply = _cmd(engine, {"insert": "c", "documents": [{"_id": 2}]})
    assert reply["ok"] == 0 and "No space left" in reply["errmsg"] and stopped
    assert _cmd(engine, {"find": "c", "filter": {}})["ok"] == 0  # nobody reads the unjournaled insert
    monkeypatch.undo()
    engine.close()
    again = _engine(tmp_path)
    assert [d["_id"] for d in again.collection("db", "c").docs.values()] == [1]
    again.close()


def test_deep_documents_over_pymongo_never_stop_a_restart(store_proc, tmp_path):
    if store_proc is None:
        pytest.skip("needs the embedded store")
    client = pymongo.MongoClient(store_proc.url, serverSelectionTimeoutMS=5000)
    coll = client.db.pool
    coll.insert_one({"_id": "ok", "status": "waiting", "filter": {"x": 1}})
    with pytest.raises(pymongo.errors.PyMongoError, match="nest"):
        coll.insert_one({"_id": "d490", "status": "waiting", "filter": _deep(489)})
    with pytest.raises(pymongo.errors.WriteError, match="nesting") as err:
        coll.insert_one({"_id": "d101", "filter": _deep(100)})
    assert err.value.code == 15
    with pytest.raises(pymongo.errors.WriteError):
        coll.update_one({"_id": "ok"}, {"$set": {"filter.y": _deep(100)}})
    assert coll.find_one({"_id": "ok"}) == {"_id": "ok", "status": "waiting", "filter": {"x": 1}}
    assert coll.count_documents({}) == 1 and coll.find_one({"_id": {"$in": ["d490", "d101"]}}) is None
    coll.insert_one({"_id": "d490"})  # the refused documents never held their _id
    client.close()
    store_proc.kill9()
    client = pymongo.MongoClient(store_proc.start(), serverSelectionTimeoutMS=5000)
    assert sorted(d["_id"] for d in client.db.pool.find()) == ["d490", "ok"]
    client.close()


def test_an_index_that_fails_midway_leaves_no_trace(tmp_path, monkeypatch):
    """Fault injection: the last index raises while a document is added or re-indexed."""
    from qlib_ext.store.indexes import PairIndex

    engine = _engine(tmp_path)
    _ok(engine, {"insert": "c", "documents": [{"_id": i, "k": i, "status": "waiting", "filter": {"x": 1}}
                                              for i in range(5)]})
    before = _state(engine)
    real_add, real_update = PairIndex.add, PairIndex.update

    def add(self, seq, doc):
        if doc.get("poison"):
            raise RuntimeError("index bug")
        real_add(self, seq, doc)

    def update(self, seq, doc):
        if doc.get("poison"):
            raise RuntimeError("index bug")
        real_update(self, seq, doc)

    monkeypatch.setattr(PairIndex, "add", add)
    monkeypatch.setattr(PairIndex, "update", update)
    assert _code(_cmd(engine, {"insert": "c", "documents": [{"_id": 9, "status": "waiting", "poison": 1}]})) == 1
    assert _code(_cmd(engine, {"update": "c", "updates": [{"q": {"_id": 2}, "u": {"$set": {"poison": 1,
                                                                                         "status": "done"}}}]})) == 1
    assert _state(engine) == before
    coll = engine.collection("db", "c")
    assert coll.count({"status": "done"}) == 0 and coll.get(9) is None
    claimed = _ok(engine, {"findAndModify": "c", "query": {"status": "waiting"}, "sort": {"priority": -1},
                           "update": {"$set": {"status": "running"}}})
    assert claimed["value"]["_id"] == 0  # the pair index still walks every waiting task
    monkeypatch.undo()
    _ok(engine, {"insert": "c", "documents": [{"_id": 9}]})  # the _id was never taken
    engine.close()
    again = _engine(tmp_path)
    assert sorted(d["_id"] for d in again.collection("db", "c").docs.values()) == [0, 1, 2, 3, 4, 9]
    again.close()
