"""What each worker process is given, seen from inside a real task: how the task's own child processes start
(a PyTorch ``DataLoader(num_workers=n)``, Qlib's joblib pools), its thread limits and its devices.

Real parts: ``qlib-ext worker`` in a subprocess (spawned worker processes), the embedded store over a socket,
a sqlite MLflow; the tasks are ``tests/fixtures.py::ProbeModel``, which tags its run with what it saw.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from qlib_ext.api import submit
from qlib_ext.defaults import ALLOWED_MODULES_ENV

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent

PROBE_WORKFLOW = """\
qlib_init:
    provider_uri: {provider}
    region: cn
experiment_name: {pool}
task:
    model:
        class: ProbeModel
        module_path: fixtures
        kwargs: {{}}
    dataset:
        class: TinyDataset
        module_path: fixtures
        kwargs: {{i: 0}}
    record: []
grid:
    pool: {pool}
    params:
        task.dataset.kwargs.i: {points}
"""


def _probe_pool(tmp: Path, provider: Path, mongo_url: str, pool: str, n: int) -> str:
    """Submit ``n`` probe tasks; return the MLflow URI their runs go to."""
    wf = tmp / f"{pool}.yaml"
    wf.write_text(PROBE_WORKFLOW.format(provider=provider, pool=pool, points=list(range(n))))
    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert submit(wf, mongo_url=mongo_url, mlflow_uri=mlflow_uri).new == n
    return mlflow_uri


def _worker(pool: str, mongo_url: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
           ALLOWED_MODULES_ENV: "qlib.,qlib_ext.,fixtures", **(env or {})}
    return subprocess.run([sys.executable, "-m", "qlib_ext", "worker", "--pool", pool, "--mongo-url", mongo_url,
                           "--no-cache", "--exit-when-idle", *flags],
                          capture_output=True, text=True, timeout=300, env=env)


def _probes(mlflow_uri: str, pool: str) -> list[dict[str, str]]:
    """The probe tags of every task run of the pool."""
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(pool)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return [r.data.tags for r in runs if "probe.start_method" in r.data.tags]


def test_a_tasks_own_children_fork_as_under_qrun(tmp_path, synth_provider, mongo_url):
    """Workers are spawned; the processes a task starts itself are forked, as under qrun (issue 23 §1): a spawned
    worker used to hand ``spawn`` down to every DataLoader and joblib pool of its tasks."""
    mlflow_uri = _probe_pool(tmp_path, synth_provider, mongo_url, "children", 1)
    done = _worker("children", mongo_url, "-n", "1", "--threads", "1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (probe,) = _probes(mlflow_uri, "children")
    assert probe["probe.start_method"] == "fork", probe
    assert probe["probe.child_exit"] == "0"
    assert probe["probe.omp_num_threads"] == "1"  # the worker's own thread limits are unchanged
