"""What one grid task does: train, record, backtest, inside its MLflow run through Qlib's recorder.

It mirrors Qlib's ``qlib.model.trainer.task_train`` (model and dataset from the task dict, records
with ``<MODEL>``/``<DATASET>`` placeholders) and adds what a grid needs: the grid coordinates as
MLflow params, stage timings and peak memory as metrics, qlib-ext tags, and a result made of plain
data — never a Recorder object, which Qlib's newer restricted unpickler refuses.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from qlib_ext import defaults
from qlib_ext.analysis.series import VALIDITY
from qlib_ext.pool.record import KEY_METRICS, KIND_BACKTEST, KIND_TRAIN, META, Outcome, Tag, TaskMeta
from qlib_ext.pool.worker_name import scheduler_job, split_worker
from qlib_ext.tracking import mlflow_ui

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux: the peak of this worker process so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mlflow_tags(task: dict, task_id: str, worker: str, attempt: int) -> dict[str, str]:
    """Tags that let a run be traced back to its pool, task, grid and worker (and training run)."""
    meta = TaskMeta.of(task)
    return {
        **_sweep_tags(meta),
        **_scheduler_tags(),
        Tag.POOL: str(meta.pool or ""),
        Tag.TASK_ID: str(task_id),
        Tag.GRID_HASH: str(meta.grid_hash or ""),
        Tag.CONFIG_ID: str(meta.config_id or ""),
        Tag.WORKER: worker,
        Tag.HOST: split_worker(worker)[0] if ":" in worker else socket.gethostname(),
        Tag.ATTEMPT: str(attempt),
        # What the worker's thread limits were, so oversubscription is visible in the MLflow UI.
        Tag.THREADS: os.environ.get("OMP_NUM_THREADS", ""),
        Tag.LGB_NUM_THREADS: str(task.get("model", {}).get("kwargs", {}).get("num_threads", "")),
        Tag.HOSTNAME: socket.gethostname(),
    }


def _scheduler_tags() -> dict[str, str]:
    """The SLURM/Kubernetes job this worker runs in (``qlib-ext launch``), none outside a scheduler."""
    job = scheduler_job()
    return {} if job is None else {Tag.SCHEDULER: job.scheduler, Tag.SCHEDULER_JOB: job.job,
                                   Tag.SCHEDULER_TASK: job.task}


def _sweep_tags(meta: TaskMeta) -> dict[str, str]:
    """A backtest run names its training run; ``mlflow.parentRunId`` makes the MLflow UI nest it."""
    if meta.is_backtest:
        parent = str(meta.parent_run_id or "")
        return {Tag.MLFLOW_PARENT: parent, Tag.PARENT_RUN_ID: parent, Tag.KIND: KIND_BACKTEST}
    if meta.sweep:
        return {Tag.KIND: KIND_TRAIN, Tag.SWEEP: str(len(meta.sweep))}
    return {}


def _plain(value: Any) -> Any:
    """A float BSON and JSON can hold (numpy scalars are neither)."""
    value = float(value)
    return None if math.isnan(value) else value


def run_grid_task(task: dict, run_id: str, *, cache_dir: str | None = None,
                  fast_backtest: bool = defaults.FAST_BACKTEST, experiment: str | None = None) -> dict:
    """Train and evaluate one task dict inside its MLflow run ``run_id``; return the plain-data result.

    Must run in a process where ``qlib.init`` set the provider and the MLflow experiment manager. The run
    was created RUNNING and tagged by the task's attempt (:func:`qlib_ext.worker.attempt.open_run`), and it
    is left RUNNING whatever happens here — returned, raised or interrupted: the attempt ends it once the
    result is committed (FINISHED) or its fate is recorded (FAILED, KILLED).
    ``cache_dir`` shares prepared datasets and backtest exchanges between tasks and workers, and
    LightGBM's binned data between a worker's fits (None: build everything every time).
    A task with ``qlib_ext.kind: backtest`` only backtests its training run's predictions (the
    worker queues those of a train-once training task: :mod:`qlib_ext.worker.follow_up`).
    ``fast_backtest`` runs covered ``PortAnaRecord`` backtests on ``qlib_ext.backtest``'s fast path
    (same reports and metrics; ``workers.fast_backtest``).
    A task without a ``qlib_ext`` block (one Qlib submitted: ``TrainerRM``, ``TaskManager.create_task``) runs
    as Qlib's ``task_train(task, experiment)`` would (its params logged, the ``task`` and ``dataset`` objects
    saved) in ``experiment``, and its result asks the commit for the Recorder in ``res``.
    """
    from qlib_ext.backtest.fast import fast_records

    stages = _backtest if TaskMeta.of(task).is_backtest else _train_and_record
    with fast_records(fast_backtest):
        return _in_run(task, run_id, lambda rec, timings: stages(task, rec, timings, cache_dir), experiment)


def _in_run(task: dict, run_id: str, body: Callable[[Any, dict[str, float]], Any],
            default_experiment: str | None = None) -> dict:
    """Run ``body(recorder, timings)`` inside the run ``run_id``, then log timings, short metric names and the
    sanity flags, all while the run is RUNNING (its figure is drawn later, off the worker:
    :func:`~qlib_ext.analysis.plots.log_run_figure`).

    ``body`` returns the fitted model (or None); the result's ``validity`` block holds the daily series
    and model checks the leaderboard's statistics and flags need (``qlib_ext.analysis.series``)."""
    from qlib.workflow import R

    from qlib_ext.tracking.artifacts import ArtifactLedger

    meta = TaskMeta.of(task)
    experiment = meta.experiment or default_experiment or "workflow"
    timings: dict[str, float] = {}
    _detach()  # nothing left attached by an earlier task (an interrupt can land in the middle of detaching)
    try:
        recorder = _attach(experiment, run_id, meta.run_name)
        ledger = ArtifactLedger(run_id)
        ledger.guard(recorder)  # every file uploaded is hashed, every file loaded back is checked
        R.save_objects(task=task)
        if META not in task:  # the rest of Qlib's _log_task_info (task_train's first step)
            from qlib.utils import flatten_dict

            R.log_params(**flatten_dict(task))
        model = body(recorder, timings)
        with _stage(timings, "validity"):
            validity = _validity(recorder, task, model)
        extra = {f"time.{k}_s": round(v, 4) for k, v in timings.items()}
        extra["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        R.log_metrics(**extra)
        _flush(recorder)  # Qlib logs metrics from a background thread: all of them in MLflow before reading
        logged = recorder.client.get_run(run_id).data.metrics
        mlflow_ui.log_headline_metrics(recorder.client, run_id, logged)  # short metric names
        metrics = {k: _plain(v) for k, v in logged.items()}
        validity["flags"] = _flag_run(recorder, task, validity, metrics)
    finally:
        _detach()
    qlib_made = {} if META in task else {Outcome.QLIB_RECORDER: True}
    return {
        **qlib_made,
        Outcome.RUN_ID: run_id,
        Outcome.EXPERIMENT: experiment,
        Outcome.EXPERIMENT_ID: recorder.experiment_id,
        Outcome.TRACKING_URI: recorder.uri,
        Outcome.METRICS: {k: metrics[k] for k in KEY_METRICS if k in metrics},
        Outcome.TIMINGS: extra,
        Outcome.ARTIFACTS: ledger.stored(),
        VALIDITY: validity,
    }


def _attach(experiment: str, run_id: str, run_name: str | None) -> Any:
    """Make the run ``run_id`` Qlib's active recorder (``R.start_exp`` resuming it; the run stays RUNNING).

    Raises:
        InfraError: MLflow could not find the run, so Qlib started another one (ended FAILED here).
    """
    from qlib.workflow import R

    from qlib_ext.errors import InfraError

    R.start_exp(experiment_name=experiment, recorder_id=run_id, recorder_name=run_name, resume=True)
    recorder = R.get_recorder()
    if recorder.id != run_id:  # Qlib creates a new run when it cannot read the one asked for
        R.end_exp("FAILED")
        raise InfraError(f"MLflow did not find the task's run {run_id} in experiment {experiment!r}")
    return recorder


def _flush(recorder: Any) -> None:
    """Wait until Qlib's background logging of ``recorder`` is done; later logging is synchronous."""
    if getattr(recorder, "async_log", None) is not None:
        recorder.async_log.wait()  # closes Qlib's AsyncCaller and joins its thread (what end_run does first)
        recorder.async_log = None


def _detach() -> None:
    """Forget the active run in this process without ending it, so that it stays RUNNING for its attempt to end.

    Qlib's ``R.end_exp`` would end it (MLflow's ``end_run``), and MLflow's atexit hook ends whatever run is
    still on its active-run stack FINISHED when the process exits: both are avoided by clearing Qlib's
    active experiment and recorder and taking the run off MLflow's stack. Never raises.
    """
    from mlflow.tracking import fluent
    from qlib.workflow import R

    manager = R.exp_manager
    experiment = manager.active_experiment
    recorder = getattr(experiment, "active_recorder", None)
    try:
        _flush(recorder)
    except Exception as e:  # noqa: BLE001 - detaching goes on: a lost metric is not worth a ghost run
        logger.warning("worker: run %s: Qlib's background logging failed (%s)", getattr(recorder, "id", "?"), e)
    if experiment is not None:
        experiment.active_recorder = None
    manager.active_experiment = None
    manager._active_exp_uri = None
    stack = fluent._active_run_stack.get()
    for run in stack:
        monitor = fluent.run_id_to_system_metrics_monitor.pop(run.info.run_id, None)
        if monitor is not None:  # MLflow's system metrics (worker/loop.py): stopped, the run left as it is
            _finish_system_metrics(monitor)
    stack.clear()
    fluent.MLFLOW_RUN_ID.unset()


def _finish_system_metrics(monitor: Any) -> None:
    """Stop MLflow's system-metrics thread and log its last, partial interval: MLflow's ``finish`` drops the
    samples taken since the last full interval, which for a task shorter than one interval is all of them."""
    try:
        monitor.finish()
        last = monitor.aggregate_metrics()
        if last:
            monitor.publish_metrics(last)
            monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001 - a lost sample is not worth the task
        logger.warning("worker: run %s: could not log the last system metrics (%s)", monitor._run_id, e)


def _validity(recorder: Any, task: dict, model: Any) -> dict:
    """The validity block; a failure here is logged, never fails the task (the statistics are then missing)."""
    from qlib_ext.analysis.series import collect

    try:
        return collect(recorder, task, model)
    except Exception:
        logger.warning("worker: run %s: could not collect the validity series", recorder.id, exc_info=True)
        return {}


def _flag_run(recorder: Any, task: dict, validity: dict, metrics: dict) -> list[str]:
    """The run's sanity flags, also set as the MLflow tag ``qlib_ext.flags`` (comma-separated)."""
    from qlib_ext.analysis.flags import FLAGS_TAG, run_flags

    flags = run_flags(validity, metrics, rolling=bool(TaskMeta.of(task).window))
    if flags:
        recorder.client.set_tag(recorder.id, FLAGS_TAG, ",".join(flags))
    return flags


def _train_and_record(task: dict, recorder: Any, timings: dict[str, float], cache_dir: str | None) -> Any:
    """Qlib's ``_exe_task`` with each stage timed: data, fit, signal records, backtest."""
    from qlib.model.base import Model
    from qlib.utils import auto_filter_kwargs, fill_placeholder, init_instance_by_config
    from qlib.workflow import R
    from qlib.workflow.record_temp import PortAnaRecord

    from qlib_ext.cache.lgb_bins import reused_lgb_data
    from qlib_ext.tracking.batch import batched_metrics
    from qlib_ext.worker import torch_compat
    from qlib_ext.worker.sanity import check_record

    with _stage(timings, "data"):
        dataset = _dataset(task["dataset"], cache_dir)
    torch_compat.prepare(task["model"])
    model = init_instance_by_config(task["model"], accept_types=Model)
    with _stage(timings, "fit"), reused_lgb_data(model, _dataset_key(task["dataset"], cache_dir), cache_dir), \
            batched_metrics(recorder):  # the training curve in a few requests, not one per round
        auto_filter_kwargs(model.fit)(dataset, reweighter=task.get("reweighter"))
    R.save_objects(**{"params.pkl": model})
    if META not in task:  # Qlib's _exe_task keeps the dataset's config (not its data) for online serving
        dataset.config(dump_all=False, recursive=True)
        R.save_objects(**{"dataset": dataset})
    filled = fill_placeholder(copy.deepcopy({k: v for k, v in task.items() if k != META}),
                              {"<MODEL>": model, "<DATASET>": dataset})
    records = filled.get("record", [])
    for record in [records] if isinstance(records, dict) else records:
        rec = init_instance_by_config(record, recorder=recorder, default_module="qlib.workflow.record_temp",
                                      try_kwargs={"model": model, "dataset": dataset})
        with _stage(timings, "backtest" if isinstance(rec, PortAnaRecord) else "signal"):
            backtest_stage(rec, cache_dir)
        check_record(rec)  # no predictions, all NaN, never traded: fail, never done
    return model


def _backtest(task: dict, recorder: Any, timings: dict[str, float], cache_dir: str | None) -> None:
    """Backtest the training run's predictions with this task's ``PortAnaRecord`` configs."""
    from qlib.utils import init_instance_by_config
    from qlib.workflow import R

    from qlib_ext.pool.record import SIGNAL_METRICS
    from qlib_ext.tracking.artifacts import digest_map
    from qlib_ext.worker.sanity import check_record

    meta = TaskMeta.of(task)
    parent = str(meta.parent_run_id)
    with _stage(timings, "load"):
        _copy_signal(recorder, parent, digest_map(meta.parent_artifacts))
    # the leaderboard ranks backtest rows by IC too: the signal metrics are the training run's
    signal = recorder.client.get_run(parent).data.metrics
    R.log_metrics(**{k: v for k, v in signal.items() if k in SIGNAL_METRICS})
    for record in task["record"]:
        rec = init_instance_by_config(record, recorder=recorder, default_module="qlib.workflow.record_temp")
        rec.check()  # Qlib's generate() only logs a warning and skips when pred.pkl/label.pkl are missing
        with _stage(timings, "backtest"):
            backtest_stage(rec, cache_dir)
        check_record(rec)


def _copy_signal(recorder: Any, parent: str, digests: dict | None) -> None:
    """Copy ``pred.pkl`` and ``label.pkl`` of the training run into this run, byte for byte, once their digests
    are those the task carries from the training task's attempt (None: a task queued before digests)."""
    import tempfile

    from qlib_ext.errors import TaskError
    from qlib_ext.tracking.artifacts import SIGNAL_ARTIFACTS, check_digest

    with tempfile.TemporaryDirectory(prefix="qlib-ext-signal-") as tmp:
        for name in SIGNAL_ARTIFACTS:
            try:
                path = recorder.client.download_artifacts(parent, name, tmp)
            except Exception as e:
                raise TaskError(f"training run {parent} has no {name} (SignalRecord) to backtest: {e}") from e
            check_digest(parent, name, path, digests)
        recorder.save_objects(local_path=tmp)


def _dataset(config: dict, cache_dir: str | None) -> Any:
    from qlib.data.dataset import Dataset
    from qlib.utils import init_instance_by_config

    if cache_dir is None:
        return init_instance_by_config(config, accept_types=Dataset)
    from qlib_ext.cache.datasets import prepared_dataset

    return prepared_dataset(config, cache_dir)


def _dataset_key(config: dict, cache_dir: str | None) -> str | None:
    if cache_dir is None:
        return None
    from qlib_ext.cache.datasets import dataset_key

    return dataset_key(config)


def backtest_stage(record: Any, cache_dir: str | None) -> None:
    """Generate one record as a worker's stage does: a ``PortAnaRecord`` gets the shared exchange first (with a
    cache), then Qlib's ``generate`` runs (on the fast path inside :func:`~qlib_ext.backtest.fast.fast_records`),
    its metrics written in one ``log_batch`` when it is done instead of one background ``log_metric`` each."""
    from qlib_ext.tracking.batch import batched_metrics

    if cache_dir is not None:
        from qlib_ext.cache.exchange import share_exchange

        share_exchange(record, cache_dir)
    with batched_metrics(record.recorder):
        record.generate()
