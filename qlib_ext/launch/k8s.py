"""``qlib-ext launch k8s``: a Kubernetes ``batch/v1`` Job of ``parallelism`` workers that drain a pool and exit.

Kubernetes' work-queue pattern ("Job with a work queue"): ``completions`` is left unset and every pod runs
``qlib-ext worker --pool P``, which exits 0 once the pool is finished; the Job is complete when one pod has succeeded
and all have ended, and no new pod starts after the first success. ``restartPolicy: OnFailure`` restarts a worker
that crashed; a task it held comes back when its lease expires, as on any host.

Credentials are never in the manifest: the store URL and MLflow URI come from a Secret through
``env[].valueFrom.secretKeyRef`` (keys ``mongo-url``, ``mlflow-uri``). Stopping: Kubernetes sends SIGTERM to the
container's first process, the worker itself, which starts its graceful stop; ``terminationGracePeriodSeconds``
covers the worker's grace period before SIGKILL.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import LaunchError
from qlib_ext.launch import check_launch, launch_dir, stop_margin, worker_args
from qlib_ext.pool.worker_name import K8S_JOB_ENV, K8S_POD_ENV

logger = logging.getLogger(__name__)

MONGO_KEY = "mongo-url"
"""Key of the store URL in the Secret (required)."""

MLFLOW_KEY = "mlflow-uri"
"""Key of the MLflow tracking URI in the Secret (optional: without it, the URI the pool recorded)."""


@dataclass(frozen=True)
class K8sJob:
    """One ``launch k8s``: the Job's pods and what each worker runs."""

    pool: str
    workers: int  # the Job's parallelism: pods at once
    image: str  # a container image with qlib-ext installed (`qlib-ext` on PATH)
    name: str | None = None  # the Job's name; default qlib-ext-<pool> as a DNS label
    namespace: str | None = None
    secret: str = defaults.K8S_SECRET  # the Secret holding mongo-url (and mlflow-uri)
    processes: int = 1  # worker processes per pod
    cpus_per_worker: int | None = None  # CPU request and the processes' threads
    gpus_per_worker: int | None = None  # nvidia.com/gpu limit
    mem: str | None = None  # memory request and limit, Kubernetes syntax (16Gi)
    provider_uri: str | None = None  # the data directory inside the container
    data_claim: str | None = None  # a PersistentVolumeClaim mounted read-only at provider_uri
    grace_seconds: float | None = None  # the workers' grace period after SIGTERM, s (None: the pool's)

    @property
    def job_name(self) -> str:
        """The Job's name: ``name``, else ``qlib-ext-<pool>`` lowered to a DNS-1123 label (63 characters)."""
        if self.name:
            return self.name
        return ("qlib-ext-" + re.sub(r"[^a-z0-9-]+", "-", self.pool.lower()))[:63].strip("-")


def manifest(job: K8sJob) -> dict[str, Any]:
    """The Job as a dict (``yaml.safe_dump`` of it is what ``kubectl apply`` reads)."""
    check_launch(job.pool, job.workers)
    if job.data_claim and not job.provider_uri:
        raise LaunchError("--data-claim needs --provider-uri: the path inside the container to mount the data at")
    labels = {"app.kubernetes.io/name": "qlib-ext", "app.kubernetes.io/component": "worker",
              "app.kubernetes.io/instance": job.job_name}
    meta: dict[str, Any] = {"name": job.job_name, "labels": labels, "annotations": {"qlib-ext/pool": job.pool}}
    if job.namespace:
        meta["namespace"] = job.namespace
    pod: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "terminationGracePeriodSeconds": stop_margin(job.grace_seconds),
        "containers": [_container(job)],
    }
    if job.data_claim:
        pod["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": job.data_claim,
                                                                     "readOnly": True}}]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"parallelism": job.workers, "backoffLimit": 2 * job.workers,
                     "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}}


def _container(job: K8sJob) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "worker", "image": job.image,
        "command": ["qlib-ext", *worker_args(job.pool, job.processes, job.cpus_per_worker, job.provider_uri,
                                              job.grace_seconds)],
        "env": _env(job),
    }
    resources = _resources(job)
    if resources:
        container["resources"] = resources
    if job.data_claim:
        container["volumeMounts"] = [{"name": "data", "mountPath": job.provider_uri, "readOnly": True}]
    return container


def _env(job: K8sJob) -> list[dict[str, Any]]:
    """The Secret's keys by reference, and the Job's and pod's names for the worker's name."""
    def secret(key: str, optional: bool) -> dict[str, Any]:
        return {"secretKeyRef": {"name": job.secret, "key": key, "optional": optional}}

    return [{"name": "QLIB_EXT_MONGO_URL", "valueFrom": secret(MONGO_KEY, False)},
            {"name": "MLFLOW_TRACKING_URI", "valueFrom": secret(MLFLOW_KEY, True)},
            {"name": K8S_JOB_ENV, "value": job.job_name},
            {"name": K8S_POD_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]


def _resources(job: K8sJob) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if job.cpus_per_worker:
        requests["cpu"] = str(job.cpus_per_worker)
    if job.mem:
        requests["memory"] = limits["memory"] = job.mem
    if job.gpus_per_worker:
        limits["nvidia.com/gpu"] = job.gpus_per_worker
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def to_yaml(job: K8sJob) -> str:
    """The manifest as YAML, with a comment saying what it is and where its credentials come from."""
    import yaml  # type: ignore[import-untyped]  # pyyaml ships no stubs

    head = (f"# qlib-ext workers for pool {job.pool}: `qlib-ext launch k8s` wrote this; `kubectl apply -f THIS_FILE`\n"
            f"# runs it. Credentials come from the Secret {job.secret!r} (keys {MONGO_KEY}, {MLFLOW_KEY}), e.g.\n"
            f"#   kubectl create secret generic {job.secret} --from-literal={MONGO_KEY}='mongodb://...'"
            f" --from-literal={MLFLOW_KEY}='http://...'\n")
    return head + yaml.safe_dump(manifest(job), sort_keys=False)


def write(job: K8sJob, path: Path | None = None) -> Path:
    """Write the manifest to ``path`` (default ``$QLIB_EXT_HOME/launch/POOL/k8s-job.yaml``); return the path."""
    path = path or launch_dir(job.pool) / "k8s-job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(job))
    return path


def apply(path: Path) -> str:
    """``kubectl apply -f path``; return what it printed.

    Raises:
        LaunchError: ``kubectl`` is not on PATH, or the apply failed (its message included).
    """
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise LaunchError(f"kubectl not found on PATH: the manifest is in {path}; apply it with "
                          f"`kubectl apply -f {path}` where kubectl reaches the cluster")
    done = subprocess.run([kubectl, "apply", "-f", str(path)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise LaunchError(f"kubectl apply -f {path} failed (exit {done.returncode}): "
                          f"{done.stderr.strip() or done.stdout}")
    logger.info("launch k8s: applied %s", path)
    return done.stdout.strip()
