"""Another user of the host, as root's store sees it: no write by racing peer authentication, and no
way to take the store down by holding connections (issue 20, sections 1 and 2).

The other user is ``nobody``, reached through ``runuser``; its helper is plain-stdlib Python fed on
stdin (root's virtualenv usually sits under ``/root``, which ``nobody`` cannot enter), so it needs
nothing but a Python interpreter ``nobody`` may run.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time

import bson
import pymongo
import pytest
from other_user import nobody_python

NOBODY_RACE = r"""
import socket, struct, sys
family, host, port, mode = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
for line in sys.stdin:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect((host, port))
    s.sendall(bytes.fromhex(line.strip()))
    if mode == "shut":
        s.shutdown(socket.SHUT_WR)
    elif mode == "rst":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
print("sent")
"""

NOBODY_HOLD = r"""
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = []
for _ in range(int(sys.argv[3])):
    try:
        socks.append(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10))
    except OSError:
        pass
print("holding", len(socks), flush=True)
sys.stdin.read()
for s in socks:
    s.close()
"""


def _insert_message(request_id: int, doc: dict) -> bytes:
    """An OP_MSG ``insert`` of ``doc`` into ``default_task_db.pool``, no credentials."""
    body = bson.encode({"insert": "pool", "documents": [doc], "$db": "default_task_db"})
    payload = struct.pack("<I", 0) + b"\x00" + body
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, 2013) + payload


def _host_port(url: str) -> tuple[str, int]:
    return pymongo.uri_parser.parse_uri(url)["nodelist"][0]


def _client(url: str) -> pymongo.MongoClient:
    return pymongo.MongoClient(url, serverSelectionTimeoutMS=10000)


RACES = 20


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_another_user_racing_peer_authentication_lands_no_write(store_proc, host):
    if store_proc is None:
        pytest.skip("needs the embedded store")
    as_nobody = nobody_python("the store runs as root and the other user is reached with runuser")
    if host == "::1":
        try:
            socket.socket(socket.AF_INET6).bind(("::1", 0))
        except OSError as e:
            pytest.skip(f"this host has no IPv6 loopback (binding ::1 failed: {e}), so the race over ::1 cannot run")
        store_proc.stop()
        store_proc.start(args=("--host", "::1"))
    _, port = _host_port(store_proc.url)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for mode in ("close", "shut", "rst"):  # close at once, half-close, reset (SO_LINGER 0)
        lines = "".join(_insert_message(i, {"_id": f"{mode}-{i}", "status": "waiting"}).hex() + "\n"
                        for i in range(RACES))
        done = subprocess.run([*as_nobody, NOBODY_RACE, str(int(family)), host, str(port), mode],
                              input=lines, capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "sent", done.stderr
    bare = f"mongodb://[{host}]:{port}/" if ":" in host else f"mongodb://{host}:{port}/"
    with _client(store_proc.url) as admin:
        for _ in range(20):  # over 2 s: every message the store accepted has been handled (ms each)
            assert admin.default_task_db.pool.count_documents({}) == 0
            time.sleep(0.1)
    with _client(bare) as owner:  # Qlib's TaskManager style: no credentials, as the owner
        owner.default_task_db.pool.insert_one({"_id": "owner", "status": "waiting"})
        assert [d["_id"] for d in owner.default_task_db.pool.find()] == ["owner"]


HOLD = 1100


@pytest.mark.slow
def test_another_user_holding_every_connection_cannot_take_the_store_down(store_proc):
    if store_proc is None:
        pytest.skip("needs the embedded store")
    as_nobody = nobody_python("the store runs as root and the other user is reached with runuser")
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux) to run the store under a 1,024 open-file limit")
    store_proc.stop()
    store_proc.start(wrapper=("prlimit", "--nofile=1024:1024"))
    host, port = _host_port(store_proc.url)
    holder = subprocess.Popen([*as_nobody, NOBODY_HOLD, host, str(port), str(HOLD)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line.startswith("holding"), holder.stderr.read()
        assert store_proc.proc.poll() is None, store_proc.log_text()[-2000:]
        with _client(f"mongodb://{host}:{port}/") as owner:  # the owner, unconfigured, still gets in
            owner.default_task_db.pool.insert_one({"_id": 1})
            assert owner.default_task_db.pool.count_documents({}) == 1
        with _client(store_proc.url) as client:
            assert client.admin.command("ping")["ok"] == 1
    finally:
        holder.communicate("", timeout=60)
    assert store_proc.proc.poll() is None, store_proc.log_text()[-2000:]
    assert "refusing connection" in store_proc.log_text()
    with _client(store_proc.url) as client:
        assert client.default_task_db.pool.count_documents({}) == 1


def test_a_failing_accept_is_logged_once_and_the_store_keeps_serving(tmp_path, caplog, monkeypatch):
    import errno
    import logging
    import threading

    from qlib_ext.store import open_store

    caplog.set_level(logging.INFO, logger="qlib_ext.store")
    with open_store(tmp_path / "s") as store:
        class Failing:  # the listening socket, but out of file descriptors for three accepts
            def __init__(self, sock: socket.socket):
                self.sock, self.failures = sock, 3

            def accept(self):
                if self.failures:
                    self.failures -= 1
                    raise OSError(errno.EMFILE, "Too many open files")
                return self.sock.accept()

            def __getattr__(self, name: str):
                return getattr(self.sock, name)

        monkeypatch.setattr(store.server, "sock", Failing(store.server.sock))
        thread = threading.Thread(target=store.server.serve_forever, daemon=True)
        thread.start()
        with _client(store.url) as client:
            assert client.admin.command("ping")["ok"] == 1
        store.server.shutdown()
        thread.join(5)
    assert caplog.text.count("accepting a connection failed") == 1 and "Too many open files" in caplog.text


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_both_ways_of_asking_the_kernel_agree_and_a_closed_client_is_nobody(family, host):
    from qlib_ext.store import peer

    try:
        server = socket.create_server((host, 0), family=family)
    except OSError as e:
        pytest.skip(f"this host cannot listen on {host} ({e}), so the kernel lookup over it cannot be checked")
    with server:
        client = socket.create_connection(server.getsockname()[:2])
        conn, _ = server.accept()
        with conn:
            table = (peer._hex_addr(conn.getpeername(), family), peer._hex_addr(conn.getsockname(), family))
            assert peer.loopback_peer_uid(conn) == os.geteuid()
            assert peer._row_uid(peer._table(family), table) == os.geteuid()
            client.close()  # the client's end becomes an orphan (FIN_WAIT2): uid 0, inode 0
            assert peer.loopback_peer_uid(conn) is None
            assert peer._row_uid(peer._table(family), table) is None
