"""Tunables in one place. Each constant states its meaning and unit."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "QLIB_EXT_HOME"
"""Environment variable naming qlib-ext's home directory (store, MLflow DB, synthetic data)."""

DEFAULT_HOME = Path("~/.qlib-ext")
"""Home directory when ``QLIB_EXT_HOME`` is unset."""

STORE_PORT = 27017
"""TCP port the embedded store tries first (MongoDB's own default)."""

STORE_HOST = "127.0.0.1"
"""Address the embedded store binds by default: loopback only (others need authentication, and TLS on a LAN)."""

MLFLOW_HOST = "127.0.0.1"
"""Address ``qlib-ext mlflow serve`` binds by default: loopback only (logins are still on there)."""

MLFLOW_PORT = 5000
"""TCP port of ``qlib-ext mlflow serve`` (MLflow's own default)."""

MLFLOW_AUTH_CACHE_SECONDS = 300
"""How long each ``qlib-ext mlflow serve`` worker process trusts a login whose password hash it checked (MLflow's
``auth_cache_ttl_seconds``; a failed login is never cached), seconds. 0 checks the hash on every request."""

MAX_MESSAGE_BYTES = 48 * 1000 * 1000
"""Largest wire message the embedded store accepts (MongoDB's maxMessageSizeBytes), bytes."""

TASK_DB_NAME = "default_task_db"
"""MongoDB database that holds the task pools (one collection per pool): Qlib's own default, so
``python -m qlib.workflow.task.manage -t POOL task_stat`` finds them without configuration."""

TASK_DB_ENV = "QLIB_EXT_TASK_DB"
"""Environment variable naming the task database (``--task-db``; Qlib's ``mongo.task_db_name``)."""


def task_db_name() -> str:
    """The task database of this process: ``$QLIB_EXT_TASK_DB`` (set by ``--task-db``), else ``TASK_DB_NAME``."""
    return os.environ.get(TASK_DB_ENV) or TASK_DB_NAME


def use_task_db(name: str | None) -> None:
    """Make ``name`` the task database of this process and of the workers it starts (None: leave it)."""
    if name:
        os.environ[TASK_DB_ENV] = name


HEARTBEAT_SECONDS = 10.0
"""Interval between lease renewals by a worker's heartbeat thread, seconds."""

LEASE_HEARTBEATS = 6
"""Heartbeats a lease outlasts: a lease given without its own length is this many heartbeat intervals, so a
worker on another host that died loses its task after a few missed heartbeats (the margin covers one renewal
stuck for ``STORE_SOCKET_TIMEOUT_SECONDS``), count."""

LEASE_SECONDS = LEASE_HEARTBEATS * HEARTBEAT_SECONDS
"""How long a claimed task stays owned without a heartbeat (60 s), seconds. A worker on the lease holder's
host takes the task back at once when the holder's process is gone (:mod:`qlib_ext.pool.liveness`)."""


def lease_for(heartbeat_seconds: float) -> float:
    """The default lease for a heartbeat interval: ``LEASE_HEARTBEATS`` intervals, seconds."""
    return LEASE_HEARTBEATS * heartbeat_seconds

MAX_ATTEMPTS = 3
"""Attempts a task gets before it is marked failed."""

GRACE_SECONDS = 30.0
"""Time a running task gets to finish after SIGTERM/SIGINT before it is handed back, seconds."""

LAUNCH_STOP_MARGIN_SECONDS = 30.0
"""Beyond a worker's grace period, how much earlier a cluster launch stops it: SLURM's SIGTERM before the job's
time limit (``--signal``), Kubernetes' wait before SIGKILL (``terminationGracePeriodSeconds``), seconds."""

K8S_SECRET = "qlib-ext"
"""Kubernetes Secret a ``launch k8s`` worker reads its store URL (key ``mongo-url``) and MLflow URI
(``mlflow-uri``) from."""

POLL_MIN_SECONDS = 0.2
"""First idle back-off of a worker polling an empty pool, seconds."""

POLL_MAX_SECONDS = 5.0
"""Cap of the idle back-off, seconds."""

STORE_TIMEOUT_SECONDS = 5.0
"""How long a worker's store operation waits for an unreachable store before backing off, seconds."""

STORE_SOCKET_TIMEOUT_SECONDS = 30.0
"""Longest a worker waits on one reply of a reachable store (a slow query, not an outage), seconds."""

STORE_PING_SECONDS = 10.0
"""How long a command (not a worker) waits for the store to answer its first ping, seconds."""

