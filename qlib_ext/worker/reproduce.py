"""``qlib-ext reproduce RUN_ID``: run a recorded task again and compare its metrics with the recorded ones.

Every task run saves the exact task dict it ran as the MLflow artifact ``task`` (LightGBM's
``num_threads`` pinned by the worker included). Reproducing loads it (as plain data, through the
pool's restricted unpickler), initialises Qlib the way a worker of its pool does, runs it with the
same task body in a new run of the experiment ``<experiment>-reproduce`` (so the pool's own
experiment, its reaper and leaderboard never see it) and compares every metric both runs logged,
except timings and memory.

LightGBM is deterministic for a given seed, data and ``num_threads`` (its default seeds are fixed),
and Qlib's backtest has no randomness: the metrics then match exactly. A model with unseeded
randomness (``bagging`` without ``seed``, PyTorch models) does not.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlib_ext.errors import ConfigError
from qlib_ext.pool.record import META, Tag

logger = logging.getLogger(__name__)

EXPERIMENT_SUFFIX = "-reproduce"
"""Suffix of the experiment reproduced runs go to."""

SKIPPED_PREFIXES = ("time.", "peak_rss_mb", "system/")
"""Metrics that measure the machine, not the result (stage timings, peak memory, MLflow's system metrics): never
compared."""


@dataclass
class Reproduction:
    """The outcome of one reproduction: which run, which new run, and metric by metric differences."""

    run_id: str  # the recorded run
    new_run_id: str  # the reproduced run (experiment <experiment>-reproduce)
    compared: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (recorded, reproduced)
    missing: list[str] = field(default_factory=list)  # recorded metrics the new run did not log
    tolerance: float = 0.0  # largest absolute difference accepted

    @property
    def mismatched(self) -> dict[str, tuple[float, float]]:
        """Metrics whose values differ by more than the tolerance (NaN equals NaN)."""
        return {k: (a, b) for k, (a, b) in self.compared.items() if not _close(a, b, self.tolerance)}

    @property
    def ok(self) -> bool:
        """Every recorded metric was reproduced within the tolerance."""
        return not self.mismatched and not self.missing

    def table(self) -> str:
        """One line per compared metric: name, recorded, reproduced, difference."""
        width = max((len(k) for k in self.compared), default=6)
        lines = [f"{'metric':<{width}}  {'recorded':>22}  {'reproduced':>22}  difference"]
        for name, (a, b) in sorted(self.compared.items()):
            diff = "nan" if math.isnan(a) or math.isnan(b) else f"{b - a:.3g}"
            mark = "" if _close(a, b, self.tolerance) else "  MISMATCH"
            lines.append(f"{name:<{width}}  {a!r:>22}  {b!r:>22}  {diff}{mark}")
        lines += [f"{name}: recorded, not reproduced" for name in self.missing]
        verdict = "exact match" if self.ok and self.tolerance == 0 else "match" if self.ok else "DIFFERENT"
        lines.append(f"run {self.run_id} -> {self.new_run_id}: {len(self.compared)} metrics, {verdict}")
        return "\n".join(lines)


def _close(a: float, b: float, tolerance: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tolerance


def load_task(client: Any, run_id: str, digests: dict | None = None) -> dict:
    """The task dict saved with ``run_id`` (artifact ``task``), checked against the pool's ``digests`` (the
    run's committed ``Outcome.ARTIFACTS``; None: nothing to check against) and decoded as plain data only.

    Raises:
        ConfigError: the run has no ``task`` artifact.
        ArtifactTampered: its bytes are not those the run committed.
    """
    from qlib_ext.pool.codec import loads
    from qlib_ext.tracking.artifacts import check_digest

    with tempfile.TemporaryDirectory(prefix="qlib-ext-reproduce-") as tmp:
        try:
            path = client.download_artifacts(run_id, "task", tmp)
        except Exception as e:
            raise ConfigError(f"run {run_id} has no 'task' artifact to reproduce ({e}); only runs made by "
                              "qlib-ext workers can be reproduced") from e
        check_digest(run_id, "task", path, digests)
        return loads(Path(path).read_bytes(), f"artifact 'task' of run {run_id}")


def committed_digests(settings: Any, run_id: str, task_id: str) -> dict | None:
    """The artifact digests the pool recorded when ``run_id`` was committed; None (with a warning) for a run
    that is not its task's committed run, or one committed before digests were recorded."""
    from bson import ObjectId
    from bson.errors import InvalidId

    from qlib_ext.pool.manager import GridTaskManager, open_db
    from qlib_ext.tracking.artifacts import digest_map

    tm = GridTaskManager(settings.pool, open_db(settings.mongo_url, settings.db_name), migrate=False)
    try:
        key: Any = ObjectId(task_id)
    except (InvalidId, TypeError):
        key = task_id
    if tm.committed_run(key)[1] != run_id:
        logger.warning("reproduce: run %s is not the committed run of task %s in pool %s: the pool does not vouch "
                       "for its artifacts", run_id, task_id, settings.pool)
        return None
    return digest_map(tm.committed_artifacts(key))


def reproduce(run_id: str, *, mlflow_uri: str | None = None, mongo_url: str | None = None,
              provider_uri: str | None = None, tolerance: float = 0.0, cache: bool = True) -> Reproduction:
    """Re-run the task of ``run_id`` in this process and compare the metrics (see the module docstring).

    Args:
        run_id: an MLflow run made by a qlib-ext worker.
        mlflow_uri: tracking URI holding the run (default: qlib-ext's default sqlite DB).
        mongo_url: task store holding the run's pool (its Qlib settings and data identity).
        provider_uri: Qlib data directory, when not the one the pool recorded.
        tolerance: largest absolute metric difference accepted.
        cache: share prepared datasets through qlib-ext's cache (same numbers, faster).

    Raises:
        ConfigError: unknown run, a run without a task artifact or pool tag.
        ArtifactTampered: the run's ``task`` artifact is not the one its pool recorded at commit.
    """
    import mlflow

    from qlib_ext import defaults
    from qlib_ext.pool.allowlist import check_modules
    from qlib_ext.worker.settings import worker_settings

    uri = mlflow_uri or defaults.default_mlflow_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:
        raise ConfigError(f"no run {run_id!r} in the MLflow store {uri} ({e}); pass --mlflow-uri") from e
    pool = run.data.tags.get(Tag.POOL)
    if not pool:
        raise ConfigError(f"run {run_id} has no {Tag.POOL} tag; only runs made by qlib-ext workers can be reproduced")
    settings = worker_settings(pool, mongo_url=mongo_url, mlflow_uri=uri, provider_uri=provider_uri, cache=cache)
    task_id = run.data.tags.get(Tag.TASK_ID, "")
    task = load_task(client, run_id, committed_digests(settings, run_id, task_id))
    check_modules(task, tuple(settings.allowed_modules))  # what a worker of the pool would refuse, refused here
    _warn_if_data_changed(run, task, settings.provider_uri)
    result = _run_like_a_worker(settings, _renamed(task), task_id)
    new = client.get_run(result["run_id"]).data.metrics
    return compare(run_id, result["run_id"], dict(run.data.metrics), dict(new), tolerance)


def _warn_if_data_changed(run: Any, task: dict, provider_uri: str) -> None:
    """A warning when the run's dataset input (data identity and handler config) differs from what the task
    has on this host's data now: the metrics then need not match."""
    from qlib_ext.tracking.datasets import changed_since
    from qlib_ext.worker.settings import data_identity

    change = changed_since(run, task, provider_uri, data_identity(provider_uri))
    if change:
        logger.warning("reproduce: the data changed since the run, so its metrics need not match: %s", change)


def _run_like_a_worker(settings: Any, task: dict, task_id: str) -> dict:
    """Run the task in a spawned process with a worker's ``PYTHONHASHSEED`` and Qlib set-up; its result."""
    import multiprocessing as mp
    import os

    from qlib_ext import defaults

    os.environ.setdefault("PYTHONHASHSEED", defaults.PYTHON_HASH_SEED)
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child, (settings, task, task_id))


def _child(settings: Any, task: dict, task_id: str) -> dict:
    from qlib_ext.worker.attempt import run_outside_pool
    from qlib_ext.worker.loop import init_qlib

    init_qlib(settings)
    return run_outside_pool(settings, task, task_id)


def _renamed(task: dict) -> dict:
    """The task with its experiment and run name marked as a reproduction."""
    task = copy.deepcopy(task)
    meta = task.setdefault(META, {})
    meta["experiment"] = f"{meta.get('experiment') or 'workflow'}{EXPERIMENT_SUFFIX}"
    meta["run_name"] = f"{meta.get('run_name') or 'run'} (reproduced)"
    return task


def compare(run_id: str, new_run_id: str, recorded: dict[str, float], reproduced: dict[str, float],
            tolerance: float = 0.0) -> Reproduction:
    """Compare the recorded metrics with the reproduced ones (timings and memory skipped)."""
    names = [k for k in recorded if not k.startswith(SKIPPED_PREFIXES)]
    compared = {k: (float(recorded[k]), float(reproduced[k])) for k in names if k in reproduced}
    return Reproduction(run_id, new_run_id, compared, [k for k in names if k not in reproduced], tolerance)
