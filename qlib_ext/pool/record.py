"""The task record: every field name of a pool document, of its ``qlib_ext`` block and of our MLflow tags.

A pool document keeps Qlib's shape (``def``, ``filter``, ``status``, ``priority``, ``res``) so Qlib's
``TaskManager`` and ``python -m qlib.workflow.task.manage`` read it; the other fields are ours (:class:`Doc`).
Qlib 0.9.7 unpickles every field whose name *starts with* ``def`` or ``res``
(``TaskManager.ENCODE_FIELDS_PREFIX``), so no field of ours may: :func:`check_field_names` says so at import.

The task dict's ``qlib_ext`` block (grid coordinates, names, the train-once sweep, a backtest's
training run) is :class:`TaskMeta`, a dataclass with a dict/BSON round trip that leaves the stored
format as it was. The first MLflow tags are :class:`Tag`.

This module imports only the standard library: every layer (the workflow that writes the block,
the pool that stores it, the worker and tracking that read it) imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Final

META: Final = "qlib_ext"
"""Key of the qlib-ext block in a task dict (``task["qlib_ext"]``, stored under ``def`` and ``filter``)."""

QLIB_ENCODED_PREFIXES: Final = ("def", "res")
"""Field-name prefixes Qlib's ``TaskManager`` pickles and unpickles (``ENCODE_FIELDS_PREFIX``)."""

KIND_BACKTEST: Final = "backtest"
"""``qlib_ext.kind`` of a task that backtests a training run's predictions."""

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
    CREATED_AT: Final = "created_at"  # store time of insertion
    STARTED_AT: Final = "started_at"  # store time of the last claim
    LEASE_UNTIL: Final = "lease_until"  # store time the lease expires (only while running)
    FINISHED_AT: Final = "finished_at"  # store time of the commit
    REQUEUED_AT: Final = "requeued_at"  # store time of the last retry
    CANCELLED_AT: Final = "cancelled_at"  # store time of the cancel
    INFRA_RETRIES: Final = "infra_retries"  # hand-backs after faults outside the task (no attempt used)
    INFRA_ERROR: Final = "infra_error"  # the last such fault (ErrorEntry fields)
    OUTCOME: Final = "outcome"  # the committed result as plain BSON (run_id, metrics, ...)
    LEGACY_RESULT: Final = "result"  # OUTCOME's name in 0.1.0; renamed when a pool is opened


DOC_FORMAT: Final = 2
"""Format of the task documents: 1 = 0.1.0 (the committed result in ``result``), 2 = ``outcome``."""


class PoolMeta:
    """Field names of a pool's metadata document (collection ``_qlib_ext_pools``, ``_id`` = pool name)."""

    WORKFLOW: Final = "workflow"  # absolute path of the submitted YAML
    PROVIDER_URI: Final = "provider_uri"  # Qlib data directory at submit
    REGION: Final = "region"
    QLIB_INIT: Final = "qlib_init"  # further qlib.init arguments
    MLFLOW_URI: Final = "mlflow_uri"
    EXPERIMENT: Final = "experiment"
    WORKERS: Final = "workers"  # the workflow's workers: section (WorkersSpec as a dict)
    DATA: Final = "data"  # data identity (calendar range, instrument count)
    SUBMITTED_AT: Final = "submitted_at"
    SUBMITTED_FROM: Final = "submitted_from"
    DOC_FORMAT: Final = "doc_format"  # DOC_FORMAT the pool's documents were migrated to (absent: 1)


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
    LGB_NUM_THREADS: Final = "qlib_ext.lgb_num_threads"
    KIND: Final = "qlib_ext.kind"
    SWEEP: Final = "qlib_ext.sweep"
    PARENT_RUN_ID: Final = "qlib_ext.parent_run_id"
    DISCARDED: Final = "qlib_ext.discarded"  # on a FINISHED run whose result was never committed
    FLAGS: Final = "qlib_ext.flags"  # a run's sanity flags, comma-separated (tracking/flags.py)
    DSR: Final = "qlib_ext.dsr"  # a leaderboard row's Deflated Sharpe Ratio (leaderboard --tag-runs)
    AXES: Final = "qlib_ext.axes"  # grid run: JSON {short param name: full dotted path} (tracking/mlflow_ui.py)
    ROW: Final = "qlib_ext.row"  # what a run is in the grid's tables: grid, config, window, model
    TRIAL: Final = "qlib_ext.trial"  # a search trial's number (search/proposer.py)
    SAMPLER: Final = "qlib_ext.sampler"  # the search's sampler
    TRIAL_STATE: Final = "qlib_ext.trial_state"  # the trial's state
    PRUNED: Final = "qlib_ext.pruned"  # "true" on the runs of a pruned trial
    MLFLOW_PARENT: Final = "mlflow.parentRunId"  # MLflow's own: nests a backtest run under its training run
    HOSTNAME: Final = "hostname"


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


@dataclass
class TaskMeta:
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
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they are

    _ALWAYS = ("pool", "experiment", "grid_hash", "config_id", "coords", "model", "strategy", "window", "run_name")

    @classmethod
    def of(cls, task: dict) -> TaskMeta:
        """The block of a task dict (empty when it has none)."""
        return cls.from_dict(task.get(META) or {})

    @classmethod
    def from_dict(cls, block: dict) -> TaskMeta:
        """Read a stored block."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        meta = cls(**{k: v for k, v in block.items() if k in known},
                   extra={k: v for k, v in block.items() if k not in known})
        meta._present = [k for k in block if k in known]
        return meta

    def to_dict(self) -> dict:
        """The block as stored: the keys it was read with (or, for a new block, the always-present ones)
        in their order, then any other key set to a non-default value, then ``extra``."""
        present = getattr(self, "_present", None)
        keep = list(self._ALWAYS if present is None else present)
        out = {name: getattr(self, name) for name in keep}
        for f in dataclasses.fields(self):  # a key set since: any value other than the field's default
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name not in out and f.name != "extra" and getattr(self, f.name) != default:
                out[f.name] = getattr(self, f.name)
        return {**out, **self.extra}

    @property
    def is_backtest(self) -> bool:
        """A backtest of a training run's predictions (train-once follow-up)."""
        return self.kind == KIND_BACKTEST

    @property
    def window_index(self) -> int | None:
        """Index of the rolling window, None without rolling."""
        return (self.window or {}).get("index")
