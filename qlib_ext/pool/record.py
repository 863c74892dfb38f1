"""The schema: every field name of a pool document, of its ``qlib_ext`` block and of a pool's metadata; our
MLflow tags; the metric names Qlib logs that qlib-ext reads.

A pool document keeps Qlib's shape (``def``, ``filter``, ``status``, ``priority``, ``res``) so Qlib's
``TaskManager`` and ``python -m qlib.workflow.task.manage`` read it; the other fields are ours (:class:`Doc`).
Qlib 0.9.7 unpickles every field whose name *starts with* ``def`` or ``res``
(``TaskManager.ENCODE_FIELDS_PREFIX``), so no field of ours may: :func:`check_field_names` says so at import.

The task dict's ``qlib_ext`` block (grid coordinates, names, the train-once sweep, a backtest's
training run) is :class:`TaskMeta`, a dataclass with a dict/BSON round trip that leaves the stored
format as it was; so is a pool's metadata (:class:`PoolMeta`). The MLflow tags are :class:`Tag`, the metric
names Qlib logs and qlib-ext reads are :class:`Metric` (with the lists each reader uses). Every such name is
written as a string here and nowhere else (``tests/test_schema.py``).

This module imports only the standard library: every layer (the workflow that writes the block,
the pool that stores it, the worker and tracking that read it) imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Self

META: Final = "qlib_ext"
"""Key of the qlib-ext block in a task dict (``task["qlib_ext"]``, stored under ``def`` and ``filter``)."""

QLIB_ENCODED_PREFIXES: Final = ("def", "res")
"""Field-name prefixes Qlib's ``TaskManager`` pickles and unpickles (``ENCODE_FIELDS_PREFIX``)."""

KIND_BACKTEST: Final = "backtest"
"""``qlib_ext.kind`` of a task that backtests a training run's predictions."""

STRATEGY_PREFIX: Final = "port_analysis_config.strategy.kwargs."
"""Coordinate-name prefix of a strategy key in ``qlib_ext.coords`` (the name a ``grid.params`` path would have)."""

KIND_TRAIN: Final = "train"
"""``qlib_ext.kind`` tag value of a training run with a strategy sweep (the block itself has no ``kind``)."""


class Doc:
    """Field names of a task document in a pool collection."""

    ID: Final = "_id"
    # Qlib's fields
    DEF: Final = "def"  # the task dict, pickled (Qlib's)
    FILTER: Final = "filter"  # the task dict as plain BSON, for queries (Qlib's)
    STATUS: Final = "status"  # a TaskStatus value (Qlib's, plus failed/cancelled)
    PRIORITY: Final = "priority"  # higher is claimed first (Qlib's)
    RES: Final = "res"  # the committed result, pickled plain dict (Qlib's)
    # ours
    HASH: Final = "hash"  # task_hash of the task dict: unique, deduplicates submits
    ATTEMPT: Final = "attempt"  # attempts claimed so far; fences commits
    MAX_ATTEMPTS: Final = "max_attempts"  # attempts allowed before failed
    ERRORS: Final = "errors"  # one entry (ErrorEntry fields) per failed attempt
    WORKER: Final = "worker"  # host:pid of the current or last owner
    HOST: Final = "host"  # host part of worker
    DEVICE: Final = "device"  # the claiming worker's device, "cuda:N" or "cpu" (absent: started without GPUs)
    CREATED_AT: Final = "created_at"  # store time of insertion
    STARTED_AT: Final = "started_at"  # store time of the last claim
    CLAIMED_FROM: Final = "claimed_from"  # the state the last claim took it from: where a retry puts it back
    LEASE_UNTIL: Final = "lease_until"  # store time the lease expires (only while running)
    RENEWED_AT: Final = "renewed_at"  # store time of the owner's last heartbeat (or of the claim)
    PID: Final = "pid"  # OS process id of the owner on HOST (pool/liveness.py)
    PID_START: Final = "pid_start"  # the owner's start time, clock ticks after boot (/proc/PID/stat): pid reuse
    PID_SCOPE: Final = "pid_scope"  # boot id and pid namespace in which PID and PID_START mean that process
    FINISHED_AT: Final = "finished_at"  # store time of the commit
    REQUEUED_AT: Final = "requeued_at"  # store time of the last retry
    CANCELLED_AT: Final = "cancelled_at"  # store time of the cancel
    INFRA_RETRIES: Final = "infra_retries"  # hand-backs after faults outside the task (no attempt used)
    INFRA_ERROR: Final = "infra_error"  # the last such fault (ErrorEntry fields)
    OUTCOME: Final = "outcome"  # the committed result as plain BSON (run_id, metrics, ...)
    LEGACY_RESULT: Final = "result"  # OUTCOME's name in 0.1.0; renamed when a pool is opened


