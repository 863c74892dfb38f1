"""One pool, many machines.

* Leases use the store's clock: workers whose wall clocks are an hour apart still agree on when a
  lease expires (in-process, against the embedded store).
* End to end across three network namespaces on this machine (root and ``ip netns`` needed):
  host A (10.77.0.1) runs ``qlib-ext store serve`` and ``qlib-ext mlflow serve``; hosts B (.2) and
  C (.3), each with its own hostname (UTS namespace) and home directory, run one ``qlib-ext
  worker`` against A's addresses. A 4-task grid is done by both; then B is killed -9 mid-task and
  C completes B's task after the lease. All addresses live in namespaces the test creates and
  deletes; nothing leaves the machine.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import pytest
from grid_yaml import write_workflow

from qlib_ext.pool.manager import GridTaskManager, open_db


# ---------------------------------------------------------------------- clock skew (fast)
class _SkewedClock:
    """A stand-in for the ``datetime`` module in :mod:`qlib_ext.pool.manager` whose wall clock is off."""

    def __init__(self, skew: dt.timedelta):
        skewed = type("SkewedDatetime", (dt.datetime,), {
            "now": classmethod(lambda cls, tz=None: dt.datetime.now(tz) + skew)})
        self.module = types.SimpleNamespace(datetime=skewed, timedelta=dt.timedelta, timezone=dt.timezone)


def test_leases_use_the_store_clock_not_a_skewed_worker_clock(mongo_url, task_db_name, monkeypatch):
    db = open_db(mongo_url, task_db_name)
    ahead, behind = GridTaskManager("skew", db), GridTaskManager("skew", db)
    ahead.create_tasks([{"model": {"n": 1}}])

    # `ahead` read the store clock above with a correct wall clock; now its clock steps an hour ahead
    # (an NTP or admin step). `behind` first reads the store clock while an hour slow.
    monkeypatch.setattr("qlib_ext.pool.manager.dt", _SkewedClock(dt.timedelta(hours=1)).module)
    claim = ahead.claim(lease_seconds=2, worker="ahead:1")
    lease_until = db["skew"].find_one({"_id": claim.id})["lease_until"]
    store_now = db.client.admin.command("hello")["localTime"].replace(tzinfo=None)
    assert abs((lease_until - store_now).total_seconds() - 2) < 1.0, "lease stamped in the worker's clock"

    monkeypatch.setattr("qlib_ext.pool.manager.dt", _SkewedClock(dt.timedelta(hours=-1)).module)
    assert behind.reclaim_expired() == [], "a worker with a slow clock reclaimed a live lease"
    assert behind.renew(claim, lease_seconds=2) is True  # the owner renews; still 2 s from store time
    time.sleep(2.5)
    assert [c.id for c in behind.reclaim_expired()] == [claim.id], "an expired lease was not reclaimed"
    assert db["skew"].find_one({"_id": claim.id})["status"] == "waiting"


# ---------------------------------------------------------------------- mlflow serve (fast)
def test_mlflow_server_command_keeps_everything_in_its_directory(tmp_path):
    from qlib_ext.tracking.server import client_url, server_command

    cmd = server_command(tmp_path / "srv", "10.0.0.1", 5001, basic_auth=True)
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    flags = {cmd[i]: cmd[i + 1] for i in range(4, len(cmd) - 1)}  # each flag -> the word after it
    assert flags["--backend-store-uri"] == f"sqlite:///{tmp_path / 'srv' / 'mlflow.db'}"
    assert flags["--artifacts-destination"] == str(tmp_path / "srv" / "mlartifacts") and "--serve-artifacts" in cmd
    assert (flags["--host"], flags["--port"], flags["--app-name"]) == ("10.0.0.1", "5001", "basic-auth")
    assert client_url("0.0.0.0", 5000) == "http://<this-host's-address>:5000"


def test_mlflow_serve_basic_auth_without_the_extra_is_a_clear_error(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from qlib_ext import cli

    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "flask_wtf" else real(name, *a))
    result = CliRunner().invoke(cli.main, ["mlflow", "serve", "--dir", str(tmp_path / "srv")])  # logins by default
    assert result.exit_code == 2 and "pip install 'qlib-ext[auth]'" in result.output
    assert not (tmp_path / "srv").exists()


# ---------------------------------------------------------------------- three hosts (slow, root)
def _netns_unavailable() -> str | None:
    """Why the namespace test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns); CI runs as root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs `ip` (iproute2) and `unshare` (util-linux)"
    probe = f"qxprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


SUBNET = "10.77.0"
"""Private /24 of the test's namespaces: A = .1, B = .2, C = .3 (exists only inside them)."""

STORE_PASSWORD = "multihost-lab-secret"
MLFLOW_LOGIN = {"user": "qlib-ext", "password": "multihost-mlflow-secret"}  # host A's server admin (logins on)
"""Written into A's store directory before the store starts (it keeps existing credentials)."""

