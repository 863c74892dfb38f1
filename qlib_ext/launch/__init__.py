"""Workers on a cluster: ``qlib-ext launch slurm`` submits a SLURM job array whose tasks each run ``qlib-ext
worker --pool P`` (:mod:`~qlib_ext.launch.slurm`); ``qlib-ext launch k8s`` writes (and applies) a Kubernetes
``batch/v1`` Job whose pods do the same (:mod:`~qlib_ext.launch.k8s`). The scheduler only starts workers: the pool
hands out the tasks, and a worker names its scheduler job (:mod:`qlib_ext.pool.worker_name`).

Neither writes a credential: the worker reads the store URL and MLflow URI from its environment or profile, as
any ``qlib-ext worker`` does (SLURM: exported from the submitting shell; Kubernetes: a Secret reference).
"""

from __future__ import annotations

import re
from pathlib import Path

from qlib_ext import defaults
from qlib_ext.errors import ConfigError

_POOL_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_launch(pool: str, workers: int) -> None:
    """Raise ConfigError on a pool name a job script or manifest cannot carry as is, or on fewer than 1 worker."""
    if not _POOL_NAME.fullmatch(pool):
        raise ConfigError(f"pool name {pool!r}: a launched pool's name may hold letters, digits, '_', '.', '-'")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: at least 1 worker")


def stop_margin(grace_seconds: float | None) -> int:
    """Seconds a scheduler's stop should leave a worker: its grace period (default ``defaults.GRACE_SECONDS``) and
    ``defaults.LAUNCH_STOP_MARGIN_SECONDS``."""
    grace = defaults.GRACE_SECONDS if grace_seconds is None else grace_seconds
    return int(grace + defaults.LAUNCH_STOP_MARGIN_SECONDS)


def launch_dir(pool: str) -> Path:
    """Where a launch writes its job script or manifest (and SLURM its logs): ``$QLIB_EXT_HOME/launch/POOL``."""
    return defaults.home() / "launch" / pool


def worker_args(pool: str, processes: int, cpus: int | None, provider_uri: str | None,
                grace_seconds: float | None) -> list[str]:
    """``qlib-ext worker``'s arguments for one launched worker: the pool, its processes, their threads (``cpus``
    shared out), the grace period when one was given (else the pool's ``workers.grace_seconds``) and the data
    directory. Never a store URL or MLflow URI (they may hold a password)."""
    args = ["worker", "--pool", pool, "--workers", str(processes)]
    if grace_seconds is not None:
        args += ["--grace-seconds", f"{grace_seconds:g}"]
    if cpus:
        args += ["--threads", str(max(1, cpus // processes))]
    if provider_uri:
        args += ["--provider-uri", provider_uri]
    return args
