"""``qlib-ext mlflow serve`` as another local user sees it (issue 20 §3): logins on by default, so ``nobody``
creates no experiment and uploads no artifact; the server's files are the owner's only; a bind beyond loopback
without logins is refused. ``nobody`` runs plain-stdlib Python (root's virtualenv is not readable to it)."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from other_user import nobody_python

NOBODY_CLIENT = r"""
import json, sys, urllib.error, urllib.request
base, secret = sys.argv[1], sys.argv[2]

def call(method, path, body=b"", headers=None):
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        return urllib.request.urlopen(req, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code

out = {
    "create": call("POST", "/api/2.0/mlflow/experiments/create", json.dumps({"name": "nobody"}).encode(),
                   {"Content-Type": "application/json"}),
    "upload": call("PUT", "/api/2.0/mlflow-artifacts/artifacts/0/x/pred.pkl", b"\x80\x04N."),
    "search": call("GET", "/api/2.0/mlflow/experiments/search?max_results=10"),
}
try:
    open(secret).read()
    out["secret"] = "read"
except OSError as e:
    out["secret"] = type(e).__name__
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow serve exited: {log.read_text()[-3000:]}"
        try:
            if urllib.request.urlopen(base + "/health", timeout=3).status == 200:
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow serve did not come up: {log.read_text()[-3000:]}")


def _owner_create(base: str, user: str, password: str) -> int:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(base + "/api/2.0/mlflow/experiments/create", method="POST",
                                 data=json.dumps({"name": "owner"}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    return urllib.request.urlopen(req, timeout=30).status


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One ``qlib-ext mlflow serve`` (logins on, defaults) for this file's server tests: ``(directory, url, proc)``;
    started once, since a server start costs seconds of CPU."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs its auth extra (Flask-WTF)")
    root = tmp_path_factory.mktemp("mlflow-serve")
    directory, port, log = root / "srv", _free_port(), root / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen([sys.executable, "-m", "qlib_ext", "mlflow", "serve", "--dir", str(directory),
                             "--port", str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log)
        yield directory, base, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


@pytest.mark.slow
def test_another_user_cannot_create_an_experiment_or_upload_and_the_files_are_the_owners(served):
    directory, base, _proc = served
    nobody = nobody_python()
    creds = json.loads((directory / "mlflow-credentials.json").read_text())
    assert _owner_create(base, creds["user"], creds["password"]) == 200  # the owner's login works
    directory.parent.chmod(0o755)  # nobody may reach the directory's door, not what is behind it
    done = subprocess.run([*nobody, NOBODY_CLIENT, base, str(directory / "mlflow-credentials.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {"create": 401, "upload": 401, "search": 401, "secret": "PermissionError"}, seen
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("mlflow.db", "basic_auth.db", "mlflow-credentials.json", "basic_auth.ini"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name


def _server_env(serve_pid: int) -> dict[str, str]:
    """The environment of the ``mlflow server`` process that ``qlib-ext mlflow serve`` (``serve_pid``) started."""
    child = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()[0]
    raw = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


def _login_status(base: str, user: str, password: str) -> int:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(base + "/api/2.0/mlflow/experiments/search?max_results=5",
                                 headers={"Authorization": f"Basic {token}"})
    try:
        return urllib.request.urlopen(req, timeout=60).status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_the_server_checks_a_login_once_per_period_not_on_every_request(served, monkeypatch):
    """MLflow checks the scrypt hash of the password on every request unless its login cache is on (~0.2 s of
    server CPU per request, many per task: the three-host test took 3x as long). The running server must have
    the cache configured; right logins pass, and a wrong one is refused every time (failures are never cached)."""
    from mlflow.server.auth.config import read_auth_config

    from qlib_ext import defaults

    directory, base, proc = served
    server_env = _server_env(proc.pid)
    assert server_env.get("MLFLOW_AUTH_CONFIG_PATH") == str(directory / "basic_auth.ini"), sorted(server_env)
    assert stat.S_IMODE((directory / "basic_auth.ini").stat().st_mode) == 0o600
    creds = json.loads((directory / "mlflow-credentials.json").read_text())
    statuses = [_login_status(base, creds["user"], creds["password"]) for _ in range(3)]
    statuses += [_login_status(base, creds["user"], creds["password"] + "x") for _ in range(2)]
    statuses += [_login_status(base, creds["user"], creds["password"])]
    assert statuses == [200, 200, 200, 401, 401, 200], statuses
    # MLflow reads the file as it reads its own: the cache on, every other setting MLflow's shipped one
    for name in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    shipped = read_auth_config()
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(directory / "basic_auth.ini"))
    ours = read_auth_config()
    assert ours.auth_cache_ttl_seconds == defaults.MLFLOW_AUTH_CACHE_SECONDS > 0
    assert ours._replace(auth_cache_ttl_seconds=shipped.auth_cache_ttl_seconds) == shipped


def test_a_lan_bind_without_logins_is_refused(tmp_path):
    from click.testing import CliRunner

    from qlib_ext import cli

    result = CliRunner().invoke(cli.main, ["mlflow", "serve", "--no-auth", "--host", "0.0.0.0",
                                           "--dir", str(tmp_path / "srv")])
    assert result.exit_code == 2 and "refusing to serve MLflow on 0.0.0.0 without authentication" in result.output
    assert not (tmp_path / "srv").exists()


def test_workers_log_in_from_the_profile_or_the_owners_server_directory(tmp_path, monkeypatch):
    from qlib_ext import cli
    from qlib_ext.profile import load_default_map
    from qlib_ext.tracking.server import export_client_credentials, server_credentials

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    profile = tmp_path / "qlib-ext.toml"
    profile.write_text('mlflow_uri = "http://tasks.lab:5000"\nmlflow_username = "lab"\nmlflow_password = "s3cret"\n')
    assert load_default_map(cli.main, profile)["worker"]["mlflow_uri"] == "http://tasks.lab:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("lab", "s3cret")

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    user, password = server_credentials(tmp_path / "srv")  # the owner's own server, on this host
    assert stat.S_IMODE((tmp_path / "srv" / "mlflow-credentials.json").stat().st_mode) == 0o600
    export_client_credentials(tmp_path / "srv")
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (user, password)
