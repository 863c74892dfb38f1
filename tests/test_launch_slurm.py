"""``qlib-ext launch slurm`` on a real single-node SLURM cluster (munged + slurmctld + slurmd, as root, in a temp dir).

* A 2-task grid's workers start as a 2-task job array and drain the pool: every task done, by a worker named
  ``host:pid/slurm-JOB_TASK``, and every run tagged with the job and array task ids; the job script holds no
  store URL or MLflow URI (the workers read them from the environment sbatch exported).
* ``qlib-ext cancel`` + ``scancel`` while a launched worker runs a task: ``status`` names the SLURM job, the worker
  stops gracefully on SIGTERM, and nothing is left half done (no task running, no run RUNNING).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grid_yaml import write_workflow
from slurm_cluster import SlurmCluster, unavailable

from qlib_ext.pool.record import Doc, Tag

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

GRID = """
grid:
    pool: {pool}
    params:
        task.model.kwargs.num_leaves: [8, 16]
"""

LONG_GRID = """
grid:
    pool: slurm_stop
    params:
        task.model.kwargs.num_leaves: [8, 16, 24]
        task.model.kwargs.num_boost_round: [1000000]
        +task.model.kwargs.early_stopping_rounds: [1000000]
"""
"""Tasks that train for hours: the one running when the worker is stopped is still running then."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def _cli(cluster: SlurmCluster, *args: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "qlib_ext", *args], env=cluster.env(**env), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"qlib-ext {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _launch(cluster: SlurmCluster, tmp_path: Path, pool: str, workers: int, mongo_url: str, mlflow_uri: str,
            *extra: str) -> tuple[str, Path]:
    """``launch slurm``, the store and MLflow given by the environment only; returns the job id and script."""
    out = _cli(cluster, "launch", "slurm", pool, "--workers", str(workers), "--cpus-per-worker", "1",
               "--out", str(tmp_path / "launch"), *extra,
               QLIB_EXT_MONGO_URL=mongo_url, MLFLOW_TRACKING_URI=mlflow_uri)
    match = re.search(r"SLURM job (\d+).*\(script (\S+);", out)
    assert match, out
    return match.group(1), Path(match.group(2))


def _wait(cluster: SlurmCluster, ok, timeout: float, what: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                             for p in sorted((tmp_path / "launch").glob("*.out")))
            pytest.fail(f"{what} not after {timeout}s\n{logs}\n{cluster.logs()}")
        time.sleep(0.5)


def _runs(mlflow_uri: str, pool: str) -> list:
    """The pool's task runs (not the grid's parent run)."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(pool).experiment_id], f"tags.`{Tag.POOL}` = '{pool}'")
    return [r for r in runs if Tag.TASK_ID in r.data.tags]


def test_a_job_array_drains_a_grid_and_names_its_slurm_job(cluster, tmp_path, synth_provider, mongo_url,
                                                            shared_dataset_cache):
    import pymongo

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    wf = write_workflow(tmp_path / "wf.yaml", synth_provider, GRID.format(pool="slurm_grid"))
    assert "2 new of 2" in _cli(cluster, "submit", str(wf), "--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri)

    job, script = _launch(cluster, tmp_path, "slurm_grid", 2, mongo_url, mlflow_uri)
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and f"{sys.executable} -m qlib_ext worker --pool slurm_grid " in text
    assert mongo_url not in text and "mongodb://" not in text and mlflow_uri not in text

    docs = pymongo.MongoClient(mongo_url)["default_task_db"]["slurm_grid"]
    _wait(cluster, lambda: not cluster.queued(job), 600, f"SLURM job {job} finished", tmp_path)
    tasks = list(docs.find({}))
    assert [d[Doc.STATUS] for d in tasks] == ["done", "done"], [d.get(Doc.ERRORS) for d in tasks]
    for d in tasks:
        assert re.fullmatch(rf"[^:/]+:\d+/slurm-{job}_[01]", d[Doc.WORKER]), d[Doc.WORKER]
        assert d[Doc.HOST] == d[Doc.WORKER].split(":")[0]
    runs = _runs(mlflow_uri, "slurm_grid")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    by_task = {str(d[Doc.ID]): d for d in tasks}
    for run in runs:
        tags = run.data.tags
        assert (tags[Tag.SCHEDULER], tags[Tag.SCHEDULER_JOB]) == ("slurm", job)
        assert tags[Tag.SCHEDULER_TASK] in ("0", "1")
        assert tags[Tag.WORKER] == by_task[tags[Tag.TASK_ID]][Doc.WORKER]
        assert tags[Tag.WORKER].endswith(f"/slurm-{job}_{tags[Tag.SCHEDULER_TASK]}")
    # Both array tasks ran a worker (each wrote its log); either may have run both tasks.
    assert sorted(p.name for p in (tmp_path / "launch").glob(f"slurm-{job}_*.out")) == \
        [f"slurm-{job}_0.out", f"slurm-{job}_1.out"]


def test_cancel_and_scancel_stop_a_launched_worker_cleanly(cluster, tmp_path, synth_provider, mongo_url,
                                                           shared_dataset_cache):
    import pymongo

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    wf = write_workflow(tmp_path / "wf.yaml", synth_provider, LONG_GRID)
    _cli(cluster, "submit", str(wf), "--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri)
    job, _ = _launch(cluster, tmp_path, "slurm_stop", 1, mongo_url, mlflow_uri, "--grace-seconds", "0")

    docs = pymongo.MongoClient(mongo_url)["default_task_db"]["slurm_stop"]
    _wait(cluster, lambda: [r.info.status for r in _runs(mlflow_uri, "slurm_stop")] == ["RUNNING"], 300,
          "a task's run RUNNING", tmp_path)
    status = _cli(cluster, "status", "slurm_stop", "--mongo-url", mongo_url)
    assert f"/slurm-{job}_0" in status, status

    assert "2 tasks cancelled" in _cli(cluster, "cancel", "slurm_stop", "--mongo-url", mongo_url)
    subprocess.run(["scancel", job], env=cluster.env(), check=True, timeout=30)  # SIGTERM to the worker
    _wait(cluster, lambda: not cluster.queued(job), 300, f"SLURM job {job} gone", tmp_path)

    # The running task is handed back (waiting: `retry` or another worker runs it), its run ended KILLED.
    states = sorted(d[Doc.STATUS] for d in docs.find({}))
    assert states == ["cancelled", "cancelled", "waiting"], states
    runs = _runs(mlflow_uri, "slurm_stop")
    assert [r.info.status for r in runs] == ["KILLED"], [(r.info.status, r.data.tags) for r in runs]
    assert runs[0].data.tags[Tag.WORKER].endswith(f"/slurm-{job}_0")