WORKER_RESTARTS = 3
"""Times a local worker slot is restarted after its process died, before it stays empty."""

PROGRESS_TICK_SECONDS = 1.0
"""Interval between progress-line refreshes while local workers run, seconds."""

OUTAGE_MAX_SECONDS = 10.0
"""Cap of a worker's exponential back-off while the store is unreachable, seconds."""


def home() -> Path:
    """Return qlib-ext's home directory (``$QLIB_EXT_HOME`` or ``~/.qlib-ext``), created if missing."""
    path = Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_dir() -> Path:
    """Directory of the default embedded store."""
    return home() / "store"


def default_mlflow_uri() -> str:
    """MLflow tracking URI used when none is given: a sqlite DB in the home directory."""
    return f"sqlite:///{home() / 'mlflow.db'}"


def cache_dir() -> Path:
    """Shared prepared-dataset cache (put ``QLIB_EXT_HOME`` on a shared disk to share it across hosts)."""
    return home() / "cache"


def synth_data_dir() -> Path:
    """Where ``qlib-ext demo`` keeps its synthetic Qlib dataset."""
    return home() / "data" / "synth"


# --------------------------------------------------------------------------- workers
TASK_TIMEOUT_SECONDS: float | None = None
"""Default wall-clock limit of one task, seconds; None = no limit (``workers.task_timeout``)."""

FAST_BACKTEST = True
"""Run covered ``PortAnaRecord`` backtests on ``qlib_ext.backtest``'s fast path (``workers.fast_backtest``)."""

THREADS_PER_WORKER: str | int = "auto"
"""Default threads per worker process: 'auto' = cores // workers, at least 1 (``workers.threads_per_worker``)."""


# --- store
LOADBACK_MEMO_BYTES = 256 * 1024 * 1024
"""A task's run keeps the bytes of the files it uploads up to this many in all, so that its own records load them
back (``pred.pkl`` by SigAnaRecord, PortAnaRecord, the checks) from memory, not by a download and a re-hash."""

STORE_COMPACT_BYTES = 64 * 1024 * 1024
"""Journal size that triggers compaction into a snapshot (also needs 2x the snapshot size), bytes."""

STORE_START_SECONDS = 30.0
"""How long :func:`qlib_ext.store.resolve_mongo_url` waits for a background store to answer, seconds."""

STORE_IDLE_EXIT_SECONDS = 1800.0
"""A store started in the background exits after this long without any client connection, seconds."""


# --- multi-host
CLOCK_RESYNC_SECONDS = 300.0
"""How often a process re-reads the store's clock for lease arithmetic, seconds."""


# --- store connections and security
STORE_MAX_CONNECTIONS = 4096
"""Client connections the embedded store serves at once (one thread each); more are refused, count.
Lowered at start to what the open-file limit allows, less STORE_RESERVED_FILES."""

STORE_RESERVED_FILES = 64
"""Open files the store keeps free of connections (journal, snapshot, credentials, logs), count."""

STORE_OWNER_CONNECTIONS = 32
"""Connections kept for the store's owner (peer-identified loopback clients): every other client
together gets at most the connection cap less this, count."""

STORE_ACCEPT_BACKOFF_SECONDS = 0.1
"""Pause after a failed ``accept`` (e.g. out of file descriptors) before trying again, seconds."""

STORE_IDLE_CONNECTION_SECONDS = 900.0
"""The embedded store closes a connection that sends nothing for this long, seconds (pymongo's
monitor pings every 10 s; a pool connection closed while idle is replaced transparently)."""

STORE_READ_TIMEOUT_SECONDS = 30.0
"""Once a message has started, the rest (and a TLS handshake) must arrive within this, seconds."""


# --- validity statistics (leaderboard)
SHARPE_PERIODS_PER_YEAR = 238
"""Days per year that annualise a daily Sharpe ratio: Qlib's ``risk_analysis`` scaler for daily data, so
the leaderboard's Sharpe equals Qlib's ``information_ratio`` of the same series, days."""

MINTRL_CONFIDENCE = 0.95
"""Confidence level of the minimum track record length (PSR against 0 must reach it), probability."""

DASHBOARD_REFRESH_SECONDS = 5.0
"""Interval between two exports of a pool to the storage ``qlib-ext dashboard`` serves, s."""

DASHBOARD_PORT = 8080
"""Port ``qlib-ext dashboard`` serves optuna-dashboard on (optuna-dashboard's own default)."""

IMPORTANCE_MIN_CONFIGS = 8
"""Finished configurations a pool needs before its hyperparameter importances are computed, count."""

