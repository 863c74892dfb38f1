"""``qlib-ext mlflow serve``: MLflow's own tracking server, started with the settings a pool needs.

A thin convenience over ``mlflow server``: an sqlite backend and proxied artifacts in one
directory, so workers on other hosts log runs and upload artifacts over HTTP without a shared
disk. Nothing of the server is re-implemented; the process runs in the foreground and stops with
us (SIGTERM/SIGINT are forwarded to its whole process group).

Locked like the store: MLflow's own basic-auth app is on by default, its admin credentials generated at first
start into ``DIR/mlflow-credentials.json`` (owner-only, :data:`CREDENTIALS_FILE`); a bind beyond loopback
without it is refused; the directory is 0700 and the server runs under umask 077, so its databases, artifacts
and credentials are the owner's only. Clients log in with MLflow's ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, which qlib-ext also takes from a profile's ``mlflow_username`` /
``mlflow_password`` or, for the server's owner, from the credentials file (:func:`export_client_credentials`).

MLflow stores passwords with werkzeug's scrypt hash and, as shipped, checks it on every HTTP request (about 0.2 s of
server CPU each, many per task). The server gets its own auth config (``DIR/basic_auth.ini``, :func:`write_auth_config`)
that turns on MLflow's own cache of successful logins for :data:`~qlib_ext.defaults.MLFLOW_AUTH_CACHE_SECONDS`:
the stored hash stays strong, a wrong password still costs the full check, a right one is checked once per period.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
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

CREDENTIALS_FILE = "mlflow-credentials.json"
"""The server's admin login in its directory: ``{"user": ..., "password": ...}``, mode 0600."""

ADMIN_USER = "qlib-ext"
"""User name of the generated admin login."""

USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
"""MLflow's client login variables (read by every MLflow client, so by Qlib's recorder in a worker)."""

AUTH_CONFIG_FILE = "basic_auth.ini"
"""The server's MLflow auth config in its directory (MLflow's shipped one plus the login cache)."""

AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
"""MLflow's variable naming the auth config; when the operator sets it, their file is used as it is."""


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
          basic_auth: bool = True) -> int:
    """Run the MLflow server in the foreground until it exits or we get SIGTERM/SIGINT.

    Args:
        directory: holds ``mlflow.db`` (runs, params, metrics), ``mlartifacts/`` (artifacts), ``basic_auth.db``
            and ``mlflow-credentials.json``; made owner-only.
        host: address to bind; anything but loopback needs ``basic_auth``.
        port: TCP port.
        workers: server worker processes (1 or 2 is plenty for a pool's workers).
        basic_auth: require MLflow's basic-auth logins (admin login generated into the directory).

    Returns:
        The server's exit code (0 after a forwarded stop signal).

    Raises:
        ConfigError: ``basic_auth`` without MLflow's auth extra installed; a non-loopback ``host`` without it.
    """
    if basic_auth and importlib.util.find_spec("flask_wtf") is None:
        raise ConfigError("the MLflow server's logins need MLflow's auth extra (Flask-WTF): pip install "
                          "'qlib-ext[auth]' (= 'mlflow[auth]'), or --no-auth on loopback")
    if not is_loopback(host) and not basic_auth:
        raise ConfigError(f"refusing to serve MLflow on {host} without authentication: anyone who reaches port "
                          f"{port} could change runs and upload the artifacts workers load; drop --no-auth "
                          "(logins on), or bind 127.0.0.1")
    _owner_only(directory)
    env = dict(os.environ)
    if basic_auth:
        user, password = server_credentials(directory)
        env.update(MLFLOW_AUTH_ADMIN_USERNAME=user, MLFLOW_AUTH_ADMIN_PASSWORD=password)
        # the auth app's Flask secret (CSRF tokens), kept with the login so restarts and workers agree
        secret = json.loads((directory / CREDENTIALS_FILE).read_text()).get("secret_key") or secrets.token_hex(32)
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secret)
        if not env.get(AUTH_CONFIG_ENV):
            env[AUTH_CONFIG_ENV] = str(write_auth_config(directory))
    # Own process group: the server's worker processes get our forwarded signal, not a stray Ctrl-C.
    command = server_command(directory, host, port, workers, basic_auth)
    logger.info("mlflow: running %s", " ".join(command))
    proc = subprocess.Popen(command, cwd=directory, start_new_session=True, env=env, umask=0o077)
    url = client_url(host, port)
    login = (f"\n  logins on: the admin login is in {directory / CREDENTIALS_FILE} (owner-only); other hosts set "
             f"{USER_ENV}/{PASSWORD_ENV} or mlflow_username/mlflow_password in their qlib-ext.toml"
             if basic_auth else "\n  logins off (loopback only)")
    print(f"mlflow server: {url}  (data in {directory})\n"
          f"  workers: --mlflow-uri {url}   or   export MLFLOW_TRACKING_URI={url}{login}", flush=True)
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


