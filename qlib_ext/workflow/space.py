"""The search space of a ``grid:`` section as Optuna sees it, and the tasks of one proposed point.

A sampler search (``search: tpe | cmaes | gp | qmc``) uses the same axes as random search: a list is a
categorical choice, ``{dist: int|uniform|loguniform, low, high}`` a numeric one. ``grid.models``
alternatives become a categorical ``model`` parameter whose sub-space (that model's ``params``) is
suggested only when it is chosen (Optuna's define-by-run), under names prefixed ``<model>:`` so two
models' axes never share a distribution. Strategy axes are named ``strategy:<key>``.

:func:`suggest` asks an Optuna trial for a :class:`Point`; :func:`point_tasks` turns a point into the
same task dicts ``expand`` would make for it (one per rolling window, oldest first), so the pool's
dedup hash recognises a proposal equal to a point that already ran. Optuna is imported lazily.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from qlib_ext.pool.record import STRATEGY_PREFIX, TaskMeta
from qlib_ext.workflow.expand import (
    META,
    WindowGen,
    _finish,
    _labels,
    _to_task,
    apply_model,
    apply_param,
    apply_strategy,
    check_backtest_end,
    check_bson,
    draft_meta,
    read_calendar,
    workflow_hash,
)
from qlib_ext.workflow.load import Workflow
from qlib_ext.workflow.spec import GridSpec, Values

MODEL_PARAM = "model"
"""Optuna parameter name of the ``grid.models`` choice."""

STRATEGY_PARAM = "strategy:"
"""Prefix of the Optuna parameter names of strategy axes."""

_SCALARS = (str, int, float, bool, type(None))


@dataclass
class Point:
    """One configuration: a model alternative (or None), root-path params and strategy keys."""

    model: str | None = None  # key under grid.models, None without a models axis
    params: dict[str, Any] = field(default_factory=dict)  # dotted path from the YAML root -> value
    strategies: dict[str, Any] = field(default_factory=dict)  # key inside strategy.kwargs -> value


def distribution(values: Values) -> Any:
    """The Optuna distribution of one axis: categorical for a list (of indices when a value is not a
    distinct scalar Optuna can store), int/float (log for loguniform) for a ``Dist``."""
    import optuna.distributions as od

    if isinstance(values, list):
        return od.CategoricalDistribution(values if _is_scalar_list(values) else list(range(len(values))))
    if values.dist == "int":
        return od.IntDistribution(int(values.low), int(values.high))
    return od.FloatDistribution(float(values.low), float(values.high), log=values.dist == "loguniform")


def _is_scalar_list(values: list) -> bool:
    return all(isinstance(v, _SCALARS) for v in values) and len(set(map(repr, values))) == len(values)


def _decode(values: Values, raw: Any) -> Any:
    """The axis value of an Optuna parameter value (index lookup for non-scalar categoricals)."""
    if isinstance(values, list):
        return raw if _is_scalar_list(values) else values[raw]
    if values.dist != "int":
        return float(f"{raw:.6g}")  # as random search does: 6 digits, stable run names and hashes
    return int(raw)


def suggest(trial: Any, grid: GridSpec) -> Point:
    """Ask an Optuna trial (or a fixed trial being replayed) for one point of ``grid``'s space."""
    point = Point()
    if grid.models:
        point.model = trial.suggest_categorical(MODEL_PARAM, list(grid.models))
    for path, values in grid.params.items():
        point.params[path] = _decode(values, _suggest(trial, path, values))
    if point.model is not None:
        for path, values in grid.models[point.model].params.items():
            point.params[path] = _decode(values, _suggest(trial, f"{point.model}:{path}", values))
    for key, values in grid.strategies.items():
        point.strategies[key] = _decode(values, _suggest(trial, STRATEGY_PARAM + key, values))
    return point


def _suggest(trial: Any, name: str, values: Values) -> Any:
    dist = distribution(values)
    if isinstance(values, list):
        return trial.suggest_categorical(name, list(dist.choices))
    if values.dist == "int":
        return trial.suggest_int(name, dist.low, dist.high)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def distributions(grid: GridSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The distribution of each Optuna parameter in ``params`` (a trial's params), for ``create_trial``."""
    out = {}
    for name in params:
        if name == MODEL_PARAM:
            import optuna.distributions as od

            out[name] = od.CategoricalDistribution(list(grid.models))
        elif name.startswith(STRATEGY_PARAM):
            out[name] = distribution(grid.strategies[name[len(STRATEGY_PARAM):]])
        elif ":" in name:
            model, path = name.split(":", 1)
            out[name] = distribution(grid.models[model].params[path])
        else:
            out[name] = distribution(grid.params[name])
    return out


class PointBuilder:
    """Builds the task dicts of points of one workflow (the calendar read once)."""

    def __init__(self, wf: Workflow, provider_uri: str | None = None):
        self.wf = wf
        self.calendar = read_calendar(wf, provider_uri, required=wf.grid.rolling is not None)
        self.grid_hash = workflow_hash(wf)
        self.labels = _labels(_space_paths(wf.grid))

    def tasks(self, point: Point) -> list[dict]:
        """The tasks of ``point``: one, or one per rolling window oldest first (each BSON-checked).

        No train-once sweep: in a sampler search every trial trains its own model.
        """
        root = copy.deepcopy(self.wf.config)
        root[META] = draft_meta()
        if point.model is not None:
            apply_model(root, self.wf.grid.models[point.model])
        for path, value in point.params.items():
            apply_param(root, path, value)
        for key, value in point.strategies.items():
            apply_strategy(root, key, value)
        tasks = [_to_task(root)]
        if self.wf.grid.rolling is not None:
            tasks = WindowGen(self.wf.grid.rolling, self.calendar, self.wf.path).generate(tasks[0])
        for task in tasks:
            _finish(task, self.wf, self.grid_hash, self.labels)
            check_bson(task, self.wf.path, TaskMeta.of(task).run_name or "")
            if self.calendar:
                check_backtest_end(task, self.calendar, self.wf.path)
        return tasks


def _space_paths(grid: GridSpec) -> set[str]:
    """Every coordinate name a point can have (so run-name labels do not depend on the point)."""
    paths = set(grid.params) | {STRATEGY_PREFIX + k for k in grid.strategies}
    for model in grid.models.values():
        paths |= set(model.params)
    return paths


__all__ = ["Point", "PointBuilder", "suggest", "distribution", "distributions", "MODEL_PARAM", "STRATEGY_PARAM"]
