"""How a client reaches a store: its URL (with credentials and TLS options), TLS, the ping probe."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import urllib.parse
from pathlib import Path
from typing import Any

import bson

from qlib_ext import defaults
from qlib_ext.errors import StoreError
from qlib_ext.store.auth import read_credentials
from qlib_ext.store.wire import HEADER, OP_MSG


def url_for(host: str, port: int) -> str:
    """MongoDB URL a local client should use for a store bound to ``host:port``."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"mongodb://[{host}]:{port}/" if ":" in host else f"mongodb://{host}:{port}/"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (the safe default for a server without auth)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_url(directory: Path, state: dict[str, Any]) -> str:
    """The URL a local client uses: ``state["url"]`` plus credentials and TLS options.

    Raises:
        StoreError: the store requires authentication and its credentials cannot be read.
    """
    url = state["url"]
    params = {}
    if state.get("auth"):
        creds = read_credentials(directory)
        if creds is None:
            raise StoreError(f"the store serving {directory} requires authentication, but "
                             f"{directory / 'credentials.json'} is missing")
        quoted = f"{urllib.parse.quote(creds.user, safe='')}:{urllib.parse.quote(creds.password, safe='')}@"
        url = url.replace("://", "://" + quoted, 1)
        params["authSource"] = "admin"
    if state.get("tls"):
        params.update(tls="true", tlsCAFile=state["tls_ca_file"], tlsAllowInvalidHostnames="true")
    return url + ("?" + urllib.parse.urlencode(params) if params else "")


def tls_context(cert_file: Path | str, key_file: Path | str | None) -> ssl.SSLContext:
    """Server-side TLS context (TLS 1.2 or newer) from a PEM certificate and key.

    Raises:
        StoreError: the files cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as e:
        raise StoreError(f"cannot load the TLS certificate {cert_file} / key {key_file}: {e}") from e
    return ctx


def ping(url: str, timeout: float = 2.0, tls: bool = False) -> bool:
    """Whether a MongoDB-protocol server answers ``ping`` at ``url`` (``mongodb://host:port/``).

    ``ping`` needs no authentication; with ``tls`` the probe speaks TLS without verifying the
    certificate (it only asks whether the server is alive; real clients verify).
    """
    hostport = url.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[2]
    host, _, port = hostport.rpartition(":")
    body = bson.encode({"ping": 1, "$db": "admin"})
    msg = struct.pack("<IB", 0, 0) + body
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            sock = raw
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                sock = ctx.wrap_socket(raw)
            sock.sendall(HEADER.pack(HEADER.size + len(msg), 1, 0, OP_MSG) + msg)
            header = _recv_all(sock, HEADER.size)
            length = HEADER.unpack(header)[0]
            reply = _recv_all(sock, length - HEADER.size)
        return bson.decode(reply[5:]).get("ok") == 1
    except (OSError, ValueError, struct.error, bson.errors.BSONError):
        return False


def _recv_all(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


def qlib_note(url: str, db_name: str = defaults.TASK_DB_NAME) -> str:
    """For a store that is not on MongoDB's port: which port it is on, and the ``qlib.init(mongo=...)`` lines that
    point Qlib's own tools at it (left unconfigured they read whatever answers on 27017); "" on 27017.

    The URL shown has no credentials: on loopback the store lets its owner in by peer identity.
    """
    parts = urllib.parse.urlsplit(url)
    port = parts.port or defaults.STORE_PORT
    if port == defaults.STORE_PORT:
        return ""
    host = parts.hostname or defaults.STORE_HOST
    plain = url_for(host, port)
    return (f"note: the task store is on port {port}, not {defaults.STORE_PORT}: Qlib's own tools left unconfigured "
            f"(TaskManager(pool), python -m qlib.workflow.task.manage) would read whatever answers on "
            f"{defaults.STORE_PORT}. Point them at this store with:\n"
            f"    qlib.init(..., mongo={{\"task_url\": \"{plain}\", \"task_db_name\": \"{db_name}\"}})")
