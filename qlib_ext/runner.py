"""Submit a workflow to its pool, and build worker settings from what the pool recorded."""

from __future__ import annotations

import datetime as dt
import logging
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from qlib_ext import defaults
from qlib_ext.errors import ConfigError

logger = logging.getLogger(__name__)

_QLIB_INIT_OWNED = ("provider_uri", "region", "exp_manager", "mongo")
"""qlib_init keys qlib-ext sets itself in each worker; the rest is passed through."""


@dataclass
class Submitted:
    """Outcome of a submit: how many tasks were new, and where the pool and runs live."""

    pool: str
    new: int
    total: int
    mongo_url: str
    mlflow_uri: str
    experiment: str

    def __str__(self) -> str:
        return f"pool {self.pool}: {self.new} new of {self.total} tasks (experiment {self.experiment!r})"


def resolve_provider(provider_uri: str | None, qlib_init: dict, source: str) -> str:
    """The data directory: the override, else ``qlib_init.provider_uri``; it must exist."""
    raw = provider_uri or qlib_init.get("provider_uri")
    if not raw:
        raise ConfigError(f"{source}: no data directory: set qlib_init.provider_uri or pass --provider-uri")
    path = Path(str(raw)).expanduser().resolve()
    if not (path / "calendars").is_dir():
        raise ConfigError(f"{source}: provider_uri {str(path)!r} is not a Qlib data directory (no calendars/); "
                          f"make one with `qlib-ext data synth --out {path}` or pass --provider-uri")
    return str(path)


def data_identity(provider_uri: str) -> dict:
    """What must match between the submitter's data and a worker's: calendar range, instrument count."""
    root = Path(provider_uri)
    days = (root / "calendars" / "day.txt").read_text().split()
    instruments = root / "instruments" / "all.txt"
    n = sum(1 for line in instruments.read_text().splitlines() if line.strip()) if instruments.exists() else None
    return {"calendar_start": days[0], "calendar_end": days[-1], "days": len(days), "instruments": n}


_DATA_FIX = ("pass --provider-uri (or QLIB_EXT_PROVIDER_URI, or provider_uri in qlib-ext.toml) naming this host's "
             "mount of the submitted dataset: every worker host needs the same data on a shared path (e.g. NFS) "
             "or an identical copy")


def check_worker_data(pool: str, meta: dict, provider_uri: str | None = None) -> str:
    """The data directory a worker of ``pool`` uses, checked against the data the pool was submitted with.

    Args:
        pool: pool name (for messages).
        meta: the pool's metadata (:func:`qlib_ext.queue.load_pool_meta`).
        provider_uri: this host's override; None uses the path recorded at submit.

    Returns:
        The resolved data directory.

    Raises:
        ConfigError: the directory is not a Qlib dataset here, or its calendar range or instrument
            count differs from the submitted one (both sides and the fix are named).
    """
    origin = "--provider-uri" if provider_uri else "the path recorded at submit"
    path = Path(str(provider_uri or meta["provider_uri"])).expanduser().resolve()
    if not (path / "calendars" / "day.txt").is_file():
        raise ConfigError(f"pool {pool}: data directory {path} ({origin}) is not a Qlib dataset on this host "
                          f"(no calendars/day.txt); {_DATA_FIX}")
    want = meta.get("data")
    if not want:  # pools submitted before data identities were recorded
        return str(path)
    have = data_identity(str(path))
    if any(have.get(k) != v for k, v in want.items()):
        where = f"{meta.get('provider_uri')} on {meta.get('submitted_from', 'the submitting host')}"
        raise ConfigError(f"pool {pool}: this host's data does not match the data the pool was submitted with\n"
                          f"  submitted: {_describe(want)}  ({where})\n"
                          f"  here:      {_describe(have)}  ({path}, {origin})\n"
                          f"{_DATA_FIX}")
    return str(path)


def _describe(identity: dict) -> str:
    return (f"calendar {identity.get('calendar_start')}..{identity.get('calendar_end')} "
            f"({identity.get('days')} days), {identity.get('instruments')} instruments")


