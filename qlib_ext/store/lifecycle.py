"""Starting, finding and stopping a store: the lock on its directory and ``store.json``.

A store directory holds the data (snapshot + journal), ``store.lock`` (held with ``flock`` by the
serving process for its whole life, so the kernel releases it even on ``kill -9``) and
``store.json`` (url, pid, host, port) for clients to find it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson

from qlib_ext import defaults
from qlib_ext.errors import StoreError
from qlib_ext.store.engine import Engine
from qlib_ext.store.journal import Journal
from qlib_ext.store.server import StoreServer
from qlib_ext.store.wire import HEADER, OP_MSG

logger = logging.getLogger(__name__)

STATE_FILE = "store.json"
LOCK_FILE = "store.lock"
START_LOCK_FILE = "start.lock"
LOG_FILE = "store.log"


def _resolve_dir(directory: Path | str | None) -> Path:
    path = Path(directory).expanduser().resolve() if directory else defaults.store_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


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


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_flock(fd, patience=1.0):
            state = read_state(path) or {}
            raise StoreError(
                f"another store is already serving {path} (pid {state.get('pid', '?')}, "
                f"{state.get('url', 'url unknown')}); stop it with `kill {state.get('pid', '<pid>')}` "
                "or choose another --dir") from None
        yield
    finally:
        os.close(fd)


def _try_flock(fd: int, patience: float) -> bool:
    """Take an exclusive flock, retrying for ``patience`` s: an :func:`is_locked` probe holds it briefly."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def is_locked(directory: Path) -> bool:
    """Whether a live process holds ``directory``'s store lock."""
    if not (directory / LOCK_FILE).exists():
        return False
    fd = os.open(directory / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe lock if we got it
    return False


def read_state(directory: Path) -> dict[str, Any] | None:
    """Contents of ``store.json``, or None."""
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, directory / STATE_FILE)


class RunningStore:
    """A store serving in this process (see :func:`open_store`); ``url`` is where it listens."""

    def __init__(self, directory: Path, host: str, port: int):
        self.dir = directory
        self.engine = Engine(Journal(directory, defaults.STORE_COMPACT_BYTES))
        try:
            self.server = StoreServer(self.engine, host, port)
        except OSError as e:
            self.engine.close()
            raise StoreError(f"cannot listen on {host}:{port}: {e}") from e
        self.url = url_for(host, self.server.port)


@contextlib.contextmanager
def open_store(directory: Path | str | None, host: str = defaults.STORE_HOST, port: int = 0
               ) -> Iterator[RunningStore]:
    """Lock ``directory``, load it and listen; the caller runs ``store.server.serve_forever()``."""
    path = _resolve_dir(directory)
    with _dir_lock(path):
        if not is_loopback(host):
            logger.warning("store: listening on %s, which is not loopback. The embedded store has NO "
                           "authentication: anyone who can reach this port can read and change every "
                           "task. For a team, point task_url at a real MongoDB instead.", host)
        store = RunningStore(path, host, port)
        _write_state(path, {"url": store.url, "pid": os.getpid(), "host": host, "port": store.server.port})
        try:
            yield store
        finally:
            store.server.shutdown()
            store.engine.close()
            state = read_state(path)
            if state and state.get("pid") == os.getpid():
                (path / STATE_FILE).unlink(missing_ok=True)


def serve(dir: Path | None, host: str = defaults.STORE_HOST, port: int = defaults.STORE_PORT,
          idle_exit: float | None = None) -> None:
    """Run a store in the foreground until SIGTERM/SIGINT.

    Args:
        dir: data directory; None means :func:`qlib_ext.defaults.store_dir`.
        host: address to bind; anything but loopback logs a no-authentication warning.
        port: TCP port; 0 picks a free one (the real one goes to ``store.json``).
        idle_exit: exit after this many seconds without any connection (None: never).

    Raises:
        StoreError: the directory is locked by another store, or the address is unusable.
    """
    with open_store(dir, host, port) as store:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: store.server.shutdown())
        logger.warning("store: serving %s at %s (pid %d)", store.dir, store.url, os.getpid())
        store.server.serve_forever(idle_exit=idle_exit)
    logger.warning("store: stopped cleanly")


def ping(url: str, timeout: float = 2.0) -> bool:
    """Whether a MongoDB-protocol server answers ``ping`` at ``url`` (``mongodb://host:port/``)."""
    hostport = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    body = bson.encode({"ping": 1, "$db": "admin"})
    msg = struct.pack("<IB", 0, 0) + body
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(HEADER.pack(HEADER.size + len(msg), 1, 0, OP_MSG) + msg)
            header = sock.recv(HEADER.size, socket.MSG_WAITALL)
            length = HEADER.unpack(header)[0]
            reply = sock.recv(length - HEADER.size, socket.MSG_WAITALL)
        return bson.decode(reply[5:]).get("ok") == 1
    except (OSError, ValueError, struct.error, bson.errors.BSONError):
        return False


def running_url(dir: Path | None = None) -> str | None:
    """URL of the store serving ``dir`` (default dir when None) if it is alive and answers, else None."""
    path = _resolve_dir(dir)
    state = read_state(path)
    if not state or not is_locked(path) or not _pid_alive(int(state.get("pid", -1))):
        return None
    return state["url"] if ping(state["url"]) else None


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(dir: Path | None = None, timeout: float = 10) -> bool:
    """SIGTERM the store serving ``dir`` and wait for it to exit; False if none was running."""
    path = _resolve_dir(dir)
    state = read_state(path)
    if not state or not is_locked(path):
        return False
    pid = int(state["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_locked(path):
            return True
        time.sleep(0.05)
    raise StoreError(f"store pid {pid} in {path} did not stop within {timeout} s")


def resolve_mongo_url(url: str | None) -> str:
    """Turn a task URL into a real one: None or ``"embedded"`` start/find the default-dir store.

    Safe to call from many processes at once: a lock file serialises the starters, so exactly one
    store starts. Any other URL is returned unchanged.
    """
    if url not in (None, "", "embedded"):
        return url
    path = _resolve_dir(None)
    found = running_url(path)
    if found:
        return found
    fd = os.open(path / START_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another process is starting the store
        if found := running_url(path):
            return found
        # MongoDB's own port when it is free, so Qlib's tools (which default to localhost:27017)
        # find the pool without configuration; any free port otherwise.
        if _port_free(defaults.STORE_HOST, defaults.STORE_PORT):
            with contextlib.suppress(StoreError):
                return start_background(path, port=defaults.STORE_PORT)
        return start_background(path)
    finally:
        os.close(fd)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def start_background(directory: Path, timeout: float = defaults.STORE_START_SECONDS, port: int = 0) -> str:
    """Start a detached store process on ``directory`` (``port`` 0: any free one) and return its URL."""
    cmd = [sys.executable, "-m", "qlib_ext.store", "serve", "--dir", str(directory), "--port", str(port),
           "--idle-exit", str(defaults.STORE_IDLE_EXIT_SECONDS)]
    with open(directory / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = running_url(directory)
        if url:
            logger.info("store: started in the background at %s (pid %d, log %s)", url, proc.pid,
                        directory / LOG_FILE)
            return url
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = (directory / LOG_FILE).read_text(errors="replace")[-2000:]
    raise StoreError(f"the embedded store in {directory} did not start (exit code {proc.poll()}); "
                     f"its log says:\n{tail}")
