"""``qlib-ext launch slurm|k8s``: workers for a pool on a cluster scheduler (:mod:`qlib_ext.launch`)."""

from __future__ import annotations

from pathlib import Path

import click

from qlib_ext import defaults
from qlib_ext.cli.app import _Group, echo, main, pool_name

_COMMON = [
    click.argument("pool", callback=pool_name),
    click.option("--workers", "-n", type=click.IntRange(min=1), required=True,
                 help="Workers to start (SLURM: array tasks; Kubernetes: the Job's parallelism)."),
    click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Worker processes in each (qlib-ext worker --workers)."),
    click.option("--cpus-per-worker", type=click.IntRange(min=1), default=None,
                 help="CPUs per worker; its processes share them as threads."),
    click.option("--gpus-per-worker", type=click.IntRange(min=1), default=None, help="GPUs per worker."),
    click.option("--mem", default=None, help="Memory per worker (SLURM: 16G; Kubernetes: 16Gi)."),
    click.option("--provider-uri", default=None, help="The Qlib data directory as the workers see it."),
    click.option("--grace-seconds", type=click.FloatRange(min=0), default=None,
                 help=f"The workers' grace period after SIGTERM, s; the scheduler's stop is timed for it (default: "
                      f"the pool's workers.grace_seconds, {defaults.GRACE_SECONDS:g})."),
]


def _common(f):  # type: ignore[no-untyped-def]
    for decorator in reversed(_COMMON):
        f = decorator(f)
    return f


@main.group(cls=_Group)
def launch() -> None:
    """Start workers for a pool on a cluster: a SLURM job array or a Kubernetes Job (docs/multi-machine.md).

    No store or MLflow credential is written into the job: the workers read them from their environment or
    profile, as `qlib-ext worker` does."""


@launch.command("slurm")
@_common
@click.option("--max-running", type=click.IntRange(min=1), default=None,
              help="At most K array tasks at once (--array=0-N%K).")
@click.option("--partition", default=None, help="SLURM partition.")
@click.option("--time", default=None,
              help="Time limit per worker (SLURM syntax, 4:00:00); the worker gets SIGTERM before it.")
@click.option("--sbatch", "sbatch_args", multiple=True, metavar="ARG",
              help="More sbatch options, verbatim (repeatable): --sbatch=--account=lab.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the job script and logs (default: $QLIB_EXT_HOME/launch/POOL).")
@click.option("--dry-run", is_flag=True, help="Print the job script; submit nothing.")
@click.pass_context
def slurm_cmd(ctx: click.Context, pool: str, workers: int, dry_run: bool, **opts: object) -> None:
    """Submit a SLURM job array whose WORKERS tasks each run `qlib-ext worker --pool POOL` (sbatch)."""
    from qlib_ext.launch.slurm import SlurmJob, script, submit

    profile = ctx.find_root().params.get("profile_path")
    job = SlurmJob(pool=pool, workers=workers, profile=profile, **opts)  # type: ignore[arg-type]
    if dry_run:
        echo(script(job), nl=False)
        return
    done = submit(job)
    echo(f"pool {pool}: SLURM job {done.job_id}, {workers} workers (script {done.script}; "
               f"logs {job.directory}/slurm-{done.job_id}_*.out)")
    echo(f"stop: qlib-ext cancel {pool} && scancel {done.job_id}")


@launch.command("k8s")
@_common
@click.option("--image", required=True, help="Container image with qlib-ext installed.")
@click.option("--name", default=None, help="The Job's name (default: qlib-ext-POOL).")
@click.option("--namespace", default=None, help="Kubernetes namespace (default: kubectl's current one).")
@click.option("--secret", default=defaults.K8S_SECRET, show_default=True,
              help="Secret with the keys mongo-url and (optional) mlflow-uri.")
@click.option("--data-claim", default=None, help="PersistentVolumeClaim with the data, mounted at --provider-uri.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Manifest file (default: $QLIB_EXT_HOME/launch/POOL/k8s-job.yaml).")
@click.option("--apply", "do_apply", is_flag=True, help="Also `kubectl apply -f` the manifest.")
@click.option("--dry-run", is_flag=True, help="Print the manifest; write and apply nothing.")
def k8s_cmd(pool: str, workers: int, out: Path | None, do_apply: bool, dry_run: bool, **opts: object) -> None:
    """Write a Kubernetes Job whose WORKERS pods each run `qlib-ext worker --pool POOL` (and apply it)."""
    from qlib_ext.launch.k8s import K8sJob, apply, to_yaml, write

    job = K8sJob(pool=pool, workers=workers, **opts)  # type: ignore[arg-type]
    if dry_run:
        echo(to_yaml(job), nl=False)
        return
    path = write(job, out)
    echo(f"pool {pool}: Kubernetes Job {job.job_name}, parallelism {workers}: {path}")
    if do_apply:
        echo(apply(path))
    else:
        echo(f"start: kubectl apply -f {path}")
    echo(f"stop: qlib-ext cancel {pool} && kubectl delete job {job.job_name}")