def spread_sample(items: list, limit: int | None) -> list:
    """At most ``limit`` items, evenly spread over the list, first and last included."""
    if not limit or limit >= len(items):
        return items
    if limit == 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def submit(path: str | Path, *, mongo_url: str | None = None, mlflow_uri: str | None = None,
           provider_uri: str | None = None, db_name: str = defaults.TASK_DB_NAME,
           max_attempts: int | None = None, limit: int | None = None) -> Submitted:
    """Expand a workflow and insert its new tasks into its pool (``qlib-ext submit``).

    ``max_attempts`` (the ``--max-attempts`` flag) wins over ``workers.max_attempts``; it is stamped
    on each new task, and also on the pool's tasks not yet finished, so a resubmit can change it.
    ``limit`` (``--limit``) submits only an evenly spread sample of that many tasks (first and last
    included): a smoke test of a big grid before spending hours on it.
    """
    from qlib_ext.config import load_workflow
    from qlib_ext.gen import expand
    from qlib_ext.queue import GridTaskManager, open_db, save_pool_meta
    from qlib_ext.store import resolve_mongo_url
    from qlib_ext.tracking import ensure_experiment

    wf = load_workflow(path)
    qlib_init = dict(wf.config.get("qlib_init") or {})
    provider = resolve_provider(provider_uri, qlib_init, str(path))
    tasks = spread_sample(expand(wf, provider_uri=provider), limit)
    mlflow_uri = mlflow_uri or defaults.default_mlflow_uri()
    ensure_experiment(mlflow_uri, wf.experiment_name)
    url = resolve_mongo_url(mongo_url)
    db = open_db(url, db_name)
    save_pool_meta(db, wf.pool, {
        "workflow": str(Path(path).resolve()), "provider_uri": provider, "region": qlib_init.get("region", "cn"),
        "qlib_init": {k: v for k, v in qlib_init.items() if k not in _QLIB_INIT_OWNED},
        "mlflow_uri": mlflow_uri, "experiment": wf.experiment_name, "workers": asdict(wf.workers),
        "data": data_identity(provider), "submitted_at": dt.datetime.now(dt.timezone.utc),
        "submitted_from": socket.gethostname(),
    })
    tm = GridTaskManager(wf.pool, db)
    new, total = tm.create_tasks(tasks, max_attempts=max_attempts or wf.workers.max_attempts)
    if max_attempts is not None:
        tm.task_pool.update_many({"status": {"$in": ["waiting", "running"]}}, {"$set": {"max_attempts": max_attempts}})
    return Submitted(wf.pool, new, total, url, mlflow_uri, wf.experiment_name)


def worker_settings(pool: str, *, mongo_url: str | None = None, mlflow_uri: str | None = None,
                    provider_uri: str | None = None, workers: int = 1, threads: int | None = None,
                    db_name: str = defaults.TASK_DB_NAME, cache: bool = True, log_to_files: bool = False,
                    **overrides) -> object:
    """Worker settings from the pool's recorded metadata; explicit arguments win.

    ``overrides`` are ``WorkerSettings`` fields (lease_seconds, grace_seconds, exit_when_idle...);
    None values are ignored so CLI flags left unset fall back to the workflow's ``workers:``.
    """
    from qlib_ext.queue import load_pool_meta, open_db
    from qlib_ext.store import resolve_mongo_url
    from qlib_ext.worker import WorkerSettings, auto_threads

    url = resolve_mongo_url(mongo_url)
    meta = load_pool_meta(open_db(url, db_name), pool)
    provider = check_worker_data(pool, meta, provider_uri)
    spec = meta.get("workers", {})
    wanted = threads if threads is not None else spec.get("threads_per_worker", "auto")
    fields = {
        "lease_seconds": spec.get("lease_seconds", defaults.LEASE_SECONDS),
        "heartbeat_seconds": spec.get("heartbeat_seconds", defaults.HEARTBEAT_SECONDS),
        "grace_seconds": spec.get("grace_seconds", defaults.GRACE_SECONDS),
        "task_timeout": spec.get("task_timeout", defaults.TASK_TIMEOUT_SECONDS),
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return WorkerSettings(
        pool=pool, mongo_url=url, mlflow_uri=mlflow_uri or meta["mlflow_uri"], provider_uri=provider,
        region=meta.get("region", "cn"), db_name=db_name, qlib_kwargs=meta.get("qlib_init", {}),
        cache_dir=str(defaults.cache_dir()) if cache else None,
        log_dir=str(defaults.home() / "logs" / pool) if log_to_files else None,
        threads=auto_threads(workers) if wanted in (None, "auto") else int(wanted), **fields,
    )