STORE_URL = f"mongodb://qlib-ext:{STORE_PASSWORD}@{SUBNET}.1:27017/?authSource=admin"
MLFLOW_URL = f"http://{SUBNET}.1:5000"

SET_HOSTNAME = "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execvp(sys.argv[2], sys.argv[2:])"
"""Run in a fresh UTS namespace: give the 'machine' its own hostname, then become the command."""

PROBE = r"""
import json, os, sys, time, urllib.request
import pymongo
from qlib_ext import defaults
cmd, args = sys.argv[1], sys.argv[2:]
db = pymongo.MongoClient(os.environ["STORE_URL"], serverSelectionTimeoutMS=3000)[defaults.TASK_DB_NAME]
if cmd == "ready":  # the store and the MLflow server answer on A's address
    deadline = time.monotonic() + float(args[0])
    while True:
        try:
            db.client.admin.command("ping")
            urllib.request.urlopen(os.environ["MLFLOW_URL"] + "/health", timeout=3).read()
            break
        except Exception as e:
            if time.monotonic() > deadline:
                sys.exit(f"not ready: {e!r}")
            time.sleep(0.5)
elif cmd == "wait-busy":  # a task of POOL running on HOST, and its MLflow run RUNNING; print the task id
    import mlflow
    client = mlflow.MlflowClient(os.environ["MLFLOW_URL"])
    pool, host, timeout = args[0], args[1], float(args[2])
    deadline = time.monotonic() + timeout
    while (doc := db[pool].find_one({"status": "running", "host": host})) is None or not client.search_runs(
            [client.get_experiment_by_name(pool).experiment_id],
            f"tags.`qlib_ext.task_id` = '{doc['_id']}' and attributes.status = 'RUNNING'"):
        if time.monotonic() > deadline:
            sys.exit(f"no task of {pool} busy on {host} after {timeout}s: "
                     f"{[(d['status'], d.get('host')) for d in db[pool].find()]}")
        time.sleep(0.2)
    print(doc["_id"])
elif cmd == "tasks":
    print(json.dumps([{"id": str(d["_id"]), "status": d["status"], "host": d.get("host"),
                       "worker": d.get("worker"), "attempt": d.get("attempt"),
                       "errors": [{"worker": e["worker"], "error": e["error"]} for e in d.get("errors", [])],
                       "run_id": (d.get("outcome") or {}).get("run_id")} for d in db[args[0]].find()]))
elif cmd == "runs":
    import mlflow
    client = mlflow.MlflowClient(os.environ["MLFLOW_URL"])
    exp = client.get_experiment_by_name(args[0])
    print(json.dumps([{"run_id": r.info.run_id, "status": r.info.status, "experiment": exp.experiment_id,
                       "tags": r.data.tags} for r in client.search_runs([exp.experiment_id])]))
"""