DOC_FORMAT: Final = 2
"""Format of the task documents: 1 = 0.1.0 (the committed result in ``result``), 2 = ``outcome``."""


class SpoolEntry:
    """Field names of a spooled result on a worker host's disk (:mod:`qlib_ext.worker.spool`): a commit
    the store was away for, replayed later under the same claim."""

    TASK_ID: Final = "task_id"
    WORKER: Final = "worker"
    ATTEMPT: Final = "attempt"
    RESULT: Final = "result"


class ErrorEntry:
    """Field names of one entry of a document's ``errors`` list."""

    ATTEMPT: Final = "attempt"
    WORKER: Final = "worker"
    TIME: Final = "time"
    ERROR: Final = "error"


class Outcome:
    """Keys of the committed result (``outcome``, also pickled in ``res``) that qlib-ext itself reads."""

    RUN_ID: Final = "run_id"
    EXPERIMENT: Final = "experiment"
    EXPERIMENT_ID: Final = "experiment_id"
    TRACKING_URI: Final = "tracking_uri"
    METRICS: Final = "metrics"
    TIMINGS: Final = "timings"
    WORKER: Final = "worker"
    ATTEMPT: Final = "attempt"
    QLIB_RECORDER: Final = "qlib_recorder"  # True: Qlib's ``res`` holds the run's Recorder (a task Qlib submitted)
    ARTIFACTS: Final = "artifacts"  # [[artifact path, sha256], ...] of every file the run wrote (tracking/artifacts.py)


class Tag:
    """MLflow tag names qlib-ext sets on a task's run."""

    POOL: Final = "qlib_ext.pool"
    TASK_ID: Final = "qlib_ext.task_id"
    GRID_HASH: Final = "qlib_ext.grid_hash"
    CONFIG_ID: Final = "qlib_ext.config_id"
    WORKER: Final = "qlib_ext.worker"
    HOST: Final = "qlib_ext.host"
    ATTEMPT: Final = "qlib_ext.attempt"
    THREADS: Final = "qlib_ext.threads"
    DEVICE: Final = "qlib_ext.device"  # the worker's device, "cuda:N" (the host's id) or "cpu" (worker/gpus.py)
    LGB_NUM_THREADS: Final = "qlib_ext.lgb_num_threads"
    KIND: Final = "qlib_ext.kind"
    SWEEP: Final = "qlib_ext.sweep"
    PARENT_RUN_ID: Final = "qlib_ext.parent_run_id"
    DISCARDED: Final = "qlib_ext.discarded"  # on a KILLED run: why its result was never committed
    SPOOLED: Final = "qlib_ext.spooled"  # on a RUNNING run whose result waits in a worker's spool (worker/spool.py)
    FLAGS: Final = "qlib_ext.flags"  # a run's sanity flags, comma-separated (tracking/flags.py)
    DSR: Final = "qlib_ext.dsr"  # a leaderboard row's Deflated Sharpe Ratio (leaderboard --tag-runs)
    AXES: Final = "qlib_ext.axes"  # grid run: JSON {short param name: full dotted path} (tracking/mlflow_ui.py)
    ROW: Final = "qlib_ext.row"  # what a run is in the grid's tables: grid, config, window, model
    TRIAL: Final = "qlib_ext.trial"  # a search trial's number (search/proposer.py)
    SAMPLER: Final = "qlib_ext.sampler"  # the search's sampler
    TRIAL_STATE: Final = "qlib_ext.trial_state"  # the trial's state
    PRUNED: Final = "qlib_ext.pruned"  # "true" on the runs of a pruned trial
    SCHEDULER: Final = "qlib_ext.scheduler"  # slurm or k8s: the worker was started by `qlib-ext launch` (launch/)
    SCHEDULER_JOB: Final = "qlib_ext.scheduler_job"  # its SLURM job id / Kubernetes Job name
    SCHEDULER_TASK: Final = "qlib_ext.scheduler_task"  # its SLURM array task id / pod name (or completion index)
    MLFLOW_PARENT: Final = "mlflow.parentRunId"  # MLflow's own: nests a backtest run under its training run
    HOSTNAME: Final = "hostname"


