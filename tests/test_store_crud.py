"""CRUD, cursors, indexes and errors through unmodified pymongo over a real socket."""

from __future__ import annotations

import datetime
import random

import mongomock
import pymongo
import pytest
from bson import Binary, ObjectId
from pymongo import monitoring


class _Commands(monitoring.CommandListener):
    def __init__(self):
        self.names: list[str] = []

    def started(self, event):
        self.names.append(event.command_name)

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


@pytest.fixture
def listener():
    return _Commands()


@pytest.fixture
def db(mongo_url, task_db_name, listener):
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000, event_listeners=[listener])
    yield client[task_db_name]
    client.close()


def test_round_trip_keeps_bson_types(db):
    doc = {"oid": ObjectId(), "when": datetime.datetime(2024, 5, 6, 7, 8, 9, 123000),
           "blob": Binary(b"\x00\x01pickle", 128), "raw": b"\xff\x00", "nested": {"a": [1, 2.5, "x", None]},
           "big": 2**40}
    inserted = db.c.insert_one(dict(doc)).inserted_id
    got = db.c.find_one({"_id": inserted})
    assert got == {"_id": inserted, **doc}
    assert isinstance(got["_id"], ObjectId)


def test_update_replace_upsert_delete(db):
    db.c.insert_many([{"k": i, "tag": "a" if i % 2 else "b"} for i in range(10)])
    assert db.c.update_one({"k": 3}, {"$set": {"x": 1}, "$inc": {"k": 100}}).modified_count == 1
    assert db.c.find_one({"k": 103})["x"] == 1
    assert db.c.update_many({"tag": "b"}, {"$set": {"seen": True}}).modified_count == 5
    assert db.c.replace_one({"k": 4}, {"k": 4, "replaced": True}).matched_count == 1
    assert "tag" not in db.c.find_one({"k": 4})
    res = db.c.update_one({"k": 42}, {"$set": {"up": 1}}, upsert=True)
    assert db.c.find_one({"_id": res.upserted_id}) == {"_id": res.upserted_id, "k": 42, "up": 1}
    assert db.c.delete_one({"tag": "a"}).deleted_count == 1
    assert db.c.delete_many({"tag": "b"}).deleted_count == 4  # k=4 lost its tag when replaced
    assert db.c.count_documents({}) == 6


def test_find_and_modify_variants(db):
    db.c.insert_many([{"n": i, "p": i % 3} for i in range(6)])
    before = db.c.find_one_and_update({"n": {"$gte": 2}}, {"$set": {"hit": 1}}, sort=[("p", -1), ("n", 1)])
    assert before["n"] == 2 and "hit" not in before
    after = db.c.find_one_and_update({"n": 0}, {"$inc": {"n": 10}}, projection={"_id": 0, "n": 1},
                                     return_document=pymongo.ReturnDocument.AFTER)
    assert after == {"n": 10}
    new = db.c.find_one_and_update({"n": 99}, {"$set": {"m": 1}}, upsert=True,
                                   return_document=pymongo.ReturnDocument.AFTER)
    assert new["n"] == 99 and new["m"] == 1
    assert db.c.find_one_and_delete({"n": 99})["m"] == 1
    assert db.c.find_one_and_replace({"n": 1}, {"n": 1, "r": True})["n"] == 1
    assert db.c.find_one_and_update({"n": 1234}, {"$set": {"x": 1}}) is None


def test_cursor_streams_10000_documents_in_batches(db, listener):
    db.big.insert_many([{"i": i, "pad": "x" * 50} for i in range(10_000)])
    listener.names.clear()
    seen = [d["i"] for d in db.big.find({}, batch_size=1000)]
    assert seen == list(range(10_000))
    assert listener.names.count("getMore") >= 9
    sorted_desc = [d["i"] for d in db.big.find({"i": {"$lt": 3000}}).sort("i", -1).skip(10).limit(2500)]
    assert sorted_desc == list(range(2989, 489, -1))


def test_unique_index_violation(db):
    db.c.create_index("name", unique=True)
    db.c.insert_one({"name": "a"})
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        db.c.insert_one({"name": "a"})
    db.c.insert_one({"name": "b"})
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        db.c.update_one({"name": "b"}, {"$set": {"name": "a"}})
    assert db.c.find_one({"name": "b"}) is not None  # the failed update changed nothing
    with pytest.raises(pymongo.errors.BulkWriteError) as err:
        db.c.insert_many([{"name": "c"}, {"name": "a"}, {"name": "d"}])
    assert err.value.details["nInserted"] == 1
    assert sorted(db.c.index_information()) == ["_id_", "name_1"]
    db.c.drop_index("name_1")
    db.c.insert_one({"name": "a"})


