"""What each worker process is given, seen from inside a real task: how the task's own child processes start
(a PyTorch ``DataLoader(num_workers=n)``, Qlib's joblib pools), its thread limits and its devices.

Real parts: ``qlib-ext worker`` in a subprocess (spawned worker processes), the embedded store over a socket,
a sqlite MLflow; the tasks are ``tests/fixtures.py::ProbeModel``, which tags its run with what it saw.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from qlib_ext.api import submit
from qlib_ext.defaults import ALLOWED_MODULES_ENV
from qlib_ext.pool.record import Tag

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
        kwargs: {kwargs}
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


def _probe_pool(tmp: Path, provider: Path, mongo_url: str, pool: str, n: int, **kwargs: object) -> str:
    """Submit ``n`` probe tasks (``ProbeModel(**kwargs)``); return the MLflow URI their runs go to."""
    wf = tmp / f"{pool}.yaml"
    wf.write_text(PROBE_WORKFLOW.format(provider=provider, pool=pool, points=list(range(n)), kwargs=kwargs or "{}"))
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
    """The tags of every probed task run of the pool."""
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


def test_each_worker_is_given_its_own_device(tmp_path, synth_provider, mongo_url):
    """--gpus 0,1: two workers (one per device), each seeing only its device; the run is tagged with it, the
    threads limits are as without GPUs (issue 23 §2). No GPU is needed: this checks what each worker is given."""
    mlflow_uri = _probe_pool(tmp_path, synth_provider, mongo_url, "gpus", 4)
    done = _worker("gpus", mongo_url, "--gpus", "0,1", "--threads", "1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "starting 2 workers x 1 threads on GPUs 0,1" in done.stdout + done.stderr
    probes = _probes(mlflow_uri, "gpus")
    assert len(probes) == 4
    for probe in probes:
        assert probe["probe.cuda_visible_devices"] in ("0", "1"), probe
        assert probe[Tag.DEVICE] == f"cuda:{probe['probe.cuda_visible_devices']}"
        assert probe["probe.omp_num_threads"] == "1"
    by_worker = {(p["probe.pid"], p["probe.cuda_visible_devices"]) for p in probes}
    assert len({pid for pid, _ in by_worker}) == len(by_worker)  # a worker keeps one device


def _cuda_devices() -> list[tuple[str, str]]:
    """(index, UUID) of this host's GPUs by nvidia-smi; [] without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=60).stdout
    return [tuple(x.strip() for x in line.split(",")) for line in out.splitlines() if "," in line]


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda_devices() or not _torch_has_cuda(),
                    reason="needs an NVIDIA GPU (nvidia-smi) and a CUDA build of torch: this checks that a real "
                           "PyTorch model trains on its worker's device; tests/test_worker_processes.py::"
                           "test_each_worker_is_given_its_own_device checks what each worker is given without one")
def test_a_torch_model_trains_on_its_workers_device(tmp_path, synth_provider, mongo_url):
    """On a GPU host: the task asks for GPU: 0 (Qlib's keyword), its worker was given the host's last device, and
    the model's tensors were on that physical device (same UUID as nvidia-smi reports for it)."""
    index, uuid = _cuda_devices()[-1]
    mlflow_uri = _probe_pool(tmp_path, synth_provider, mongo_url, "cuda", 1, GPU=0)
    done = _worker("cuda", mongo_url, "--gpus", index, "--threads", "1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (probe,) = _probes(mlflow_uri, "cuda")
    assert probe[Tag.DEVICE] == f"cuda:{index}" and probe["probe.cuda_visible_devices"] == index
    assert uuid.removeprefix("GPU-") in probe["probe.cuda_uuid"], (uuid, probe["probe.cuda_uuid"])