FANOVA_TREES = 32
"""Trees of the fANOVA random forest (Optuna's default is 64; a pool's few dozen configurations need fewer), count."""

FANOVA_DEPTH = 8
"""Depth limit of each fANOVA tree (2^8 leaves exceed the configurations of any pool it is asked about), levels."""

IMPORTANCE_DISAGREE = 0.25
"""Walk-forward windows disagree when an axis's fANOVA share differs by more than this between two windows."""

PBO_BLOCKS = 16
"""Row blocks S that CSCV cuts the T x N return matrix into (C(16, 8) = 12,870 splits), count."""

PBO_MAX_SPLITS = 20000
"""Most IS/OOS splits PBO evaluates; above this a seeded sample of C(S, S/2) is used, count."""


# --- hardening: what workers trust, and faults outside the task
ALLOWED_MODULES: tuple[str, ...] = ("qlib.", "qlib_ext.", "lightgbm")
"""Module prefixes a task's ``class``/``func``/``module_path`` may name on a worker (``--allow-module``,
``QLIB_EXT_ALLOWED_MODULES``, ``workers.allowed_modules`` in the profile replace it)."""

ALLOWED_MODULES_ENV = "QLIB_EXT_ALLOWED_MODULES"
"""Environment variable with a worker's comma-separated allow-list of module prefixes."""

POOL_NAME_MAX_CHARS = 100
"""Longest pool name (a MongoDB collection name; database plus name must stay under 255 bytes), characters."""

MAX_GRID_POINTS = 100_000
"""Most tasks a grid may expand to (product of its axis lengths, times rolling windows) unless the YAML's
``grid.max_points`` raises it; checked before the grid is built, count."""

MAX_YAML_NODES = 1_000_000
"""Most nodes a workflow YAML may hold once its aliases are expanded (refuses alias bombs), count."""

INFRA_RETRIES = 5
"""Times a worker retries a task whose attempt failed outside the task (MLflow, store, disk full) before it
counts as one of the task's attempts, count."""

INFRA_BACKOFF_SECONDS = 2.0
"""First back-off after an infrastructure fault (doubled per retry, capped at ``OUTAGE_MAX_SECONDS``), seconds."""


# --- search (Optuna proposer)
SEARCH_POLL_SECONDS = 0.5
"""Interval between two rounds of a search proposer (read results, tell, ask), seconds."""

SEARCH_HOLD_SECONDS = 60.0
"""A proposer holds its pool open this long after its last round (workers wait instead of exiting), seconds."""

PYTHON_HASH_SEED = "0"
"""``PYTHONHASHSEED`` of worker processes unless the environment sets one: Qlib's backtest sums over sets of
stock codes, whose order (and so the last bits of its metrics) follows the hash seed; fixed, a run reproduces
exactly (``qlib-ext reproduce``)."""


# --- an attempt's life (worker loop, task runners, heartbeat, reaper)
START_AFTER_POLL_SECONDS = 0.1
"""How often a worker started with ``start_after`` looks for the cache warmer's file, seconds."""

STOP_STORE_TRIES = 3
"""Store writes a stopping worker tries before it gives up and leaves the task to lease recovery, count."""

KILL_AFTER_SECONDS = 5.0
"""Time a task child gets between SIGTERM and SIGKILL, seconds."""

CHILD_POLL_SECONDS = 0.1
"""Interval at which a worker checks its task child for a result, a deadline or an interrupt, seconds."""

CHILD_REAP_SECONDS = 5.0
"""How long a worker waits for a SIGKILLed (or finished) task child to be reaped, seconds."""

HEARTBEAT_JOIN_SLACK_SECONDS = 5.0
"""Beyond one heartbeat interval, how long leaving a task waits for its heartbeat thread to stop, seconds."""

REAPER_PAGE_RUNS = 5000
"""Runs per MLflow search page the reaper reads, count."""

SYSTEM_METRICS_SECONDS = 5.0
"""Interval of MLflow's system metrics (CPU %, memory, disk, network, GPU) on every task run, seconds; each
interval's samples are averaged into one point, the last partial one logged when the task ends. 0 turns them
off. Env: ``QLIB_EXT_SYSTEM_METRICS_SECONDS``."""

GRID_PLOTS_ENV = "QLIB_EXT_GRID_PLOTS"
"""Environment variable: ``wait`` makes ``qlib-ext run``/``worker`` draw the grid plots before they exit; anything
else (the default) draws them in a background process after the summary is printed (issue 24)."""
