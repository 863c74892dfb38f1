"""``qlib-ext mlflow serve``: MLflow's own tracking server, started with the settings a pool needs.

A thin convenience over ``mlflow server``: an sqlite backend and proxied artifacts in one
directory, so workers on other hosts log runs and upload artifacts over HTTP without a shared
disk. Nothing of the server is re-implemented; the process runs in the foreground and stops with
us (SIGTERM/SIGINT are forwarded to its whole process group).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qlib_ext.errors import ConfigError
from qlib_ext.store.lifecycle import is_loopback

logger = logging.getLogger(__name__)

STOP_SECONDS = 20.0
"""How long the server gets to exit after SIGTERM before it is killed, seconds."""


def server_command(directory: Path, host: str, port: int, workers: int = 1, basic_auth: bool = False) -> list[str]:
    """The ``mlflow server`` command line for a server keeping everything in ``directory``.

    ``basic_auth`` adds MLflow's own basic-auth app (users and permissions in ``basic_auth.db``,
    created in the server's working directory, which :func:`serve` sets to ``directory``).
    """
    directory = directory.resolve()
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
            "--artifacts-destination", str(directory / "mlartifacts"), "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", str(workers),
            *(["--app-name", "basic-auth"] if basic_auth else [])]


def client_url(host: str, port: int) -> str:
    """The URL workers pass as ``--mlflow-uri`` (a wildcard bind needs this host's real address)."""
    shown = "<this-host's-address>" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def serve(directory: Path, host: str = "127.0.0.1", port: int = 5000, workers: int = 1,
          basic_auth: bool = False) -> int:
    """Run the MLflow server in the foreground until it exits or we get SIGTERM/SIGINT.

    Args:
        directory: holds ``mlflow.db`` (runs, params, metrics) and ``mlartifacts/`` (artifacts).
        host: address to bind; anything but loopback gets a no-authentication warning.
        port: TCP port.
        workers: server worker processes (1 or 2 is plenty for a pool's workers).
        basic_auth: require MLflow's basic-auth logins (the first start needs
            ``MLFLOW_AUTH_ADMIN_PASSWORD`` in the environment).

    Returns:
        The server's exit code (0 after a forwarded stop signal).

    Raises:
        ConfigError: ``basic_auth`` without MLflow's auth extra installed.
    """
    if basic_auth and importlib.util.find_spec("flask_wtf") is None:
        raise ConfigError("--basic-auth needs MLflow's auth extra (Flask-WTF): pip install 'qlib-ext[auth]' "
                          "(= 'mlflow[auth]')")
    directory.mkdir(parents=True, exist_ok=True)
    if not is_loopback(host) and not basic_auth:
        logger.warning("mlflow: listening on %s without authentication: anyone who can reach port %d can read "
                       "and change every run. For a shared lab add --basic-auth (MLflow's basic-auth app, "
                       "see docs/multi-machine.md) or keep the port behind a firewall/VPN.", host, port)
    # Own process group: the server's worker processes get our forwarded signal, not a stray Ctrl-C.
    command = server_command(directory, host, port, workers, basic_auth)
    logger.info("mlflow: running %s", " ".join(command))
    proc = subprocess.Popen(command, cwd=directory, start_new_session=True)
    url = client_url(host, port)
    print(f"mlflow server: {url}  (data in {directory})\n"
          f"  workers: --mlflow-uri {url}   or   export MLFLOW_TRACKING_URI={url}", flush=True)
    stopping = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        _signal_group(proc, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        return _wait(proc, stopping)
    finally:
        _signal_group(proc, signal.SIGKILL)  # leftover uvicorn workers, if any


def _wait(proc: subprocess.Popen, stopping: list[int]) -> int:
    """Wait for the server; once a stop was forwarded, give it ``STOP_SECONDS`` to exit, then kill it."""
    deadline = None
    while True:
        try:
            code = proc.wait(timeout=0.5)
            return 0 if stopping else code
        except subprocess.TimeoutExpired:
            pass
        if stopping and deadline is None:
            deadline = time.monotonic() + STOP_SECONDS
        if deadline is not None and time.monotonic() > deadline:
            logger.warning("mlflow: server did not stop within %.0fs; killing it", STOP_SECONDS)
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            return 0


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
