"""A pool as an Optuna study in an Optuna storage (``qlib-ext search export``), for optuna-dashboard.

A search pool is an Optuna study in all but storage: each trial document becomes one Optuna trial with the
same number, its params and distributions (the workflow's search space, or for a grid/random pool each
varied axis as :func:`qlib_ext.analysis.importance.varied_axes` reads it), its state, its value (the list of
values with several objectives, whose metric names the study carries), each rolling window's objective as an
intermediate value, and user attributes that link it back: the MLflow run ids, the run name, the config id.
A grid or random pool without trial documents exports one trial per finished configuration.

The export is incremental and safe to repeat: a trial already in the storage keeps its id (the dashboard's
pages stay valid); one that was running and has finished since gets its state, values and attributes. A
pool's study is named after the pool.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Any

from pymongo.database import Database

from qlib_ext.pool.record import Outcome, Tag, TaskMeta, Trial
from qlib_ext.search import queue
from qlib_ext.search.trials import TrialState, TrialStore

logger = logging.getLogger(__name__)

TRIAL_ATTR = Tag.TRIAL
"""User attribute of an exported Optuna trial: the pool's trial number (or the config id of a grid's row)."""

RUNS_ATTR, CONFIG_ATTR = "mlflow_run_ids", "config_id"
"""User attributes linking an exported trial to its MLflow runs."""

_STATES = {TrialState.RUNNING.value: "RUNNING", TrialState.COMPLETE.value: "COMPLETE",
           TrialState.PRUNED.value: "PRUNED", TrialState.FAIL.value: "FAIL"}


@dataclass
class Exported:
    """What one export did."""

    study: str  # the study's name (the pool's)
    trials: int  # trials in the study after the export
    added: int  # trials added by this export
    updated: int  # running trials that finished since the last export


@dataclass
class _Row:
    """One trial to export, storage-independent."""

    key: str  # the pool's trial number, or a config id
    state: str  # an Optuna TrialState name
    params: dict[str, Any]
    distributions: dict[str, Any]
    values: list[float] | None
    intermediate: dict[int, float]
    attrs: dict[str, Any]
    started: Any = None  # datetime the trial was proposed (None: now)
    finished: Any = None  # datetime it finished (None: now, for a finished trial)


def export(pool: str, storage: str, *, db: Database, mlflow_uri: str | None = None) -> Exported:
    """Write (or bring up to date) ``pool``'s study in the Optuna ``storage`` URL (``sqlite:///...``)."""
    import optuna

    from qlib_ext.pool.database import load_pool_meta

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "Using an existing study" line per export
    meta = load_pool_meta(db, pool)
    objectives = meta.objectives or [meta.objective or {"metric": "IC", "direction": "maximize"}]
    rows = _search_rows(db, pool, meta, objectives) or _grid_rows(db, pool, objectives)
    study = optuna.create_study(storage=storage, study_name=pool, load_if_exists=True,
                                directions=[o["direction"] for o in objectives])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o["metric"] for o in objectives])  # the dashboard's axis and column names
    study.set_user_attr(Tag.POOL, pool)
    study.set_user_attr("mlflow_uri", mlflow_uri or meta.mlflow_uri)
    done = {t.user_attrs.get(TRIAL_ATTR): t for t in study.get_trials(deepcopy=False)}
    added = updated = 0
    for row in rows:
        old = done.get(row.key)
        if old is None:
            study.add_trial(_frozen(row))
            added += 1
        elif old.state.name == "RUNNING" and row.state != "RUNNING":
            _finish(study, old, row)
            updated += 1
    logger.info("export %s: %d trials (%d added, %d finished since) in %s", pool, len(done) + added, added,
                updated, storage)
    return Exported(pool, len(done) + added, added, updated)


def _frozen(row: _Row) -> Any:
    import optuna

    state = optuna.trial.TrialState[row.state]
    trial = optuna.trial.create_trial(state=state, params=row.params, distributions=row.distributions,
                                      values=row.values if state == optuna.trial.TrialState.COMPLETE else None,
                                      intermediate_values=row.intermediate,
                                      user_attrs={TRIAL_ATTR: row.key, **row.attrs})
    if row.started is not None:  # the dashboard's timeline shows when the pool ran it, not when it was exported
        trial.datetime_start = row.started
        if state.is_finished() and row.finished is not None:
            trial.datetime_complete = row.finished
    return trial


