"""Server robustness and lifecycle: bad clients, the directory lock, store.json, stop."""

from __future__ import annotations

import logging
import socket
import struct
import threading

import pymongo
import pytest

from qlib_ext.errors import StoreError
from qlib_ext.store import open_store, running_url, stop


def _host_port(url: str) -> tuple[str, int]:
    return pymongo.uri_parser.parse_uri(url)["nodelist"][0]


def _hung_up(sock: socket.socket) -> bool:
    """Whether the server closed the connection (FIN, or RST when our bytes were left unread)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("garbage", [
    b"\xff" * 64,  # negative length
    struct.pack("<iiii", 100 * 1000 * 1000, 1, 0, 2013),  # over the 48 MB limit
    struct.pack("<iiii", 40, 1, 0, 2013) + b"\x00" * 4 + b"\x00" + b"\x05\x00\x00\x00\x01" + b"x" * 14,
    struct.pack("<iiii", 26, 1, 0, 9999) + b"0123456789",  # unknown opcode
])
def test_garbage_closes_only_that_connection(mongo_url, task_db_name, garbage):
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    coll = client[task_db_name].c
    coll.insert_one({"before": 1})
    with socket.create_connection(_host_port(mongo_url), timeout=5) as bad:
        bad.sendall(garbage)
        assert _hung_up(bad)
    coll.insert_one({"after": 1})
    assert coll.count_documents({}) == 2
    client.close()


def test_half_message_then_silence_does_not_block_others(mongo_url, task_db_name):
    with socket.create_connection(_host_port(mongo_url), timeout=5) as slow:
        slow.sendall(struct.pack("<iiii", 1000, 1, 0, 2013))  # header promises 984 more bytes
        client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
        client[task_db_name].c.insert_one({"x": 1})
        assert client[task_db_name].c.find_one({"x": 1})
        client.close()


def test_second_serve_on_same_dir_refuses(tmp_path, store_proc):
    if store_proc is None:
        pytest.skip("needs the embedded store")
    with pytest.raises(StoreError, match="already serving"):
        with open_store(store_proc.dir):
            pass
    assert running_url(store_proc.dir) == store_proc.url


def test_store_json_and_stop(tmp_path):
    directory = tmp_path / "s"
    with open_store(directory) as store:
        thread = threading.Thread(target=store.server.serve_forever, daemon=True)
        thread.start()
        assert running_url(directory) == store.url
        assert (directory / "store.json").exists()
        store.server.shutdown()
        thread.join(5)
    assert not (directory / "store.json").exists()
    assert running_url(directory) is None
    assert stop(directory) is False


def test_non_loopback_host_needs_auth_and_warns_without_tls(tmp_path, caplog):
    with pytest.raises(StoreError, match="without authentication"):
        with open_store(tmp_path / "s", host="0.0.0.0", auth=False):
            pass
    caplog.set_level(logging.WARNING, logger="qlib_ext.store")
    with open_store(tmp_path / "s", host="0.0.0.0") as store:
        assert _host_port(store.url) == ("127.0.0.1", store.server.port)
    assert "without TLS" in caplog.text and "--tls-cert-file" in caplog.text


def _roundtrip(url: str, message: bytes) -> bytes:
    with socket.create_connection(_host_port(url), timeout=5) as sock:
        sock.sendall(message)
        header = sock.recv(16, socket.MSG_WAITALL)
        length = struct.unpack("<i", header[:4])[0]
        return header + sock.recv(length - 16, socket.MSG_WAITALL)


def test_legacy_op_query_is_master_handshake(mongo_url):
    import bson

    body = b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + bson.encode({"isMaster": 1})
    msg = struct.pack("<i", 0) + body  # flags
    reply = _roundtrip(mongo_url, struct.pack("<iiii", 16 + len(msg), 7, 0, 2004) + msg)
    _, _, response_to, op_code = struct.unpack("<iiii", reply[:16])
    assert (response_to, op_code) == (7, 1)  # OP_REPLY to our request
    doc = bson.decode(reply[16 + 20:])
    assert doc["ok"] == 1 and doc["ismaster"] is True and doc["maxWireVersion"] >= 9


def test_op_msg_with_checksum(mongo_url):
    import bson

    from qlib_ext.store.wire import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    body = struct.pack("<I", 1) + b"\x00" + bson.encode({"ping": 1, "$db": "admin"})
    head = struct.pack("<iiii", 16 + len(body) + 4, 9, 0, 2013)
    good = head + body + struct.pack("<I", crc32c(head + body))
    assert bson.decode(_roundtrip(mongo_url, good)[21:])["ok"] == 1
    with socket.create_connection(_host_port(mongo_url), timeout=5) as sock:
        sock.sendall(good[:-4] + b"\x00\x00\x00\x00")  # wrong checksum: hang up
        assert _hung_up(sock)


def test_background_store_exits_when_idle(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "qlib_ext.store", "serve", "--dir", str(tmp_path / "s"),
                             "--port", "0", "--idle-exit", "1"], stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert running_url(tmp_path / "s") is None
