"""Worker settings: the dataclass a worker process receives, derived once from the pool's metadata.

Precedence of a setting: explicit argument (CLI flag, env, profile) > the workflow's ``workers:`` as recorded
in the pool at submit > :mod:`qlib_ext.defaults`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import ConfigError
from qlib_ext.pool.record import PoolMeta
from qlib_ext.workflow.spec import WorkersSpec

logger = logging.getLogger(__name__)

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
"""Thread-pool sizes set in each worker so that workers x threads stays within the cores."""

FROM_POOL = ("lease_seconds", "heartbeat_seconds", "grace_seconds", "task_timeout", "fast_backtest", "gpus",
             "workers_per_gpu")
"""``WorkerSettings`` fields taken from the pool's recorded ``workers:`` section (``WorkersSpec`` fields of the
same name, whose defaults come from :mod:`qlib_ext.defaults`) unless a flag sets them."""


@dataclass
class WorkerSettings:
    """Everything a worker process needs; plain data so it crosses the process boundary."""

    pool: str
    mongo_url: str  # resolved MongoDB URL (never "embedded": the parent resolves it)
    mlflow_uri: str  # MLflow tracking URI (sqlite:///... or http://...)
    provider_uri: str  # Qlib data directory
    region: str = "cn"  # Qlib region of the data
    db_name: str = field(default_factory=defaults.task_db_name)  # MongoDB database holding the pools
    # the FROM_POOL knobs: meaning, unit and default are WorkersSpec's
    lease_seconds: float = WorkersSpec.lease_seconds
    heartbeat_seconds: float = WorkersSpec.heartbeat_seconds
    grace_seconds: float = WorkersSpec.grace_seconds
    task_timeout: float | None = WorkersSpec.task_timeout  # None: no limit, the task runs in-process
    max_attempts: int | None = None  # overrides the limit stamped on tasks at submit (None: keep it)
    threads: int = 1  # threads per worker for LightGBM / OpenMP / BLAS
    exit_when_idle: bool = False  # exit as soon as nothing is waiting (else: when nothing is unfinished)
    cache_dir: str | None = None  # shared prepared-dataset cache directory (None: no cache)
    log_dir: str | None = None  # worker stdout/stderr go to LOG_DIR/worker-<pid>.log (None: inherit)
    log_level: int = logging.WARNING  # level of the worker's log output
    start_after: str | None = None  # claim nothing until this file exists (the cache warmer's signal)
    qlib_kwargs: dict = field(default_factory=dict)  # further qlib.init arguments from the workflow
    fast_backtest: bool = defaults.FAST_BACKTEST  # PortAnaRecord backtests on qlib_ext.backtest's fast path
    allowed_modules: tuple[str, ...] = defaults.ALLOWED_MODULES  # module prefixes a task may name (pool/allowlist.py)
    gpus: tuple[str, ...] = ()  # the group's GPU ids (worker/gpus.py); () = started without GPUs
    workers_per_gpu: int = 1  # workers sharing each device
    device: str | None = None  # this worker's GPU id (set per process by the group); None: none of its own
    experiment: str | None = None  # MLflow experiment of tasks Qlib submitted (no qlib_ext block); None: pool name
    trainer: str = "rm"  # a pool Qlib made: whose worker() to stand in for, "rm" or "delay" (pool.status.Trainer)


def auto_threads(workers: int, cores: int | None = None) -> int:
    """Threads per worker so that ``workers * threads <= cores`` (at least 1)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers))


def limit_threads(task: dict, threads: int) -> dict:
    """Pin LightGBM's ``num_threads`` in the task's model kwargs unless the workflow set it."""
    model = task.get("model", {})
    if "LGB" in str(model.get("class", "")):
        kwargs = model.setdefault("kwargs", {})
        if "num_threads" not in kwargs and "n_jobs" not in kwargs:
            kwargs["num_threads"] = threads
    return task


# ---------------------------------------------------------------------- process entry

def data_identity(provider_uri: str) -> dict:
    """What must match between the submitter's data and a worker's: calendar range, instrument count."""
    from qlib_ext.data.qlib_format import calendar_days

    root = Path(provider_uri)
    days = calendar_days(root)
    instruments = root / "instruments" / "all.txt"
    n = sum(1 for line in instruments.read_text().splitlines() if line.strip()) if instruments.exists() else None
    return {"calendar_start": days[0], "calendar_end": days[-1], "days": len(days), "instruments": n}


_DATA_FIX = ("pass --provider-uri (or QLIB_EXT_PROVIDER_URI, or provider_uri in qlib-ext.toml) naming this host's "
             "mount of the submitted dataset: every worker host needs the same data on a shared path (e.g. NFS) "
             "or an identical copy")


