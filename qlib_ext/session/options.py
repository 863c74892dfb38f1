"""The options of a run, defined once: the ``qlib-ext run``/``worker``/``submit`` flags and the keywords of
``qlib_ext.run`` are both generated from :class:`RunOptions` (Hydra's structured configs).

Light on purpose (stdlib only): the command line imports it to build its options at start-up.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import ConfigError

RUN, WORKER, SUBMIT = "run", "worker", "submit"
"""The commands whose options come from :class:`RunOptions`."""

_ALL = (RUN, WORKER, SUBMIT)


@dataclass(frozen=True)
class Option:
    """How one :class:`RunOptions` field appears on the command line.

    ``type`` is the Python type of a given value (``bool``: a flag); ``minimum`` a lower bound;
    ``decl`` the click declaration when it is not ``--field-name`` (``"--cache/--no-cache"``).
    """

    help: str
    type: type = str
    commands: tuple[str, ...] = (RUN, WORKER)
    short: str | None = None
    env: str | None = None
    minimum: int | None = None
    multiple: bool = False
    decl: str | None = None
    metavar: str | None = None
    show_default: bool = False

    def flag(self, name: str) -> str:
        """The long flag (``--lease-seconds``) or the declaration given."""
        return self.decl or "--" + name.replace("_", "-")


def _opt(default: Any, **option: Any) -> Any:
    return field(default=default, metadata={"option": Option(**option)})


@dataclass
class RunOptions:
    """Every option of ``qlib-ext run`` (and those ``worker``/``submit`` share), by its Python name.

    None means "not given": the workflow's ``workers:`` section recorded in the pool, then
    :mod:`qlib_ext.defaults`, fill it (:mod:`qlib_ext.worker.settings`).
    """

    mongo_url: str | None = _opt(
        "embedded", env="QLIB_EXT_MONGO_URL", show_default=True, commands=_ALL,
        help="MongoDB URL of the task pool, or 'embedded' for the built-in store (started in the background "
             "if needed). Env: QLIB_EXT_MONGO_URL.")
    task_db: str | None = _opt(
        None, env=defaults.TASK_DB_ENV, commands=_ALL, metavar="NAME",
        help=f"MongoDB database holding the pools: Qlib's mongo.task_db_name (default: {defaults.TASK_DB_NAME}, "
             f"Qlib's own). Env: {defaults.TASK_DB_ENV}.")
    mlflow_uri: str | None = _opt(
        None, env="MLFLOW_TRACKING_URI", commands=_ALL,
        help=f"MLflow tracking URI (sqlite:///ABS/mlflow.db or http://host:{defaults.MLFLOW_PORT}). "
             "Default: what the pool recorded; for submit $QLIB_EXT_HOME/mlflow.db.")
    provider_uri: str | None = _opt(
        None, env="QLIB_EXT_PROVIDER_URI", commands=_ALL,
        help="Qlib data directory; overrides qlib_init.provider_uri (e.g. another mount).")
    workers: int | None = _opt(None, type=int, short="-n",
                               help="Worker processes (default: number of cores).")
    threads: int | None = _opt(None, type=int,
                               help="Threads per worker (default: workers.threads_per_worker or cores // workers).")
    lease_seconds: float | None = _opt(
        None, type=float, help=f"Lease length of a claimed task, s (default: workers.lease_seconds, else "
                               f"{defaults.LEASE_HEARTBEATS} heartbeats: {defaults.LEASE_SECONDS:g}).")
    heartbeat_seconds: float | None = _opt(
        None, type=float, help=f"Interval between lease renewals, s (default: workers.heartbeat_seconds, "
                               f"{defaults.HEARTBEAT_SECONDS:g}).")
    grace_seconds: float | None = _opt(
        None, type=float, help=f"Time a running task gets to finish after Ctrl-C/SIGTERM, s (default: "
                               f"workers.grace_seconds, {defaults.GRACE_SECONDS:g}).")
    task_timeout: float | None = _opt(
        None, type=float, help="Wall-clock limit per task, s; the task then runs in a child process that is killed "
                               "at the limit (default: workers.task_timeout; 0 = none, in-process).")
    max_attempts: int | None = _opt(
        None, type=int, minimum=1, commands=_ALL,
        help=f"Attempts before a task is marked failed (default: workers.max_attempts, {defaults.MAX_ATTEMPTS}). "
             "run/submit: stamped on the pool's tasks; worker: applies to the attempts it records.")
    gpus: str | None = _opt(
        None, env="QLIB_EXT_GPUS", metavar="IDS",
        help="GPU ids the workers get, one device per worker process (CUDA_VISIBLE_DEVICES: a task's GPU: 0 is "
             "its worker's device), e.g. 0,1,2,3, or 'all'; -n defaults to one worker per device (default: "
             "workers.gpus; none). Env: QLIB_EXT_GPUS.")
    workers_per_gpu: int | None = _opt(
        None, type=int, minimum=1,
        help="Workers sharing each of --gpus' devices (default: workers.workers_per_gpu, 1).")
    exit_when_idle: bool | None = _opt(
        None, type=bool, help="Exit as soon as nothing is waiting (default: when nothing is unfinished).")
    cache: bool = _opt(True, type=bool, decl="--cache/--no-cache", show_default=True,
                       help="Share prepared datasets between tasks; --no-cache builds every dataset anew "
                            "(for measurement).")
    allow_module: tuple[str, ...] | None = _opt(
        None, multiple=True, metavar="PREFIX",
        help="Module prefix a task's class/module_path may name (repeatable; replaces the default qlib., "
             "qlib_ext., lightgbm and the workflow's workers.allowed_modules). Env: QLIB_EXT_ALLOWED_MODULES "
             "(comma-separated). See docs/security.md.")
    metric: str | None = _opt(
        None, commands=(RUN,), help="Metric that ranks the leaderboard (default: grid.objective, else IC; a "
                                    "strategy sweep: 1day.excess_return_with_cost.information_ratio).")
    limit: int | None = _opt(
        None, type=int, minimum=1, commands=(RUN, SUBMIT),
        help="Submit only N tasks, evenly spread over the grid (first and last included): a smoke test "
             "before the full run.")

    def knobs(self) -> dict[str, Any]:
        """The worker settings given as options (None: not given), as :func:`worker_settings` takes them."""
        names = ("lease_seconds", "heartbeat_seconds", "grace_seconds", "task_timeout", "max_attempts",
                 "exit_when_idle", "allow_module", "gpus", "workers_per_gpu")
        return {name: getattr(self, name) for name in names}

    @classmethod
    def of(cls, values: dict[str, Any], where: str = "qlib_ext.run") -> RunOptions:
        """Options from keyword values, checked against this definition.

        Raises:
            ConfigError: an unknown keyword (the message lists the valid ones), or a value of the wrong
                type or below its minimum (the message names the keyword).
        """
        known = {f.name: f.metadata["option"] for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; expected one of: "
                              f"{', '.join(sorted(known))}")
        return cls(**{k: _coerce(where, k, v, known[k]) for k, v in values.items()})


def options_for(command: str) -> list[tuple[str, Any, Option]]:
    """``(name, default, option)`` of each field ``command`` has, in definition order."""
    return [(f.name, f.default, f.metadata["option"]) for f in dataclasses.fields(RunOptions)
            if command in f.metadata["option"].commands]


def from_environment() -> dict[str, str]:
    """The options set by their environment variable (what click reads for the command line)."""
    return {name: os.environ[o.env] for name, _, o in options_for(RUN) if o.env and os.environ.get(o.env)}


def _coerce(where: str, name: str, value: Any, option: Option) -> Any:
    if value is None:
        return None
    if option.multiple:
        return tuple([value] if isinstance(value, str) else value)
    try:
        if option.type is bool and not isinstance(value, bool):
            raise TypeError(value)
        value = option.type(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {name}={value!r} is not a {option.type.__name__}") from e
    if option.minimum is not None and value < option.minimum:
        raise ConfigError(f"{where}: {name}={value!r} is below its minimum {option.minimum}")
    return value