def test_aggregate_distinct_and_namespaces(db):
    db.c.insert_many([{"s": s, "v": v, "tags": ["x", "y"][: v % 2 + 1]}
                      for s, v in [("a", 1), ("a", 2), ("b", 3)]])
    groups = list(db.c.aggregate([{"$match": {"v": {"$gt": 0}}}, {"$group": {"_id": "$s", "t": {"$sum": "$v"}}},
                                  {"$sort": {"_id": 1}}]))
    assert groups == [{"_id": "a", "t": 3}, {"_id": "b", "t": 3}]
    assert list(db.c.aggregate([{"$unwind": "$tags"}, {"$count": "n"}])) == [{"n": 5}]
    assert list(db.c.aggregate([{"$project": {"_id": 0, "v": 1}}, {"$skip": 1}, {"$limit": 1}])) == [{"v": 2}]
    assert sorted(db.c.distinct("s")) == ["a", "b"] and db.c.count_documents({"s": "a"}) == 2
    db.create_collection("empty")
    assert sorted(db.list_collection_names()) == ["c", "empty"]
    assert db.name in db.client.list_database_names()
    db.drop_collection("empty")
    assert db.list_collection_names() == ["c"]
    db.client.drop_database(db.name)
    assert db.name not in db.client.list_database_names()


def test_unsupported_operator_and_command_raise_operation_failure(db):
    db.c.insert_one({"a": 1})
    with pytest.raises(pymongo.errors.OperationFailure, match=r"\$nosuchop"):
        db.c.find_one({"a": {"$nosuchop": 1}})
    with pytest.raises(pymongo.errors.OperationFailure, match="no such command"):
        db.command("frobnicate")
    with pytest.raises(pymongo.errors.OperationFailure, match=r"\$lookup"):
        list(db.c.aggregate([{"$lookup": {"from": "x", "localField": "a", "foreignField": "b", "as": "j"}}]))
    with pytest.raises(pymongo.errors.OperationFailure, match="TTL|expireAfterSeconds"):
        db.c.create_index("a", expireAfterSeconds=5)
    assert db.c.find_one({"a": 1})["a"] == 1  # the connection survived every error


def test_indexed_queries_match_mongomock(db):
    """The index planner may only speed queries up: results must equal mongomock's full scan."""
    rng = random.Random(7)
    values = [None, 0, 1, 1.0, 2, -3.5, "waiting", "running", "done", [1, "done"],
              {"x": 1}, datetime.datetime(2024, 1, 1)]
    docs = []
    for i in range(400):
        doc = {"_id": i, "n": i, "status": rng.choice(values), "priority": rng.choice(values),
               "filter": rng.choice([{"m": "lgb", "k": i % 5}, {"k": i % 5, "m": "lgb"}, {"m": ["a", {"b": 1.0}]}])}
        if rng.random() < 0.2:
            del doc["priority"]
        docs.append(doc)
    db.q.insert_many(docs)
    db.q.create_index([("status", 1), ("n", -1)])
    ref = mongomock.MongoClient().db.q
    ref.insert_many(docs)
    queries = [{"status": "waiting"}, {"status": 1}, {"status": None}, {"status": {"$in": ["done", 2]}},
               {"priority": {"$gte": 0, "$lt": 2}}, {"priority": {"$gt": "a"}}, {"status": "done", "n": {"$lt": 200}},
               {"$and": [{"status": {"$eq": "running"}}, {"priority": {"$lte": 1}}]}, {"_id": {"$in": [3, 5, 999]}},
               {"n": {"$gt": 390}}, {"status": {"$ne": "done"}, "priority": 1}, {"status": {"x": 1}},
               {"filter": {"m": "lgb", "k": 3}}, {"filter": {"k": 3, "m": "lgb"}}, {"filter": {"m": ["a", {"b": 1}]}},
               {"filter": {"m": "lgb", "k": 3}, "status": "done"}]
    for query in queries:
        for sort in (None, [("priority", -1)], [("priority", 1)], [("n", -1)]):
            got = [d["_id"] for d in db.q.find(query, sort=sort)]
            want = [d["_id"] for d in ref.find(query, sort=sort)]
            if sort:  # order too; priority ties keep insertion order in both
                assert got == want, (query, sort)
            else:
                assert sorted(got) == sorted(want), (query, sort)
            assert db.q.count_documents(query) == len(want), query