def _finish(study: Any, old: Any, row: _Row) -> None:
    """A trial exported while running, now finished: its intermediate values, attributes, state and values."""
    import optuna

    storage, trial_id = study._storage, old._trial_id
    for step, value in row.intermediate.items():
        storage.set_trial_intermediate_value(trial_id, step, value)
    for key, value in row.attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    state = optuna.trial.TrialState[row.state]
    storage.set_trial_state_values(trial_id, state, row.values if state == optuna.trial.TrialState.COMPLETE else None)


# --------------------------------------------------------------------------- a search's trial documents
def _search_rows(db: Database, pool: str, meta: Any, objectives: list[dict]) -> list[_Row]:
    docs = TrialStore(db, pool).all(tasks=False)
    if not docs:
        return []
    from qlib_ext.pool.manager import GridTaskManager

    tm = GridTaskManager(pool, db)
    space = _space(meta)
    rows = []
    for doc in docs:
        states = queue.states(tm, doc[Trial.HASHES])
        params = dict(doc.get(Trial.PARAMS) or {})
        dists = _distributions(space, params)
        if not dists:  # a grid/random configuration searched with pruning: its coordinates
            params, dists = {}, {}
        value = doc.get(Trial.VALUE)
        values = None if value is None else [float(v) for v in (value if isinstance(value, list) else [value])]
        runs = [states[h].run_id for h in doc[Trial.HASHES] if h in states and states[h].run_id]
        metric = objectives[0]["metric"]
        intermediate = {i: float(states[h].metrics[metric]) for i, h in enumerate(doc[Trial.HASHES])
                        if h in states and isinstance(states[h].metrics.get(metric), (int, float))}
        rows.append(_Row(str(doc[Trial.NUMBER]), _STATES.get(doc[Trial.STATE], "FAIL"), params, dists, values,
                         intermediate if len(doc[Trial.HASHES]) > 1 else {},
                         {RUNS_ATTR: runs, CONFIG_ATTR: doc.get(Trial.CONFIG_ID)},
                         doc.get(Trial.CREATED_AT), doc.get(Trial.FINISHED_AT)))
    return rows


def _space(meta: Any) -> Any:
    """The workflow's grid (the search space) from the YAML recorded at submit; None when it cannot be read."""
    return _grid_of(str(meta.workflow)) if meta.workflow else None


@functools.lru_cache(maxsize=16)
def _grid_of(workflow: str) -> Any:
    """The grid of a workflow YAML, read once per process (``dashboard`` exports every few seconds)."""
    try:
        from qlib_ext.workflow.load import load_workflow

        return load_workflow(workflow).grid
    except Exception as e:  # noqa: BLE001 - the YAML moved: its trials export without distributions
        logger.warning("export: cannot read the workflow %s (%s); trials export without their params", workflow, e)
        return None


def _distributions(grid: Any, params: dict) -> dict[str, Any]:
    if grid is None or not params:
        return {}
    from qlib_ext.workflow.space import distributions

    try:
        return distributions(grid, params)
    except (KeyError, ValueError) as e:
        logger.warning("export: the workflow's space no longer has a trial's params (%s)", e)
        return {}


# --------------------------------------------------------------------------- a grid or random pool
def _grid_rows(db: Database, pool: str, objectives: list[dict]) -> list[_Row]:
    """One COMPLETE trial per finished configuration of a pool without trial documents (windows averaged)."""
    from qlib_ext.analysis.importance import by_config, points_from_results, scalar, varied_axes
    from qlib_ext.pool.manager import GridTaskManager

    tm = GridTaskManager(pool, db)
    results = tm.results()
    configs = by_config(points_from_results(results, [(o["metric"], o["direction"]) for o in objectives]))
    axes = varied_axes(configs)
    runs: dict[str, list[str]] = {}
    for res in results:
        if res.get(Outcome.RUN_ID):
            runs.setdefault(str(TaskMeta.from_dict(res.get("meta") or {}).config_id), []).append(res[Outcome.RUN_ID])
    rows = []
    for p in configs:
        ok = all(v is not None for v in p.values)
        rows.append(_Row(p.config, "COMPLETE" if ok else "FAIL", {k: scalar(p.params[k]) for k in axes}, axes,
                         [float(v) for v in p.values] if ok else None, {},  # type: ignore[arg-type]
                         {RUNS_ATTR: runs.get(p.config, []), CONFIG_ATTR: p.config}))
    return rows

