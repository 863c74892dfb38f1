"""``qlib-ext launch slurm``: a SLURM job array whose tasks each run one ``qlib-ext worker --pool P``.

Submitted with ``sbatch``, not submitit: the job script is a plain file the user reads, edits and resubmits
(``sbatch FILE``) without qlib-ext, and the workers need nothing on the compute nodes but qlib-ext itself. submitit
pickles a Python callable and its arguments into a shared folder and unpickles them on the node; our worker is
already a command, so that would add a dependency and an opaque pickle for nothing.

Each array task ``exec``s the worker, so ``scancel`` (SIGTERM to the batch shell, which then *is* the worker) and the
time limit (``--signal=B:TERM@...``, sent that long before it) start the worker's graceful stop: the running task
gets its grace period, then is handed back; the hard SIGKILL comes ``KillWait`` seconds later.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlib_ext.errors import LaunchError
from qlib_ext.launch import check_launch, launch_dir, stop_margin, worker_args

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlurmJob:
    """One ``launch slurm``: what the job array asks of SLURM and what each of its workers runs."""

    pool: str
    workers: int  # array tasks, one worker each (indices 0 .. workers-1)
    max_running: int | None = None  # at most this many array tasks at once (the array's %K); None = no cap
    processes: int = 1  # worker processes per array task (`qlib-ext worker --workers`)
    cpus_per_worker: int | None = None  # --cpus-per-task; the processes share them as threads
    gpus_per_worker: int | None = None  # --gres=gpu:G
    mem: str | None = None  # --mem per array task, SLURM syntax (16G)
    partition: str | None = None
    time: str | None = None  # --time, SLURM syntax (1:00:00, 2-00:00:00)
    provider_uri: str | None = None  # the data directory as the compute nodes see it
    profile: Path | None = None  # the qlib-ext.toml the workers read (a path, never its contents)
    sbatch_args: tuple[str, ...] = ()  # more #SBATCH lines, verbatim (--account=lab, --qos=low)
    grace_seconds: float | None = None  # the workers' grace period after SIGTERM, s (None: the pool's)
    out_dir: Path | None = None  # script and logs; default $QLIB_EXT_HOME/launch/POOL
    python: str = field(default_factory=lambda: sys.executable)  # the interpreter with qlib-ext on the nodes

    @property
    def directory(self) -> Path:
        return (self.out_dir or launch_dir(self.pool)).resolve()


def script(job: SlurmJob) -> str:
    """The job script ``sbatch`` runs: ``#SBATCH`` lines, then ``exec`` of the worker (no credential in it)."""
    check_launch(job.pool, job.workers)
    return "\n".join(["#!/bin/bash", *_header(job), *_directives(job), "", *_body(job), ""])


def _header(job: SlurmJob) -> list[str]:
    return [f"# qlib-ext workers for pool {job.pool}: `qlib-ext launch slurm` wrote this; `sbatch THIS_FILE` runs it",
            "# again. Each array task runs one worker until the pool is finished. No credential is written here:",
            "# the workers read QLIB_EXT_MONGO_URL / MLFLOW_TRACKING_URI from the environment sbatch exports from the",
            "# submitting shell, or from their qlib-ext.toml profile."]


def _directives(job: SlurmJob) -> list[str]:
    cap = f"%{job.max_running}" if job.max_running else ""
    lines = [f"--job-name=qlib-ext-{job.pool}", f"--array=0-{job.workers - 1}{cap}", "--ntasks=1",
             f"--output={job.directory}/slurm-%A_%a.out"]
    if job.cpus_per_worker:
        lines.append(f"--cpus-per-task={job.cpus_per_worker}")
    if job.gpus_per_worker:
        lines.append(f"--gres=gpu:{job.gpus_per_worker}")
    lines += [f"--{name}={value}" for name, value in
              (("mem", job.mem), ("partition", job.partition), ("time", job.time)) if value]
    if job.time:  # SIGTERM to the worker (the batch shell) in time for its grace period before the limit
        lines.append(f"--signal=B:TERM@{stop_margin(job.grace_seconds)}")
    return [f"#SBATCH {shlex.quote(line)}" for line in [*lines, *job.sbatch_args]]


def _body(job: SlurmJob) -> list[str]:
    lines = ["set -eu"]
    if job.profile:
        lines.append(f"export QLIB_EXT_PROFILE={shlex.quote(str(job.profile.resolve()))}")
    args = worker_args(job.pool, job.processes, job.cpus_per_worker, job.provider_uri,
                       job.grace_seconds)
    lines.append(f"exec {shlex.join([job.python, '-m', 'qlib_ext', *args])}")
    return lines


@dataclass(frozen=True)
class Submitted:
    """What ``sbatch`` accepted: the job id of the array and the script it runs."""

    job_id: str
    script: Path


def submit(job: SlurmJob) -> Submitted:
    """Write the job script into the job's directory and submit it with ``sbatch``.

    Raises:
        LaunchError: ``sbatch`` is not on PATH, or it refused the job (its message included).
    """
    text = script(job)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("sbatch not found on PATH: run `qlib-ext launch slurm` on a SLURM login node "
                          "(--dry-run prints the job script without submitting it)")
    job.directory.mkdir(parents=True, exist_ok=True)
    path = job.directory / f"slurm-{time.strftime('%Y%m%d-%H%M%S')}.sh"
    path.write_text(text)
    done = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise LaunchError(f"sbatch {path} failed (exit {done.returncode}): {done.stderr.strip() or done.stdout}")
    job_id = done.stdout.strip().split(";")[0]  # --parsable: "jobid" or "jobid;cluster"
    logger.info("launch slurm: pool %s, job %s, script %s", job.pool, job_id, path)
    return Submitted(job_id=job_id, script=path)