class Lab:
    """Three namespaces on a bridge in A; processes started in them are killed on :meth:`teardown`."""

    def __init__(self, root: Path):
        self.prefix = f"qx{uuid.uuid4().hex[:6]}"  # unique per run; interface names stay <= 15 chars
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def build(self) -> None:
        a = self.ns("a")
        for host in "abc":
            self._ip("netns", "add", self.ns(host))
            self.made.append(self.ns(host))
            self._ip("-n", self.ns(host), "link", "set", "lo", "up")
        self._ip("-n", a, "link", "add", "br0", "type", "bridge")
        self._ip("-n", a, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        self._ip("-n", a, "link", "set", "br0", "up")
        for i, host in ((2, "b"), (3, "c")):
            near, far = f"{self.prefix}{host}0", f"{self.prefix}{host}1"
            self._ip("link", "add", near, "type", "veth", "peer", "name", far)
            self._ip("link", "set", near, "netns", a)
            self._ip("link", "set", far, "netns", self.ns(host))
            self._ip("-n", a, "link", "set", near, "master", "br0", "up")
            self._ip("-n", self.ns(host), "addr", "add", f"{SUBNET}.{i}/24", "dev", far)
            self._ip("-n", self.ns(host), "link", "set", far, "up")

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    def home(self, host: str) -> Path:
        path = self.root / f"host_{host}"
        path.mkdir(exist_ok=True)
        return path

    def argv(self, host: str, *cmd: str) -> list[str]:
        """``cmd`` on ``host``: its network namespace, its own hostname ``host<x>``."""
        return ["ip", "netns", "exec", self.ns(host), "unshare", "--uts", sys.executable, "-c", SET_HOSTNAME,
                f"host{host}", *cmd]

    def env(self, host: str, **extra: str) -> dict[str, str]:
        """Host C logs in to MLflow through its profile; the others through MLflow's own variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QLIB_EXT_", "MLFLOW_"))}
        login = {} if host == "c" else {"MLFLOW_TRACKING_USERNAME": MLFLOW_LOGIN["user"],
                                        "MLFLOW_TRACKING_PASSWORD": MLFLOW_LOGIN["password"]}
        return {**env, "QLIB_EXT_HOME": str(self.home(host)), "PYTHONUNBUFFERED": "1",
                "STORE_URL": STORE_URL, "MLFLOW_URL": MLFLOW_URL, **login, **extra}

    def start(self, host: str, name: str, *cmd: str, **env: str) -> subprocess.Popen:
        """Start a long-running process on ``host`` in its own process group; output to ``name``.log."""
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(self.argv(host, *cmd), env=self.env(host, **env), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        proc.log_name = name
        self.procs.append(proc)
        return proc

    def run(self, host: str, *cmd: str, timeout: float = 300) -> str:
        """Run ``cmd`` on ``host`` to completion; return stdout (fails the test on a non-zero exit)."""
        proc = subprocess.run(self.argv(host, *cmd), env=self.env(host), capture_output=True, text=True,
                              timeout=timeout)
        shown = " ".join(c if len(c) < 100 else "<code>" for c in cmd)
        assert proc.returncode == 0, f"{shown} on host {host} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def probe(self, host: str, *args: str, timeout: float = 300) -> str:
        return self.run(host, sys.executable, "-c", PROBE, *args, timeout=timeout)

    def probe_start(self, host: str, *args: str) -> subprocess.Popen:
        """Start a probe in the background (to be watching before the event it waits for)."""
        proc = subprocess.Popen(self.argv(host, sys.executable, "-c", PROBE, *args), env=self.env(host),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def qlib_ext(self, host: str, *args: str) -> str:
        return self.run(host, sys.executable, "-m", "qlib_ext", *args)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait(self, proc: subprocess.Popen, timeout: float) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.log_name} still running after {timeout}s:\n{self.log(proc.log_name)[-3000:]}")

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal ``proc``'s whole process group (a worker group and its worker processes)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def teardown(self) -> None:
        for proc in self.procs:
            self.kill(proc, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill(proc)
                proc.wait(10)
        for name in self.made:  # deleting a namespace deletes its veth ends and the bridge
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.fixture
def lab(tmp_path):
    reason = _netns_unavailable()
    if importlib.util.find_spec("flask_wtf") is None:
        pytest.skip(reason="host A's MLflow server needs logins on a LAN address: MLflow's auth extra (Flask-WTF)")
    if reason:
        pytest.skip(reason=f"the three-host test needs root and working `ip netns`: {reason}")
    lab = Lab(tmp_path)
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()


def _start_hosts_a(lab: Lab) -> None:
    store_dir = lab.home("a") / "store"
    store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (store_dir / "credentials.json").write_text(json.dumps({"user": "qlib-ext", "password": STORE_PASSWORD}))
    (store_dir / "credentials.json").chmod(0o600)
    lab.start("a", "store", sys.executable, "-m", "qlib_ext", "store", "serve", "--host", f"{SUBNET}.1",
              "--port", "27017", "--dir", str(lab.home("a") / "store"))
    mlflow_dir = lab.home("a") / "mlflow"
    mlflow_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (mlflow_dir / "mlflow-credentials.json").write_text(json.dumps(MLFLOW_LOGIN))
    (mlflow_dir / "mlflow-credentials.json").chmod(0o600)
    lab.start("a", "mlflow", sys.executable, "-m", "qlib_ext", "mlflow", "serve", "--host", f"{SUBNET}.1",
              "--port", "5000", "--dir", str(lab.home("a") / "mlflow"))
    lab.probe("b", "ready", "240", timeout=300)  # reached from B: across the bridge, not loopback


def _worker_b(lab: Lab, pool: str, provider: Path, *flags: str) -> subprocess.Popen:
    """Host B: configuration by flags."""
    return lab.start("b", f"worker_b_{pool}", sys.executable, "-m", "qlib_ext", "worker", "--pool", pool, "-n", "1",
                     "--threads", "1", "--mongo-url", STORE_URL, "--mlflow-uri", MLFLOW_URL,
                     "--provider-uri", str(provider), "--lease-seconds", "5", "--heartbeat-seconds", "1", *flags)


def _worker_c(lab: Lab, pool: str, profile: Path) -> subprocess.Popen:
    """Host C: configuration from a qlib-ext.toml profile (a one-line launcher)."""
    return lab.start("c", f"worker_c_{pool}", sys.executable, "-m", "qlib_ext", "worker", "--pool", pool,
                     QLIB_EXT_PROFILE=str(profile))


def _tasks(lab: Lab, pool: str) -> list[dict]:
    return json.loads(lab.probe("a", "tasks", pool))


def _runs(lab: Lab, experiment: str) -> dict[str, dict]:
    return {r["run_id"]: r for r in json.loads(lab.probe("a", "runs", experiment))}


GRID = """
grid:
    pool: {pool}
    params:
        task.model.kwargs.learning_rate: {rates}
        task.model.kwargs.num_leaves: {leaves}
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_pool_on_three_hosts(lab, tmp_path, synth_provider):
    started = time.monotonic()
    _start_hosts_a(lab)
    profile = tmp_path / "host_c.toml"
    profile.write_text(f'mongo_url = "{STORE_URL}"\nmlflow_uri = "{MLFLOW_URL}"\nprovider_uri = "{synth_provider}"\n'
                       f'workers = 1\nthreads = 1\nlease_seconds = 5\nheartbeat_seconds = 1\n'
                       f'mlflow_username = "{MLFLOW_LOGIN["user"]}"\nmlflow_password = "{MLFLOW_LOGIN["password"]}"\n')
    mlflow_dir = lab.home("a") / "mlflow"

    # Phase 1: a 4-task grid, submitted on A, drained by B and C (two tasks each if they keep pace).
    wf = write_workflow(tmp_path / "mh_grid.yaml", synth_provider,
                        GRID.format(pool="mh_grid", rates="[0.05, 0.1]", leaves="[8, 16]"))
    assert "4 new of 4" in lab.qlib_ext("a", "submit", str(wf), "--mongo-url", STORE_URL, "--mlflow-uri", MLFLOW_URL)
    b, c = _worker_b(lab, "mh_grid", synth_provider), _worker_c(lab, "mh_grid", profile)
    assert lab.wait(b, 400) == 0, lab.log(b.log_name)[-3000:]
    assert lab.wait(c, 400) == 0, lab.log(c.log_name)[-3000:]
    tasks = _tasks(lab, "mh_grid")
    assert [t["status"] for t in tasks] == ["done"] * 4
    assert {t["host"] for t in tasks} == {"hostb", "hostc"}, "both hosts should have done tasks"
    runs = _runs(lab, "mh_grid")
    for t in tasks:
        run = runs[t["run_id"]]
        assert run["status"] == "FINISHED"
        assert run["tags"]["qlib_ext.host"] == t["host"] and run["tags"]["qlib_ext.worker"] == t["worker"]
        # --serve-artifacts: the prediction went over HTTP into A's directory.
        assert any((mlflow_dir / "mlartifacts" / run["experiment"] / t["run_id"] / "artifacts").iterdir())
    phase1 = time.monotonic() - started

    # Phase 2: B is killed -9 mid-task (its MLflow run is going); C, started afterwards, completes the
    # task once B's 5 s lease has expired.
    wf2 = write_workflow(tmp_path / "mh_kill.yaml", synth_provider, GRID.format(pool="mh_kill", rates="[0.1]",
                                                                               leaves="[8]"))
    assert "1 new of 1" in lab.qlib_ext("a", "submit", str(wf2), "--mongo-url", STORE_URL, "--mlflow-uri", MLFLOW_URL)
    watch = lab.probe_start("a", "wait-busy", "mh_kill", "hostb", "240")
    # --no-cache: B builds its dataset (seconds), so it is surely still busy when the probe sees its run.
    b = _worker_b(lab, "mh_kill", synth_provider, "--no-cache")
    out, err = watch.communicate(timeout=300)
    assert watch.returncode == 0, err
    lab.kill(b)
    b_task = out.strip()
    assert lab.wait(b, 30) == -signal.SIGKILL
    # Nobody has swept yet: the task still shows as running on B.
    status = lab.qlib_ext("a", "status", "mh_kill", "--mongo-url", STORE_URL)
    assert "running 1" in status and "running on hostb:" in status and b_task in status, status
    c = _worker_c(lab, "mh_kill", profile)
    assert lab.wait(c, 400) == 0, lab.log(c.log_name)[-3000:]

    tasks = {t["id"]: t for t in _tasks(lab, "mh_kill")}
    assert [t["status"] for t in tasks.values()] == ["done"]
    taken = tasks[b_task]
    assert taken["worker"].startswith("hostc:") and taken["attempt"] == 2
    assert taken["errors"][0]["worker"].startswith("hostb:") and "lease expired" in taken["errors"][0]["error"]
    runs = _runs(lab, "mh_kill")
    for t in tasks.values():
        assert runs[t["run_id"]]["status"] == "FINISHED" and runs[t["run_id"]]["tags"]["qlib_ext.host"] == "hostc"
    killed = [r for r in runs.values() if r["tags"].get("qlib_ext.host") == "hostb"]
    assert len(killed) == 1 and killed[0]["status"] == "KILLED", "B's run must not stay RUNNING"
    print(f"\nmultihost: phase 1 (servers + 4 tasks on 2 hosts) {phase1:.0f}s, total {time.monotonic() - started:.0f}s")
