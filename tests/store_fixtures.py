"""Fixtures for tests that need a task store (owned by the store work).

* ``mongo_url`` - URL of the embedded store the test should use: one real ``python -m qlib_ext.store
  serve`` process for the whole session (started on first use, on its own tmp dir), so tests stay
  apart by database name (``task_db_name``) or, through the CLI's ``default_task_db``, by a pool name
  no other test uses. A test that also asks for ``store_proc`` gets that store's URL instead. When
  ``QLIB_EXT_TEST_MONGO_URL`` is set, that URL (a real MongoDB), with the same isolation rules.
* ``task_db_name`` - a database name no other test uses (dropped afterwards).
* ``store_proc`` - a fresh :class:`StoreProcess` of the test's own (None with a real MongoDB), for
  tests that kill or restart the server: never kill or stop the session store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest

MONGO_URL_ENV = "QLIB_EXT_TEST_MONGO_URL"


class StoreProcess:
    """A store server in a child process, on ``directory``; restartable, killable."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30.0, port: int = 0, args: tuple[str, ...] = (),
              wrapper: tuple[str, ...] = ()) -> str:
        """Start the server (port 0: any free one; ``args``: more ``serve`` flags; ``wrapper``: a command
        it runs under, e.g. ``prlimit --nofile=1024:1024``) and wait until it answers; return its URL
        (with the credentials, as :func:`qlib_ext.store.running_url` gives it)."""
        from qlib_ext.store import running_url

        log = open(self.dir.parent / f"{self.dir.name}.log", "ab")  # noqa: SIM115 - child keeps it
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "qlib_ext.store", "serve", "--dir", str(self.dir), "--port", str(port),
             *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            url = running_url(self.dir)
            if url:
                self.url = url
                return url
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"store did not start (exit code {self.proc.poll()}): {self.log_text()[-2000:]}")

    def log_text(self) -> str:
        """The server's log so far."""
        path = self.dir.parent / f"{self.dir.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill9(self) -> None:
        """SIGKILL the server: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait; return the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return None if self.proc is None else self.proc.returncode


@pytest.fixture(scope="session")
def _session_store(tmp_path_factory):
    """The store every ``mongo_url`` test shares (None when ``QLIB_EXT_TEST_MONGO_URL`` is set)."""
    if os.environ.get(MONGO_URL_ENV):
        yield None
        return
    server = StoreProcess(tmp_path_factory.mktemp("session_store") / "data")
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store_proc(tmp_path_factory):
    """A fresh store server process of this test's own (None when ``QLIB_EXT_TEST_MONGO_URL`` is set)."""
    if os.environ.get(MONGO_URL_ENV):
        yield None
        return
    server = StoreProcess(tmp_path_factory.mktemp("store") / "data")
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mongo_url(request) -> str:
    """URL of the store the test should use (see the module docstring)."""
    if os.environ.get(MONGO_URL_ENV):
        return os.environ[MONGO_URL_ENV]
    if "store_proc" in request.fixturenames:  # the test restarts or kills that one: mongo_url follows it
        return request.getfixturevalue("store_proc").url
    server = request.getfixturevalue("_session_store")
    if server.proc.poll() is not None:  # an earlier test stopped it: say so, and go on with a new one
        warnings.warn(f"the session store exited with {server.proc.returncode}; restarting it "
                      "(a test that stops its store should use store_proc)", stacklevel=1)
        server.start()
    return server.url


@pytest.fixture
def task_db_name(mongo_url):
    """A database name unique to this test; dropped afterwards."""
    import pymongo

    name = f"qlib_ext_test_{uuid.uuid4().hex[:12]}"
    yield name
    try:
        with pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000) as client:
            client.drop_database(name)
    except pymongo.errors.PyMongoError as e:  # e.g. a store_proc test left its store stopped
        warnings.warn(f"could not drop test database {name}: {e}", stacklevel=1)


@pytest.fixture(autouse=True)
def _stop_background_store(_isolated_home):
    """Stop a store that ``resolve_mongo_url('embedded')`` started in this test's home."""
    yield
    store_dir = _isolated_home / "store"
    if (store_dir / "store.json").exists():
        from qlib_ext.store import stop

        stop(store_dir)
