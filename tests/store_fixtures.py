"""Fixtures for tests that need a task store (owned by the store work).

* ``mongo_url`` - URL of a fresh embedded store: a real ``python -m qlib_ext.store serve`` process
  on a free port with its own tmp dir, stopped after the test. When ``QLIB_EXT_TEST_MONGO_URL`` is
  set, that URL instead (a real MongoDB); tests then stay apart through ``task_db_name``.
* ``task_db_name`` - a database name no other test uses (dropped afterwards on a real MongoDB).
* ``store_proc`` - the :class:`StoreProcess` behind ``mongo_url`` (None with a real MongoDB), for
  tests that kill or restart the server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

MONGO_URL_ENV = "QLIB_EXT_TEST_MONGO_URL"


class StoreProcess:
    """A store server in a child process, on ``directory``; restartable, killable."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30.0, port: int = 0, args: tuple[str, ...] = ()) -> str:
        """Start the server (port 0: any free one; ``args``: more ``serve`` flags) and wait until it
        answers; return its URL (with the credentials, as :func:`qlib_ext.store.running_url` gives it)."""
        from qlib_ext.store import running_url

        log = open(self.dir.parent / f"{self.dir.name}.log", "ab")  # noqa: SIM115 - child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qlib_ext.store", "serve", "--dir", str(self.dir), "--port", str(port), *args],
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


@pytest.fixture
def store_proc(tmp_path_factory):
    """A fresh store server process (None when ``QLIB_EXT_TEST_MONGO_URL`` is set)."""
    if os.environ.get(MONGO_URL_ENV):
        yield None
        return
    server = StoreProcess(tmp_path_factory.mktemp("store") / "data")
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mongo_url(store_proc) -> str:
    """URL of the store the test should use (see the module docstring)."""
    return os.environ.get(MONGO_URL_ENV) or store_proc.url


@pytest.fixture
def task_db_name(mongo_url):
    """A database name unique to this test; dropped afterwards."""
    name = f"qlib_ext_test_{uuid.uuid4().hex[:12]}"
    yield name
    if os.environ.get(MONGO_URL_ENV):
        import pymongo

        with pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000) as client:
            client.drop_database(name)


@pytest.fixture(autouse=True)
def _stop_background_store(_isolated_home):
    """Stop a store that ``resolve_mongo_url('embedded')`` started in this test's home."""
    yield
    store_dir = _isolated_home / "store"
    if (store_dir / "store.json").exists():
        from qlib_ext.store import stop

        stop(store_dir)
