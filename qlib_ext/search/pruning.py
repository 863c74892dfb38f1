"""Walk-forward pruning: Optuna's pruners, stepping on the rolling window index.

A configuration reports after each window, in time order, once every earlier window is done: the mean
objective of its windows so far (``successive_halving``, ``median``), or the window's own value
(``wilcoxon``, a paired test against the best trial window by window). The first judgement comes after
``min_windows`` windows (step ``min_windows - 1``); the last window is never judged (it completes).
"""

from __future__ import annotations

import statistics
from typing import Any

from qlib_ext.workflow.spec import PruneSpec

SH_REDUCTION_FACTOR = 2
"""Successive halving keeps the best 1/2 of the configurations at each rung (Optuna's default is 4)."""

MEDIAN_STARTUP_TRIALS = 2
"""The median pruner prunes nothing until this many configurations have completed every window."""

WILCOXON_P = 0.1
"""p-value below which the Wilcoxon pruner drops a configuration worse than the best one."""


def make_pruner(spec: PruneSpec | None) -> Any:
    """The Optuna pruner of ``spec`` (``NopPruner`` without pruning)."""
    import optuna

    if spec is None:
        return optuna.pruners.NopPruner()
    first = spec.min_windows - 1
    if spec.method == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(first, 1), reduction_factor=SH_REDUCTION_FACTOR)
    if spec.method == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=first)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.WilcoxonPruner(p_threshold=WILCOXON_P, n_startup_steps=spec.min_windows)


def reported_value(spec: PruneSpec | None, values: list[float]) -> float:
    """The intermediate value at step ``len(values) - 1``: a running mean, or the window's own value."""
    if spec is not None and spec.method == "wilcoxon":
        return values[-1]
    return statistics.fmean(values)


def judged(spec: PruneSpec | None, step: int, windows: int) -> bool:
    """Whether the pruner is asked at ``step`` (a window index) of a configuration with ``windows`` windows."""
    return spec is not None and spec.min_windows - 1 <= step < windows - 1


def first_release(spec: PruneSpec | None, windows: int) -> int:
    """Windows queued as soon as a configuration starts: all without pruning, else ``min_windows``."""
    return windows if spec is None else min(spec.min_windows, windows)
