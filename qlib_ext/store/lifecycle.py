"""Starting, finding and stopping a store: the lock on its directory and ``store.json``.

A store directory holds the data (snapshot + journal), ``store.lock`` (held with ``flock`` by the
serving process for its whole life, so the kernel releases it even on ``kill -9``),
``store.json`` (url without credentials, pid, host, port, auth, tls) for clients to find it, and
``credentials.json``. Everything in it is created owner-only (the directory 0700, files 0600):
the journal holds every task, the credentials file the password.

:func:`running_url` and :func:`resolve_mongo_url` return the URL *with* the credentials (and the
TLS options), so every caller connects without knowing there is authentication.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import StoreError
from qlib_ext.store.access import client_url, is_loopback, ping, tls_context, url_for
from qlib_ext.store.auth import Verifier, create_credentials, mask
from qlib_ext.store.engine import Engine
from qlib_ext.store.journal import Journal
from qlib_ext.store.server import StoreServer

logger = logging.getLogger(__name__)

STATE_FILE = "store.json"
LOCK_FILE = "store.lock"
START_LOCK_FILE = "start.lock"
LOG_FILE = "store.log"


def _resolve_dir(directory: Path | str | None) -> Path:
    path = Path(directory).expanduser().resolve() if directory else defaults.store_dir()
    path.mkdir(parents=True, mode=0o700, exist_ok=True)  # exist_ok: resolvers starting at once race here
    return path


_STORE_FILES = re.compile(r"^(snapshot\.bson(\.tmp)?|journal-\d+\.log|store\.(json|lock|log)|start\.lock"
                          r"|credentials\.json|.*\.tmp)$")


def _owner_only(directory: Path) -> None:
    """Make the store's files (and its directory, if it holds nothing else) owner-only.

    Stores written by older versions were world-readable. Files that are not the store's are left
    alone, and so is a directory that holds them (``--dir ~`` must not lock up a home directory).
    """
    others = False
    for path in directory.iterdir():
        if not _STORE_FILES.match(path.name):
            others = True
        elif path.is_file() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    if directory.stat().st_mode & 0o077:
        if others:
            logger.warning("store: %s is readable by others and holds more than the store; the store's "
                           "own files are owner-only", directory)
        else:
            directory.chmod(0o700)


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
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
    tmp.unlink(missing_ok=True)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(json.dumps(state, indent=1))
    os.replace(tmp, directory / STATE_FILE)


class RunningStore:
    """A store serving in this process (see :func:`open_store`); ``url`` is the URL a local client
    uses (credentials included: never log it unmasked)."""

    def __init__(self, directory: Path, host: str, port: int, auth: bool = True,
                 tls: tuple[Path, Path | None, Path | None] | None = None, peer_auth: bool = True):
        self.dir = directory
        verifier = Verifier(create_credentials(directory)) if auth else None
        context = tls_context(tls[0], tls[1]) if tls else None
        self.engine = Engine(Journal(directory, defaults.STORE_COMPACT_BYTES))
        try:
            self.server = StoreServer(self.engine, host, port, verifier=verifier, tls=context,
                                      peer_auth=peer_auth)
        except OSError as e:
            self.engine.close()
            raise StoreError(f"cannot listen on {host}:{port}: {e}") from e
        self.state = {"url": url_for(host, self.server.port), "pid": os.getpid(), "host": host,
                      "port": self.server.port, "auth": auth, "tls": bool(tls)}
        if tls:
            self.state["tls_ca_file"] = str(Path(tls[2] or tls[0]).resolve())
        self.url = client_url(directory, self.state)


@contextlib.contextmanager
def open_store(directory: Path | str | None, host: str = defaults.STORE_HOST, port: int = 0,
               auth: bool = True, tls_cert_file: Path | str | None = None,
               tls_key_file: Path | str | None = None, tls_ca_file: Path | str | None = None,
               peer_auth: bool = True) -> Iterator[RunningStore]:
    """Lock ``directory``, load it and listen; the caller runs ``store.server.serve_forever()``.

    Args:
        directory: data directory; None means :func:`qlib_ext.defaults.store_dir`.
        host: address to bind; anything but loopback requires ``auth``.
        port: TCP port; 0 picks a free one.
        auth: require SCRAM-SHA-256 authentication (credentials generated at first start).
        tls_cert_file: PEM certificate (chain): serve TLS only. Key in it or in ``tls_key_file``.
        tls_key_file: PEM private key of the certificate.
        tls_ca_file: CA file local clients verify the server with (default: the certificate
            itself, right for a self-signed one).
        peer_auth: with ``auth``, let a loopback client that runs as this store's owner in
            without a password (:mod:`qlib_ext.store.peer`), so Qlib's own tools work unconfigured.

    Raises:
        StoreError: the directory is locked, the address is unusable, a non-loopback bind was
            asked for without authentication, or the TLS files cannot be loaded.
    """
    path = _resolve_dir(directory)
    if not is_loopback(host) and not auth:
        raise StoreError(f"refusing to listen on {host} without authentication: anyone who can reach "
                         "that address could read and change every task (and so run code on the "
                         "workers). Drop --no-auth, or bind 127.0.0.1.")
    if tls_key_file and not tls_cert_file:
        raise StoreError("--tls-key-file needs --tls-cert-file")
    with _dir_lock(path):
        _owner_only(path)
        if not is_loopback(host) and not tls_cert_file:
            logger.warning("store: listening on %s without TLS: authentication protects the password, "
                           "but tasks and results cross the network in clear. Use --tls-cert-file/"
                           "--tls-key-file on a LAN.", host)
        tls = (Path(tls_cert_file), Path(tls_key_file) if tls_key_file else None,
               Path(tls_ca_file) if tls_ca_file else None) if tls_cert_file else None
        store = RunningStore(path, host, port, auth=auth, tls=tls, peer_auth=peer_auth)
        _write_state(path, store.state)
        try:
            yield store
        finally:
            store.server.shutdown()
            store.engine.close()
            state = read_state(path)
            if state and state.get("pid") == os.getpid():
                (path / STATE_FILE).unlink(missing_ok=True)


def serve(dir: Path | None, host: str = defaults.STORE_HOST, port: int = defaults.STORE_PORT,
          idle_exit: float | None = None, auth: bool = True, tls_cert_file: Path | str | None = None,
          tls_key_file: Path | str | None = None, tls_ca_file: Path | str | None = None,
          peer_auth: bool = True) -> None:
    """Run a store in the foreground until SIGTERM/SIGINT.

    Args:
        dir: data directory; None means :func:`qlib_ext.defaults.store_dir`.
        host: address to bind; anything but loopback requires authentication.
        port: TCP port; 0 picks a free one (the real one goes to ``store.json``).
        idle_exit: exit after this many seconds without any connection (None: never).
        auth: require authentication (the default); see :func:`open_store` for TLS.
        tls_cert_file: PEM certificate: serve TLS.
        tls_key_file: PEM private key.
        tls_ca_file: CA local clients verify with (default: the certificate).
        peer_auth: the owner's own loopback clients need no password (see :func:`open_store`).

    Raises:
        StoreError: see :func:`open_store`.
    """
    with open_store(dir, host, port, auth=auth, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file,
                    tls_ca_file=tls_ca_file, peer_auth=peer_auth) as store:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: store.server.shutdown())
        logger.warning("store: serving %s at %s (pid %d; authentication %s, TLS %s)", store.dir,
                       mask(store.url), os.getpid(), "on" if auth else "OFF", "on" if tls_cert_file else "off")
        store.server.serve_forever(idle_exit=idle_exit)
    if store.engine.failure:
        raise StoreError(store.engine.failure)
    logger.warning("store: stopped cleanly")


def running_url(dir: Path | None = None) -> str | None:
    """URL (credentials and TLS options included) of the store serving ``dir`` if it is alive and
    answers, else None.

    Raises:
        StoreError: the store requires authentication and this user cannot read its credentials.
    """
    path = _resolve_dir(dir)
    state = read_state(path)
    if not state or not is_locked(path) or not _pid_alive(int(state.get("pid", -1))):
        return None
    if not ping(state["url"], tls=bool(state.get("tls"))):
        return None
    return client_url(path, state)


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
    fd = os.open(path / START_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
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
    with open(os.open(directory / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = running_url(directory)
        if url:
            logger.info("store: started in the background at %s (pid %d, log %s)", mask(url), proc.pid,
                        directory / LOG_FILE)
            return url
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = (directory / LOG_FILE).read_text(errors="replace")[-2000:]
    raise StoreError(f"the embedded store in {directory} did not start (exit code {proc.poll()}); "
                     f"its log says:\n{tail}")
