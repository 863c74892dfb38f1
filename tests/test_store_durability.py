"""Durability: acknowledged writes survive kill -9; the journal replays, compacts and heals."""

from __future__ import annotations

import threading

import pymongo
import pytest

from qlib_ext.store.engine import Engine
from qlib_ext.store.journal import Journal


def _insert_until_killed(url: str, first: int, acked: list[int], stop: threading.Event) -> None:
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=2000, retryWrites=False)
    coll = client.db.stream
    i = first
    try:
        while not stop.is_set():
            coll.insert_one({"_id": i, "payload": "x" * 200})
            acked.append(i)  # only after the server acknowledged
            i += 1
    except pymongo.errors.PyMongoError:
        pass
    finally:
        client.close()


@pytest.mark.slow
def test_kill9_mid_insert_stream_keeps_every_acknowledged_insert(store_proc):
    if store_proc is None:
        pytest.skip("needs the embedded store")
    acked: list[int] = []
    stop = threading.Event()
    writers = [threading.Thread(target=_insert_until_killed, args=(store_proc.url, k * 1_000_000, acked, stop))
               for k in range(3)]  # concurrent writers: acknowledged through shared (group) commits
    for w in writers:
        w.start()
    while len(acked) < 300 and all(w.is_alive() for w in writers):
        threading.Event().wait(0.01)
    store_proc.kill9()
    stop.set()
    for w in writers:
        w.join(30)
    assert len(acked) >= 300
    url = store_proc.start()
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    stored = {d["_id"] for d in client.db.stream.find({}, {"_id": 1})}
    client.close()
    assert set(acked) <= stored
    assert len(stored - set(acked)) <= len(writers)  # beyond that, only writes in flight at the kill


def _engine(path, compact_bytes: int = 1 << 30) -> Engine:
    return Engine(Journal(path, compact_bytes))


def _run(engine: Engine, body: dict) -> None:
    import bson

    reply = bson.decode(engine.execute("db", body, {}))
    assert reply["ok"] == 1.0 and "writeErrors" not in reply, reply


def test_restart_replays_documents_indexes_and_deletes(tmp_path):
    engine = _engine(tmp_path, compact_bytes=20_000)  # small budget: compacts several times
    _run(engine, {"createIndexes": "c", "indexes": [{"key": {"k": 1}, "name": "k_1", "unique": True}]})
    for i in range(300):
        _run(engine, {"insert": "c", "documents": [{"_id": i, "k": i, "status": "waiting", "pad": "y" * 100}]})
    _run(engine, {"update": "c", "updates": [{"q": {"k": {"$lt": 100}}, "u": {"$set": {"status": "done"}},
                                              "multi": True}]})
    _run(engine, {"delete": "c", "deletes": [{"q": {"k": {"$gte": 290}}, "limit": 0}]})
    assert engine.journal.gen > 1  # compaction happened
    engine.close()

    again = _engine(tmp_path)
    coll = again.collection("db", "c")
    assert len(coll.docs) == 290
    assert coll.count({"status": "done"}) == 100
    assert list(coll.specs) == ["k_1"]
    import bson

    reply = bson.decode(again.execute("db", {"insert": "c", "documents": [{"k": 5}]}, {}))
    assert reply["writeErrors"][0]["code"] == 11000  # the unique index came back too
    again.close()


def test_torn_journal_tail_is_cut_off(tmp_path):
    engine = _engine(tmp_path)
    for i in range(10):
        _run(engine, {"insert": "c", "documents": [{"_id": i}]})
    engine.close()
    journal = next(tmp_path.glob("journal-*.log"))
    with open(journal, "ab") as f:
        f.write(b"\x50\x00\x00\x00garbage-from-a-crash")
    again = _engine(tmp_path)
    assert sorted(again.collection("db", "c").docs[s]["_id"] for s in again.collection("db", "c").docs) \
        == list(range(10))
    _run(again, {"insert": "c", "documents": [{"_id": 10}]})
    again.close()
    third = _engine(tmp_path)
    assert len(third.collection("db", "c").docs) == 11
    third.close()


def test_group_commit_shares_fsyncs_between_concurrent_writers(tmp_path, monkeypatch):
    import time

    from qlib_ext.store import journal as journal_mod

    calls = []

    def slow_sync(fd):
        calls.append(fd)
        time.sleep(0.05)  # a slow disk: writers pile up behind the flush in progress

    monkeypatch.setattr(journal_mod, "_datasync", slow_sync)
    journal = Journal(tmp_path, 1 << 30)
    list(journal.open())
    engine_lock = threading.Lock()

    def writer(i: int) -> None:
        with engine_lock:
            lsn = journal.append([{"o": "create", "db": "d", "c": f"c{i}"}])
        journal.wait_durable(lsn)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert 1 <= len(calls) <= 4  # 16 acknowledged writes, a handful of flushes
    journal.close()