class Trial:
    """Field names of a search's trial document (collection ``_qlib_ext_trials``, :mod:`qlib_ext.search.trials`)."""

    ID: Final = "_id"  # "<pool>:<number>": unique, enforces the trial budget
    POOL: Final = "pool"
    NUMBER: Final = "number"  # 0 .. n_trials - 1
    STATE: Final = "state"  # a TrialState value
    CREATED_AT: Final = "created_at"
    FINISHED_AT: Final = "finished_at"
    FINISHED_BY: Final = "finished_by"  # the proposer that moved it out of running
    VALUE: Final = "value"  # the objective value (None unless complete); several objectives: a list, in their order
    PARAMS: Final = "params"  # the Optuna params (None for a grid/random configuration)
    TASKS: Final = "tasks"  # the trial's task dicts, one per rolling window, oldest first
    HASHES: Final = "hashes"  # their task_hash values
    RELEASED: Final = "released"  # windows queued so far
    JUDGED: Final = "judged"  # pruning decision per step ({"<step>": decision})
    SAMPLER: Final = "sampler"  # grid.search
    CONFIG_ID: Final = "config_id"
    OBJECTIVE: Final = "objective"  # the grid's objective (metric, direction); several: the first
    OBJECTIVES: Final = "objectives"  # several objectives: each (metric, direction), in order (absent for one)
    PROPOSER: Final = "proposer"  # the proposer that reserved it
    TAGGED: Final = "tagged"  # its runs carry the trial's state tags


class Metric:
    """Qlib's metric names (``SigAnaRecord``, ``PortAnaRecord``) that qlib-ext reads, copies and ranks by."""

    IC: Final = "IC"
    ICIR: Final = "ICIR"
    RANK_IC: Final = "Rank IC"
    RANK_ICIR: Final = "Rank ICIR"
    ANN_RETURN: Final = "1day.excess_return_with_cost.annualized_return"
    IR: Final = "1day.excess_return_with_cost.information_ratio"
    MAX_DRAWDOWN: Final = "1day.excess_return_with_cost.max_drawdown"
    ANN_RETURN_NO_COST: Final = "1day.excess_return_without_cost.annualized_return"
    IR_NO_COST: Final = "1day.excess_return_without_cost.information_ratio"
    MAX_DRAWDOWN_NO_COST: Final = "1day.excess_return_without_cost.max_drawdown"


SIGNAL_METRICS: Final = (Metric.IC, Metric.ICIR, Metric.RANK_IC, Metric.RANK_ICIR)
"""``SigAnaRecord``'s metrics: the prediction's quality (a train-once backtest run logs its training run's)."""

PORTFOLIO_METRICS: Final = (Metric.ANN_RETURN, Metric.IR, Metric.MAX_DRAWDOWN,
                            Metric.ANN_RETURN_NO_COST, Metric.IR_NO_COST, Metric.MAX_DRAWDOWN_NO_COST)
"""``PortAnaRecord``'s headline metrics, with and without cost."""

KEY_METRICS: Final = SIGNAL_METRICS + PORTFOLIO_METRICS
"""Qlib's metrics copied into the committed result (``outcome.metrics``)."""

HEADLINE_METRICS: Final = {
    "ann_ret": Metric.ANN_RETURN, "IR": Metric.IR, "max_dd": Metric.MAX_DRAWDOWN,
    "ann_ret_nc": Metric.ANN_RETURN_NO_COST, "IR_nc": Metric.IR_NO_COST,
}
"""Short metric name -> Qlib's name: each run logs these again under the short name (MLflow's table columns)."""


def check_field_names(names: list[str]) -> None:
    """Raise ``ValueError`` if a field name would be unpickled by Qlib (starts with ``def``/``res``).

    Only Qlib's own ``def`` and ``res`` may; they hold pickles.
    """
    bad = [n for n in names if n not in (Doc.DEF, Doc.RES) and n.startswith(QLIB_ENCODED_PREFIXES)]
    if bad:
        raise ValueError(f"pool document fields {bad} start with {QLIB_ENCODED_PREFIXES}, which Qlib's "
                         "TaskManager unpickles; rename them")


def doc_fields() -> list[str]:
    """Every field name a task document may have (Qlib's and ours, the 0.1.0 one included)."""
    return [v for k, v in vars(Doc).items() if k.isupper()]


check_field_names([n for n in doc_fields() if n != Doc.LEGACY_RESULT])


