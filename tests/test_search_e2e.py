"""Search end to end with real processes: ``qlib-ext search`` proposing, ``qlib-ext worker`` processes
running ``fixtures.ChaosModel`` tasks, the embedded store between them; the proposer is killed with
SIGKILL mid-search and started again as two proposers at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from test_search import write_tiny

from qlib_ext.pool.manager import open_db
from qlib_ext.search.trials import TrialStore

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent

GRID = """\
    search: tpe
    n_trials: 8
    batch: 2
    seed: 0
    objective: {metric: IC, direction: maximize}
    params:
        task.model.kwargs.i: {dist: int, low: 0, high: 40}
        task.model.kwargs.seconds: [0.4]
"""


def _cli(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qlib_ext", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_proposer_killed_and_restarted_twice_finishes_exactly_n_trials(tmp_path, synth_provider, mongo_url):
    wf = write_tiny(tmp_path / "kill.yaml", synth_provider, GRID, pool="kill")
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "QLIB_EXT_ALLOWED_MODULES": "qlib.,qlib_ext.,lightgbm,fixtures"}
    common = ["--mongo-url", mongo_url]
    sub = subprocess.run([sys.executable, "-m", "qlib_ext", "submit", str(wf), *common, "--mlflow-uri", mlflow_uri],
                         env=env, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    db = open_db(mongo_url)
    store = TrialStore(db, "kill")
    proposer, second = _cli("search", "kill", *common, env=env), None
    workers = _cli("worker", "--pool", "kill", "-n", "2", *common, env=env)
    try:
        _wait(lambda: sum(d["state"] == "complete" for d in store.all()) >= 2, 240, "two trials to complete")
        proposer.send_signal(signal.SIGKILL)
        proposer.wait(10)
        killed_at = len(store.all())
        assert killed_at < 8
        time.sleep(1.5)  # running trials finish while no proposer runs; the pool's hold keeps workers waiting
        assert workers.poll() is None, "workers exited while the search was held open"
        # started again, twice at once (as on two hosts): they share the rest of the budget
        proposer, second = _cli("search", "kill", *common, env=env), _cli("search", "kill", *common, env=env)
        out, _ = proposer.communicate(timeout=300)
        assert proposer.returncode == 0, out
        out2, _ = second.communicate(timeout=60)
        assert second.returncode == 0, out2
        code = workers.wait(120)
        assert code == 0, workers.stdout.read()
    finally:
        for proc in (proposer, second, workers):
            if proc is not None and proc.poll() is None:
                proc.kill()
    docs = store.all()
    assert [d["number"] for d in docs] == list(range(8))
    assert all(d["state"] == "complete" for d in docs), [d["state"] for d in docs]
    assert "search tpe: 8 of 8 trials" in out and "best IC" in out
    pool = db["kill"]
    assert pool.count_documents({"status": "done"}) == pool.count_documents({}) == len({d["hashes"][0] for d in docs})
    client = mlflow.MlflowClient(mlflow_uri)
    run_ids = {d["outcome"]["run_id"] for d in pool.find({}, {"outcome": 1})}
    tags = [client.get_run(r).data.tags for r in run_ids]
    assert all(t.get("qlib_ext.sampler") == "tpe" and t.get("qlib_ext.trial", "").isdigit() for t in tags)
    for d in docs:  # each trial's value is its task's committed IC (ChaosModel logs IC = i / 1000)
        assert d["value"] == pytest.approx(d["tasks"][0]["model"]["kwargs"]["i"] / 1000)
    # the report draws the search's history: each trial's IC and the best so far, in trial order
    rep = subprocess.run([sys.executable, "-m", "qlib_ext", "report", "kill", *common, "--mlflow-uri", mlflow_uri,
                          "--out", str(tmp_path / "report")], env=env, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Search: the objective of each trial, and the best so far</h2><img alt='search' src='data:image/png" \
        in html
