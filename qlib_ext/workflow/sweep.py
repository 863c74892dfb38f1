"""Train once, sweep strategies: H model configurations x S strategy points train H models, not H x S.

At expansion (:func:`train_once`), grid tasks that differ only in their ``PortAnaRecord`` configs
(strategy kwargs, backtest settings) become one training task without those records; the points
are listed under ``qlib_ext.sweep``. After training, the worker turns the sweep into backtest tasks
(``qlib_ext.kind: backtest``) that name the training run and queues them before committing the
training task (:mod:`qlib_ext.worker.follow_up`): ordinary waiting tasks, so every worker backtests
in parallel, each in its own MLflow run nested under the training run.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path

from qlib_ext.errors import ConfigError
from qlib_ext.identity import digest
from qlib_ext.pool.record import META, SweepPoint, TaskMeta
from qlib_ext.workflow.spec import is_port_ana

logger = logging.getLogger(__name__)

_MISSING = object()


def split_records(task: dict) -> tuple[list, list]:
    """The task's records as (everything else, ``PortAnaRecord`` configs), in order."""
    records = task.get("record") or []
    records = [records] if isinstance(records, dict) else list(records)
    return [r for r in records if not is_port_ana(r)], [r for r in records if is_port_ana(r)]


def training_key(task: dict) -> str:
    """Identity of what a task trains: the task without its PortAnaRecords, coordinates and names."""
    meta = TaskMeta.of(task)
    body = {k: v for k, v in task.items() if k != META}
    body["record"] = split_records(task)[0]
    return digest({"task": body, "model": meta.model, "window": meta.window})


def train_once(tasks: list[dict], finish: Callable[[dict], None], file: Path) -> list[dict]:
    """Merge tasks that train the same model into one training task with a sweep of backtests.

    Args:
        tasks: finished grid tasks (each with its full ``qlib_ext`` block).
        finish: fills a training task's ``qlib_ext`` block (config id, run name) from its
            ``coords``/``model``/``strategy``/``window``; keeps ``sweep``.
        file: the workflow, for error messages.

    Returns:
        The tasks in their order, each group of two or more replaced (at its first member) by one
        training task; a task alone in its group is left whole (one run, as without a sweep).

    Raises:
        ConfigError: a PortAnaRecord needs the model or dataset object, which a backtest task lacks.
    """
    groups: dict[str, list[dict]] = {}
    for task in tasks:
        groups.setdefault(training_key(task), []).append(task)
    out = []
    for members in groups.values():
        if len(members) == 1 or not split_records(members[0])[1]:
            out.extend(members)
            continue
        task = _training_task(members, file)
        finish(task)
        out.append(task)
    return out


def _training_task(members: list[dict], file: Path) -> dict:
    first = members[0]
    meta = TaskMeta.of(first)
    coords = {k: v for k, v in meta.coords.items()
              if all(TaskMeta.of(m).coords.get(k, _MISSING) == v for m in members)}
    task = {k: copy.deepcopy(v) for k, v in first.items() if k != META}
    task["record"] = split_records(first)[0]
    task[META] = TaskMeta(coords=coords, model=meta.model, strategy={}, window=meta.window,
                          sweep=[_sweep_entry(m, file) for m in members]).to_dict()
    return task


def _sweep_entry(task: dict, file: Path) -> dict:
    meta = TaskMeta.of(task)
    records = [_signal_from_pred(r, file, meta.run_name or "") for r in split_records(task)[1]]
    return SweepPoint(meta.run_name, meta.config_id, meta.coords, meta.strategy, records).to_dict()


def _signal_from_pred(record: dict, file: Path, run_name: str) -> dict:
    """A strategy given ``model: <MODEL>, dataset: <DATASET>`` predicts the test segment, which is
    exactly the training run's ``pred.pkl``: give it ``signal: <PRED>`` instead."""
    record = copy.deepcopy(record)
    kwargs = record["kwargs"]["config"]["strategy"].setdefault("kwargs", {})
    if kwargs.get("model") == "<MODEL>" and kwargs.get("dataset") == "<DATASET>":
        del kwargs["model"], kwargs["dataset"]
        kwargs["signal"] = "<PRED>"
    text = json.dumps(record, default=str)
    if "<MODEL>" in text or "<DATASET>" in text:
        raise ConfigError(f"a PortAnaRecord of task '{run_name}' in {file} uses <MODEL> or <DATASET>, which a "
                          "sweep backtest does not have (it reads the training run's pred.pkl); use "
                          "strategy kwargs signal: <PRED>, or set grid.train_once: false")
    return record