class _Block:
    """A stored block read into a dataclass and written back as it was.

    Keys absent from the stored block stay absent (the field's default here) so that a round trip
    leaves the document unchanged; keys the class does not know are kept in ``extra``.
    """

    _ALWAYS: tuple[str, ...] = ()  # keys a new block (not read from the store) always writes
    _NOT_STORED: tuple[str, ...] = ("extra",)  # fields that are not keys of the stored block

    @classmethod
    def from_dict(cls, block: dict) -> Self:
        """Read a stored block."""
        known = {f.name for f in dataclasses.fields(cls)} - set(cls._NOT_STORED)  # type: ignore[arg-type]
        meta: Any = cls(**{k: v for k, v in block.items() if k in known},  # type: ignore[call-arg]
                        extra={k: v for k, v in block.items() if k not in known})
        meta._present = [k for k in block if k in known]
        return meta

    def to_dict(self) -> dict:
        """The block as stored: the keys it was read with (or, for a new block, the always-present ones)
        in their order, then any other key set to a non-default value, then ``extra``."""
        present = getattr(self, "_present", None)
        keep = list(self._ALWAYS if present is None else present)
        out = {name: getattr(self, name) for name in keep}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # a key set since: any non-default value
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name not in out and f.name not in self._NOT_STORED and getattr(self, f.name) != default:
                out[f.name] = getattr(self, f.name)
        return {**out, **self.extra}  # type: ignore[attr-defined]

    @classmethod
    def stored_fields(cls) -> list[str]:
        """The stored keys this class knows, in field order."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls._NOT_STORED]  # type: ignore[arg-type]


@dataclass
class PoolMeta(_Block):
    """A pool's metadata document (collection ``_qlib_ext_pools``, ``_id`` = the pool's name): how to run it.

    Written whole by the submit (:func:`qlib_ext.pool.database.save_pool_meta`), a few fields at a time by
    the pool (``doc_format``) and a search proposer (its hold); read by workers, reports and the reaper.
    ``to_dict`` leaves out ``pool`` (the document's ``_id``).
    """

    pool: str | None = None  # the pool's name (the document's _id)
    workflow: str | None = None  # absolute path of the submitted YAML
    provider_uri: str | None = None  # Qlib data directory at submit
    region: str = "cn"  # qlib.init region
    qlib_init: dict = field(default_factory=dict)  # further qlib.init arguments
    mlflow_uri: str | None = None  # MLflow tracking URI of the pool's runs
    experiment: str | None = None  # MLflow experiment of the pool's runs
    workers: dict = field(default_factory=dict)  # the workflow's workers: section (WorkersSpec as a dict)
    data: dict | None = None  # data identity at submit (calendar range, instrument count); absent before 0.2
    submitted_at: Any = None  # datetime of the (last) submit, UTC
    submitted_from: str | None = None  # host name of the submitter
    objective: dict | None = None  # what the leaderboard ranks by (Objective as a dict); None: the default
    objectives: list | None = None  # several objectives (each an Objective dict): the leaderboard's Pareto front
    search: dict | None = None  # a model-based search: {search: sampler name, n_trials}
    search_until: Any = None  # store time (datetime) until which a search proposer holds the pool open
    search_owner: str | None = None  # the proposer holding the pool (host:pid)
    search_done: bool = False  # every trial of the search has finished
    doc_format: int = 1  # DOC_FORMAT the pool's documents were migrated to (absent: 1)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they are
    qlib_made: bool = False  # not stored: a pool Qlib made (TrainerRM, TaskManager.create_task), no metadata

    _ALWAYS = ("workflow", "provider_uri", "region", "qlib_init", "mlflow_uri", "experiment", "workers", "data",
               "submitted_at", "submitted_from", "objective")
    _NOT_STORED = ("extra", "pool", "qlib_made")

    class Field:
        """The stored key of each field, for queries, projections and partial updates."""

        WORKFLOW: Final = "workflow"
        PROVIDER_URI: Final = "provider_uri"
        REGION: Final = "region"
        QLIB_INIT: Final = "qlib_init"
        MLFLOW_URI: Final = "mlflow_uri"
        EXPERIMENT: Final = "experiment"
        WORKERS: Final = "workers"
        DATA: Final = "data"
        SUBMITTED_AT: Final = "submitted_at"
        SUBMITTED_FROM: Final = "submitted_from"
        OBJECTIVE: Final = "objective"
        OBJECTIVES: Final = "objectives"
        SEARCH: Final = "search"
        SEARCH_UNTIL: Final = "search_until"
        SEARCH_OWNER: Final = "search_owner"
        SEARCH_DONE: Final = "search_done"
        DOC_FORMAT: Final = "doc_format"

    @staticmethod
    def search_block(sampler: str, n_trials: int | None) -> dict:
        """The ``search`` field of a pool searched with ``sampler`` for ``n_trials`` trials."""
        return {"search": sampler, "n_trials": n_trials}

    @property
    def search_trials(self) -> int | None:
        """The trial budget of the pool's search (None: no search, or no budget recorded)."""
        return (self.search or {}).get("n_trials")

    @classmethod
    def from_dict(cls, block: dict) -> Self:
        """Read a stored metadata document (its ``_id`` becomes ``pool``)."""
        meta = super().from_dict({k: v for k, v in block.items() if k != Doc.ID})
        meta.pool = block.get(Doc.ID)
        return meta


@dataclass
class TaskMeta(_Block):
    """The ``qlib_ext`` block of a task dict. Plain data; ``to_dict`` gives the stored dict back.

    Keys absent from the stored block stay absent (``None`` here) so that a round trip leaves the
    document, and so ``task_hash``, unchanged; keys this class does not know are kept in ``extra``.
    """

    pool: str | None = None  # pool name
    experiment: str | None = None  # MLflow experiment of the run
    grid_hash: str | None = None  # identity of the whole grid (left out of task_hash)
    config_id: str | None = None  # identity of model + coordinates (equal across rolling windows)
    coords: dict = field(default_factory=dict)  # grid coordinates: dotted path -> value
    model: str | None = None  # model short name (``lgb``) or the grid's model name
    strategy: dict = field(default_factory=dict)  # strategy kwargs set by the grid
    window: dict | None = None  # rolling window: index, train/valid/test [start, end]
    run_name: str | None = None  # MLflow run name
    sweep: list | None = None  # train-once: the backtests (SweepPoint dicts) to queue after training
    kind: str | None = None  # KIND_BACKTEST for a backtest of a training run; absent otherwise
    model_class: str | None = None  # a backtest's model class (its task has no model block)
    parent_run_id: str | None = None  # a backtest's training run
    parent_task_id: str | None = None  # a backtest's training task (str of its _id)
    parent_artifacts: list | None = None  # a backtest's training run's pred.pkl/label.pkl: [[path, sha256], ...]
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they are

    _ALWAYS = ("pool", "experiment", "grid_hash", "config_id", "coords", "model", "strategy", "window", "run_name")

    class Field:
        """The stored key of each field, for queries and projections (``filter.qlib_ext.<key>``)."""

        POOL: Final = "pool"
        EXPERIMENT: Final = "experiment"
        GRID_HASH: Final = "grid_hash"
        CONFIG_ID: Final = "config_id"
        COORDS: Final = "coords"
        MODEL: Final = "model"
        STRATEGY: Final = "strategy"
        WINDOW: Final = "window"
        RUN_NAME: Final = "run_name"
        SWEEP: Final = "sweep"
        KIND: Final = "kind"
        MODEL_CLASS: Final = "model_class"
        PARENT_RUN_ID: Final = "parent_run_id"
        PARENT_TASK_ID: Final = "parent_task_id"
        PARENT_ARTIFACTS: Final = "parent_artifacts"

    @classmethod
    def of(cls, task: dict) -> TaskMeta:
        """The block of a task dict (empty when it has none)."""
        return cls.from_dict(task.get(META) or {})

    @property
    def is_backtest(self) -> bool:
        """A backtest of a training run's predictions (train-once follow-up)."""
        return self.kind == KIND_BACKTEST


@dataclass
class SweepPoint(_Block):
    """One entry of ``qlib_ext.sweep``: a backtest a train-once training task queues once it has trained."""

    run_name: str | None = None  # the backtest run's name (the grid point's)
    config_id: str | None = None  # the grid point's config id
    coords: dict = field(default_factory=dict)  # the grid point's coordinates
    strategy: dict = field(default_factory=dict)  # its strategy kwargs
    record: list = field(default_factory=list)  # its PortAnaRecord configs, reading the training run's pred.pkl
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they are

    _ALWAYS = ("run_name", "config_id", "coords", "strategy", "record")


@contextmanager
def edit_meta(task: dict) -> Iterator[TaskMeta]:
    """Edit a task dict's ``qlib_ext`` block as a :class:`TaskMeta`; written back (``to_dict``) on exit."""
    meta = TaskMeta.of(task)
    yield meta
    task[META] = meta.to_dict()
