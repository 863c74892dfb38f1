"""Sizes checked before anything is built: a workflow YAML's node count with its aliases expanded (alias
bombs), and a grid's task count (the product of its axes) against ``grid.max_points``.

Both checks only count: a 10^7-point grid or a YAML of nested aliases is refused in milliseconds with a
ConfigError naming the file, instead of filling memory for a minute and dying with MemoryError.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import ConfigError


def check_yaml_size(data: Any, file: Path, cap: int = defaults.MAX_YAML_NODES) -> None:
    """Refuse a parsed YAML document whose aliases expand to more than ``cap`` nodes, or refer to themselves.

    A YAML alias is one shared Python object, so parsing is cheap; but copying, hashing or printing the
    configuration expands every alias, and nine nested levels of ten aliases are 10^9 nodes. Counted
    once per object (memoised), so the count itself stays linear in the file.

    Raises:
        ConfigError: naming the file, the expanded node count (at least) and the cap.
    """
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise ConfigError(f"YAML alias in {file} refers to a mapping or list that contains it (a recursive "
                              "alias); expected a tree: an alias may only repeat a node defined before and outside it")
        open_.add(id(node))
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > cap:
                raise ConfigError(f"YAML of {file} expands to more than {cap:,} nodes once its aliases are "
                                  f"expanded (an alias bomb?); expected a configuration under {cap:,} nodes "
                                  "(qlib_ext.defaults.MAX_YAML_NODES)")
        open_.discard(id(node))
        sizes[id(node)] = total
        return total

    size(data)


def grid_axes(spec: Any) -> dict[str, int]:
    """Each axis of a ``GridSpec`` (params, ``grid.models`` as one axis, strategies) and its length."""
    axes: dict[str, int] = {}
    if spec.models:
        axes["grid.models"] = sum(math.prod(_length(v) for v in m.params.values()) for m in spec.models.values())
    axes.update({path: _length(v) for path, v in spec.params.items()})
    axes.update({f"grid.strategies.{k}": _length(v) for k, v in spec.strategies.items()})
    return axes


def _length(values: Any) -> int:
    return len(values) if isinstance(values, list) else 1


def check_grid_size(spec: Any, file: Path, windows: int = 1) -> None:
    """Refuse a grid (``GridSpec``) of more than ``spec.max_points`` tasks, before any task is built.

    Args:
        spec: the parsed ``grid:`` section.
        file: the workflow YAML, for the message.
        windows: rolling windows per grid point (1 before they are known).

    Raises:
        ConfigError: naming the file, each axis and its length, the task count and the cap.
    """
    if spec.search == "grid":
        axes = grid_axes(spec)
        points = math.prod(axes.values())
        shown = " x ".join(f"{name}: {n:,}" for name, n in axes.items())
    elif spec.search == "random":
        points, shown = spec.n_trials or 0, f"grid.n_trials: {spec.n_trials:,}"
    else:  # a sampler proposes its trials one batch at a time: nothing is expanded up front
        return
    total = points * windows
    if total <= spec.max_points:
        return
    if windows > 1:
        shown += f" x rolling windows: {windows:,}"
    raise ConfigError(f"grid of {file} expands to {total:,} tasks ({shown}), above the cap of {spec.max_points:,} "
                      f"(grid.max_points, default {defaults.MAX_GRID_POINTS:,}); expected fewer values per axis, "
                      "search: random with n_trials, or a larger grid.max_points if the store and workers can "
                      "hold that many tasks")
