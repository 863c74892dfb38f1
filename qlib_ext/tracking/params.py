"""The MLflow parameter names a grid's runs will log, checked at submit and ``expand`` time.

MLflow refuses a parameter name outside its character set (``a'b``, ``x@y``, ``a/../b``) or over 250
characters, on every attempt alike: a task whose axis name is refused would use all its attempts on a
permanent error. The names are derived from the grid's axes (:func:`qlib_ext.tracking.mlflow_ui.run_params`),
so they are known before any task is written, and checked here with MLflow's own validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlib_ext.errors import ConfigError
from qlib_ext.pool.record import STRATEGY_PREFIX


def check_param_names(tasks: list[dict], file: Path, grid: Any = None) -> None:
    """Refuse a workflow whose runs would log a parameter name MLflow refuses.

    Args:
        tasks: the expanded tasks (empty for a search, whose tasks are proposed later).
        file: the workflow YAML, for the message.
        grid: the ``GridSpec``; its axes are checked too (a search's only source of names).

    Raises:
        ConfigError: naming the file, the parameter name, the axis it comes from and MLflow's rule.
    """
    from qlib_ext.tracking.mlflow_ui import grid_axes, run_params, short_names

    names: dict[str, str] = {}  # name -> where it comes from
    if grid is not None:
        paths = {*grid.params, *(p for m in grid.models.values() for p in m.params),
                 *(STRATEGY_PREFIX + k for k in grid.strategies)}
        names.update({short: f"grid axis {path}" for path, short in short_names(paths).items()})
    axes = grid_axes(tasks) if tasks else {}
    for task in tasks:
        for name in run_params(task, axes):
            names.setdefault(name, f"grid axis {axes.get(name, name)}")
    for name, origin in names.items():
        problem = _problem(name)
        if problem:
            raise ConfigError(f"{origin} of {file} would be logged to MLflow as the parameter {name!r}, which "
                              f"MLflow refuses ({problem}); expected a key whose name MLflow accepts: rename the key "
                              "in the workflow (or its grid.models / grid.strategies entry)")


def _problem(name: str) -> str | None:
    """MLflow's own verdict on a parameter name, or None when it accepts it."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_param

    try:
        _validate_param(name, "")
    except MlflowException as e:
        return str(e.message)
    return None