def _owner_only(directory: Path) -> None:
    """Make the server directory 0700 and the files at its top 0600 (created before, or by another umask)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    for path in directory.iterdir():
        if path.is_file() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
        elif path.is_dir() and path.stat().st_mode & 0o077:
            path.chmod(0o700)


def write_auth_config(directory: Path, cache_seconds: int | None = None) -> Path:
    """Write ``DIR/basic_auth.ini``: MLflow's shipped auth config with its login cache on.

    Every other setting (default permission, ``basic_auth.db`` in the server's working directory, the
    authorization function) stays MLflow's, read from the installed MLflow so a new release's keys carry over.

    Args:
        directory: the server's directory (its working directory, where ``basic_auth.db`` lives).
        cache_seconds: MLflow's ``auth_cache_ttl_seconds`` (default ``defaults.MLFLOW_AUTH_CACHE_SECONDS``).

    Returns:
        The file's path (mode 0600), for ``MLFLOW_AUTH_CONFIG_PATH``.

    Raises:
        ConfigError: the installed MLflow has no ``server/auth/basic_auth.ini`` (no auth extra).
    """
    import configparser

    from qlib_ext import defaults

    spec = importlib.util.find_spec("mlflow")  # located, not imported (Flask and all)
    shipped = Path(spec.origin if spec and spec.origin else ".").parent / "server" / "auth" / AUTH_CONFIG_FILE
    if not shipped.is_file():
        raise ConfigError(f"MLflow's auth config {shipped} is missing: pip install 'mlflow[auth]'")
    config = configparser.ConfigParser()
    config.read(shipped)
    seconds = defaults.MLFLOW_AUTH_CACHE_SECONDS if cache_seconds is None else cache_seconds
    config.set("mlflow", "auth_cache_ttl_seconds", str(seconds))
    path = directory / AUTH_CONFIG_FILE
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        config.write(f)
    return path


def server_credentials(directory: Path) -> tuple[str, str]:
    """The server's admin ``(user, password)`` from ``DIR/mlflow-credentials.json``, generated (mode 0600) at
    first start. MLflow creates the admin with it when its ``basic_auth.db`` is new.

    Raises:
        ConfigError: the file exists but is not ``{"user": ..., "password": ...}``.
    """
    path = directory / CREDENTIALS_FILE
    if not path.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"user": ADMIN_USER, "password": secrets.token_urlsafe(24),
                       "secret_key": secrets.token_hex(32)}, f)
        os.replace(tmp, path)
        logger.warning("mlflow: generated the server's admin login in %s (owner-only)", path)
    return read_credentials(path)


def read_credentials(path: Path) -> tuple[str, str]:
    """``(user, password)`` from a credentials file.

    Raises:
        ConfigError: not a JSON object with ``user`` and ``password``.
    """
    try:
        data = json.loads(path.read_text())
        return str(data["user"]), str(data["password"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not an MLflow login file ({{\"user\": ..., \"password\": ...}}): {e}") from e


def export_client_credentials(server_dir: Path | None = None) -> None:
    """Set MLflow's client login variables for this process and its workers from the credentials file of this
    user's own server (``server_dir``, default ``$QLIB_EXT_HOME/mlflow-server``) when it is readable, unless the
    environment (or the profile's ``mlflow_username``/``mlflow_password``, :mod:`qlib_ext.profile`) set them."""
    if os.environ.get(USER_ENV) or os.environ.get(PASSWORD_ENV):
        return
    from qlib_ext import defaults

    path = (server_dir or defaults.home() / "mlflow-server") / CREDENTIALS_FILE
    try:
        os.environ[USER_ENV], os.environ[PASSWORD_ENV] = read_credentials(path)
    except (OSError, ConfigError):
        return


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
