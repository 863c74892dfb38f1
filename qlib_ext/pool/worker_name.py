"""What a worker's name says: ``host:pid``, and the scheduler job it runs in when a scheduler started it.

A worker started by ``qlib-ext launch slurm`` or ``launch k8s`` (:mod:`qlib_ext.launch`) is named
``host:pid/slurm-<job>_<task>`` or ``host:pid/k8s-<pod>``: the name stamped on the tasks it claims, shown by
``qlib-ext status`` and tagged on its MLflow runs (``pool.record.Tag.WORKER``; the job and task ids also in
``Tag.SCHEDULER``/``SCHEDULER_JOB``/``SCHEDULER_TASK``), so ``squeue``/``kubectl`` and the pool name the same worker.
The suffix holds no ``:``, so ``host`` is still everything before the last ``:``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

K8S_JOB_ENV = "QLIB_EXT_K8S_JOB"
"""Set by the manifest of ``qlib-ext launch k8s``: the Kubernetes Job's name."""

K8S_POD_ENV = "QLIB_EXT_K8S_POD"
"""Set by the manifest of ``qlib-ext launch k8s`` (downward API, ``metadata.name``): the pod's name."""


@dataclass(frozen=True)
class SchedulerJob:
    """The scheduler a worker runs under and its ids there (``job`` = SLURM job / k8s Job, ``task`` = array task
    index / pod name; empty when there is none)."""

    scheduler: str
    job: str
    task: str = ""

    @property
    def label(self) -> str:
        """``slurm-123_4`` (SLURM's own array notation), ``slurm-123``, ``k8s-<pod>``."""
        if not self.task:
            return f"{self.scheduler}-{self.job}"
        if self.task.startswith(self.job + "-"):  # a pod's name is its Job's and a suffix
            return f"{self.scheduler}-{self.task}"
        return f"{self.scheduler}-{self.job}_{self.task}"


def scheduler_job(environ: Mapping[str, str] | None = None) -> SchedulerJob | None:
    """The scheduler job of this process from its environment (SLURM's variables, or those our k8s manifest
    sets), or None outside one."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return SchedulerJob("slurm", env["SLURM_ARRAY_JOB_ID"], env.get("SLURM_ARRAY_TASK_ID", ""))
    if env.get("SLURM_JOB_ID"):
        return SchedulerJob("slurm", env["SLURM_JOB_ID"])
    if env.get(K8S_JOB_ENV):
        pod = env.get(K8S_POD_ENV) or env.get("HOSTNAME", "")
        return SchedulerJob("k8s", env[K8S_JOB_ENV], env.get("JOB_COMPLETION_INDEX") or pod)
    return None


def worker_id(environ: Mapping[str, str] | None = None) -> str:
    """``host:pid`` of the calling process, with ``/<scheduler label>`` when a scheduler started it."""
    job = scheduler_job(environ)
    return f"{socket.gethostname()}:{os.getpid()}" + (f"/{job.label}" if job else "")


def split_worker(worker: str) -> tuple[str, str]:
    """``(host, pid)`` of a worker name (``pid`` as written: may be empty or not a number in a foreign name)."""
    host, _, rest = worker.rpartition(":")
    return host, rest.partition("/")[0]
