"""Authentication, TLS, owner-only files, connection timeouts and the connection cap."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

import pymongo
import pytest

from qlib_ext.store import open_store, running_url
from qlib_ext.store.auth import mask


def _host_port(url: str) -> tuple[str, int]:
    return pymongo.uri_parser.parse_uri(url)["nodelist"][0]


def _bare(url: str) -> str:
    host, port = _host_port(url)
    return f"mongodb://{host}:{port}/"


def _client(url: str, **kw) -> pymongo.MongoClient:
    return pymongo.MongoClient(url, serverSelectionTimeoutMS=5000, **kw)


def test_the_owners_own_loopback_clients_need_no_password(store_proc):
    if store_proc is None:
        pytest.skip("needs the embedded store")
    with _client(store_proc.url) as good:
        good.db.pool.insert_one({"_id": 1, "status": "waiting"})
    with _client(_bare(store_proc.url)) as owner:  # what Qlib's own tools use: no credentials
        assert owner.db.pool.find_one() == {"_id": 1, "status": "waiting"}
    host, port = _host_port(store_proc.url)
    with _client(f"mongodb://qlib-ext:hunter2-guess@{host}:{port}/") as wrong:  # a wrong password still fails
        with pytest.raises(pymongo.errors.OperationFailure, match="Authentication failed"):
            wrong.db.pool.find_one()


def test_only_clients_with_the_credentials_get_in(store_proc):
    if store_proc is None:
        pytest.skip("needs the embedded store")
    store_proc.stop()
    store_proc.start(args=("--no-peer-auth",))  # the owner's processes are asked for the password too
    with _client(store_proc.url) as good:  # what running_url / resolve_mongo_url hand out
        good.db.pool.insert_one({"_id": 1, "status": "waiting"})
    with _client(_bare(store_proc.url)) as anonymous:
        assert anonymous.admin.command("ping")["ok"] == 1  # the handshake stays open
        for attempt in (lambda: anonymous.db.pool.find_one(), lambda: anonymous.db.pool.insert_one({"x": 1}),
                        lambda: anonymous.list_database_names()):
            with pytest.raises(pymongo.errors.OperationFailure) as err:
                attempt()
            assert err.value.code == 13  # Unauthorized
    host, port = _host_port(store_proc.url)
    with _client(f"mongodb://qlib-ext:hunter2-guess@{host}:{port}/") as wrong:
        with pytest.raises(pymongo.errors.OperationFailure, match="Authentication failed"):
            wrong.db.pool.find_one()
    with _client(store_proc.url, authMechanism="SCRAM-SHA-256") as explicit:
        assert explicit.db.pool.find_one() == {"_id": 1, "status": "waiting"}
    with _client(store_proc.url, authMechanism="SCRAM-SHA-1") as sha1:
        with pytest.raises(pymongo.errors.OperationFailure, match="SCRAM-SHA-256"):
            sha1.db.pool.find_one()
    assert "hunter2" not in store_proc.log_text() and mask(store_proc.url) in store_proc.log_text()
    assert pymongo.uri_parser.parse_uri(store_proc.url)["password"] not in store_proc.log_text()


def test_store_files_are_owner_only(store_proc):
    if store_proc is None:
        pytest.skip("needs the embedded store")
    with _client(store_proc.url) as client:
        client.db.pool.insert_one({"x": 1})
    store_proc.stop()
    store_proc.start()  # a restart writes the snapshot too
    names = {p.name for p in store_proc.dir.iterdir()}
    assert {"credentials.json", "snapshot.bson", "store.json", "store.lock"} <= names
    assert any(n.startswith("journal-") for n in names)
    assert stat.S_IMODE(store_proc.dir.stat().st_mode) == 0o700
    for path in store_proc.dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


NOBODY = 65534


def _as_nobody(directory: Path, bare_url: str) -> str:
    """In a forked child running as user ``nobody``: try the credentials file, then the pool."""
    out = []
    try:
        (directory / "credentials.json").read_text()
        out.append("read the credentials")
    except PermissionError:
        out.append("no credentials")
    with pymongo.MongoClient(bare_url, serverSelectionTimeoutMS=3000) as client:
        try:
            client.default_task_db.pool.find_one()
            out.append("read the pool")
        except pymongo.errors.OperationFailure as e:
            out.append(f"refused {e.code}")
    return " / ".join(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (nobody)")
def test_another_user_of_the_host_cannot_connect(store_proc):
    if store_proc is None:
        pytest.skip("needs the embedded store")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write, _as_nobody(store_proc.dir, _bare(store_proc.url)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        seen = f.read()
    os.waitpid(pid, 0)
    assert seen == "no credentials / refused 13"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qlib-ext-store.lab")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("qlib-ext-store.lab")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "store.crt", directory / "store.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def _serving(store) -> threading.Thread:
    thread = threading.Thread(target=store.server.serve_forever, daemon=True)
    thread.start()
    return thread


def test_tls_store_serves_tls_clients_only(tmp_path, caplog):
    cert_file, key_file = _self_signed(tmp_path)
    caplog.set_level(logging.INFO, logger="qlib_ext.store")
    with open_store(tmp_path / "s", tls_cert_file=cert_file, tls_key_file=key_file) as store:
        thread = _serving(store)
        url = running_url(tmp_path / "s")
        assert url == store.url and "tls=true" in url
        with _client(url) as client:
            client.db.pool.insert_one({"_id": 1})
            assert client.db.pool.find_one() == {"_id": 1}
        with pymongo.MongoClient(_bare(url), serverSelectionTimeoutMS=1500) as plain:
            with pytest.raises(pymongo.errors.ServerSelectionTimeoutError):
                plain.admin.command("ping")
        store.server.shutdown()
        thread.join(5)
    assert "TLS handshake" in caplog.text


def test_timeouts_and_connection_cap_each_log_a_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qlib_ext.store")
    with open_store(tmp_path / "s") as store:
        store.server.read_timeout, store.server.idle_timeout, store.server.max_connections = 0.5, 1.0, 3
        thread = _serving(store)
        address = _host_port(store.url)
        half = socket.create_connection(address, timeout=5)
        half.sendall(struct.pack("<iiii", 1000, 1, 0, 2013))  # promises 984 more bytes, never sends them
        idle = socket.create_connection(address, timeout=5)
        started = time.monotonic()
        assert half.recv(10) == b"" and time.monotonic() - started < 3
        assert idle.recv(10) == b"" and time.monotonic() - started < 4
        assert "no complete message within" in caplog.text
        assert "idle for 1 s" in caplog.text
        held = [socket.create_connection(address, timeout=5) for _ in range(3)]
        time.sleep(0.2)
        extra = socket.create_connection(address, timeout=5)
        assert extra.recv(10) == b""  # closed at once
        assert "refusing connection" in caplog.text and "STORE_MAX_CONNECTIONS" in caplog.text
        for sock in [*held, extra, half, idle]:
            sock.close()
        time.sleep(0.3)
        with _client(store.url, heartbeatFrequencyMS=500) as client:
            assert client.db.c.insert_one({"x": 1}).acknowledged
            time.sleep(1.6)  # its pooled connection idles past the timeout and is closed by the server
            assert client.db.c.insert_one({"x": 2}).acknowledged  # pymongo replaces it unnoticed
            assert caplog.text.count("idle for 1 s") >= 2  # the raw socket's, then the pooled one's
        store.server.shutdown()
        thread.join(5)


@pytest.mark.slow
def test_two_thousand_idle_connections_are_held_and_others_still_served(store_proc):
    if store_proc is None:
        pytest.skip("needs the embedded store")
    address = _host_port(store_proc.url)
    socks = [socket.create_connection(address, timeout=10) for _ in range(2000)]
    try:
        with _client(store_proc.url) as client:
            client.db.c.insert_one({"x": 1})
            assert client.db.c.count_documents({}) == 1
        socks[0].settimeout(0.2)
        with pytest.raises(TimeoutError):
            socks[0].recv(10)  # still open: nobody was refused or timed out
    finally:
        for sock in socks:
            sock.close()
    assert "refusing" not in store_proc.log_text()