def check_worker_data(pool: str, meta: PoolMeta, provider_uri: str | None = None) -> str:
    """The data directory a worker of ``pool`` uses, checked against the data the pool was submitted with.

    Args:
        pool: pool name (for messages).
        meta: the pool's metadata (:func:`qlib_ext.pool.manager.load_pool_meta`).
        provider_uri: this host's override; None uses the path recorded at submit.

    Returns:
        The resolved data directory.

    Raises:
        ConfigError: the directory is not a Qlib dataset here, or its calendar range or instrument
            count differs from the submitted one (both sides and the fix are named).
    """
    from qlib_ext.data.qlib_format import calendar_path

    origin = "--provider-uri" if provider_uri else "the path recorded at submit"
    if not provider_uri and not meta.provider_uri:
        raise ConfigError(f"pool {pool} was made by Qlib (TrainerRM/TaskManager; no qlib-ext metadata): pass "
                          f"--provider-uri (or QLIB_EXT_PROVIDER_URI, or provider_uri in qlib-ext.toml) naming the "
                          f"Qlib data directory its tasks read")
    path = Path(str(provider_uri or meta.provider_uri)).expanduser().resolve()
    if not calendar_path(path).is_file():
        raise ConfigError(f"pool {pool}: data directory {path} ({origin}) is not a Qlib dataset on this host "
                          f"(no calendars/day.txt); {_DATA_FIX}")
    want = meta.data
    if not want:  # pools submitted before data identities were recorded
        return str(path)
    have = data_identity(str(path))
    if any(have.get(k) != v for k, v in want.items()):
        where = f"{meta.provider_uri} on {meta.submitted_from or 'the submitting host'}"
        raise ConfigError(f"pool {pool}: this host's data does not match the data the pool was submitted with\n"
                          f"  submitted: {_describe(want)}  ({where})\n"
                          f"  here:      {_describe(have)}  ({path}, {origin})\n"
                          f"{_DATA_FIX}")
    return str(path)


def _describe(identity: dict) -> str:
    return (f"calendar {identity.get('calendar_start')}..{identity.get('calendar_end')} "
            f"({identity.get('days')} days), {identity.get('instruments')} instruments")



def check_trainer(pool: str, meta: PoolMeta, trainer: str) -> str:
    """``trainer`` (``--trainer``) checked: one of :class:`~qlib_ext.pool.status.Trainer`'s, and ``delay`` only on a
    pool Qlib made (qlib-ext's own pools never hold ``part_done`` tasks).

    Raises:
        ConfigError: an unknown trainer, or ``delay`` on a pool qlib-ext submitted.
    """
    from qlib_ext.pool.status import Trainer

    choices = ", ".join(t.value for t in Trainer)
    if trainer not in tuple(Trainer):
        raise ConfigError(f"--trainer {trainer!r} is not a trainer; expected one of: {choices}")
    if trainer == Trainer.DELAY and not meta.qlib_made:
        raise ConfigError(f"--trainer delay drains the part_done tasks of a pool Qlib's DelayTrainerRM made; pool "
                          f"{pool} was submitted by qlib-ext: leave --trainer out")
    return str(trainer)


def worker_settings(pool: str, *, mongo_url: str | None = None, mlflow_uri: str | None = None,
                    provider_uri: str | None = None, db_name: str | None = None,
                    **kwargs: Any) -> WorkerSettings:
    """Worker settings from the pool's metadata read from the store (``qlib-ext worker``, ``cache warm``).

    The data directory is checked against the one the pool was submitted with; ``kwargs`` are those of
    :func:`settings_from_meta`.
    """
    from qlib_ext.pool.manager import load_pool_meta, open_db
    from qlib_ext.store import resolve_mongo_url

    url = resolve_mongo_url(mongo_url)
    meta = load_pool_meta(open_db(url, db_name), pool)
    provider = check_worker_data(pool, meta, provider_uri)
    return settings_from_meta(pool, meta, mongo_url=url, provider_uri=provider, mlflow_uri=mlflow_uri,
                              db_name=db_name, **kwargs)


def settings_from_meta(pool: str, meta: PoolMeta, *, mongo_url: str, provider_uri: str,
                       mlflow_uri: str | None = None, workers: int = 1, threads: int | None = None,
                       db_name: str | None = None, cache: bool = True, log_to_files: bool = False,
                       **overrides: Any) -> WorkerSettings:
    """Worker settings from the pool's metadata (held in memory by a run); explicit arguments win.

    Args:
        mongo_url: the resolved store URL.
        provider_uri: the checked data directory.
        overrides: ``WorkerSettings`` fields (lease_seconds, grace_seconds, exit_when_idle...) and
            ``allow_module``; None values are ignored so flags left unset fall back to the workflow's ``workers:``.
    """
    from qlib_ext.pool import allowlist
    from qlib_ext.worker import gpus

    spec = meta.workers
    wanted = threads if threads is not None else spec.get("threads_per_worker", "auto")
    recorded = WorkersSpec()
    fields = {name: spec.get(name, getattr(recorded, name)) for name in FROM_POOL}
    explicit = overrides.pop("allow_module", None)
    fields["allowed_modules"] = allowlist.resolve(explicit or None, spec.get("allowed_modules"))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    fields["trainer"] = check_trainer(pool, meta, fields.get("trainer", "rm"))
    fields["gpus"] = gpus.parse(fields.get("gpus"), "--gpus" if overrides.get("gpus") is not None else "workers.gpus")
    if overrides.get("heartbeat_seconds") is not None and overrides.get("lease_seconds") is None:
        # a heartbeat flag alone: the lease keeps LEASE_HEARTBEATS beats (never shorter than the pool's)
        fields["lease_seconds"] = max(fields["lease_seconds"], defaults.lease_for(fields["heartbeat_seconds"]))
    return WorkerSettings(
        pool=pool, mongo_url=mongo_url, provider_uri=provider_uri,
        mlflow_uri=mlflow_uri or meta.mlflow_uri or (defaults.default_mlflow_uri() if meta.qlib_made else ""),
        region=meta.region, db_name=db_name or defaults.task_db_name(), qlib_kwargs=meta.qlib_init,
        cache_dir=str(defaults.cache_dir()) if cache else None,
        log_dir=str(defaults.home() / "logs" / pool) if log_to_files else None,
        threads=auto_threads(workers) if wanted in (None, "auto") else int(wanted), **fields,
    )
