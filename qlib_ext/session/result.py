"""What ``qlib_ext.run`` returns: the pool, its counts, the leaderboard as a DataFrame, the grid's numbers
(N, PBO) and the MLflow links, and the exit code ``qlib-ext run`` would have ended with."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from qlib_ext.session.plan import Submitted

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """The outcome of :func:`qlib_ext.run`; plain data, made once the workers exited.

    Attributes:
        pool: the pool name.
        exit_code: 0 ok, 1 every task failed, 130 interrupted (see :mod:`qlib_ext.summary`).
        counts: tasks per status at the end (``{"done": 4, "failed": 1}``).
        leaderboard: ``pandas.DataFrame``, one row per configuration, best first (what
            :func:`qlib_ext.leaderboard` returns; empty when nothing finished).
        grid: the grid's numbers: ``metric``, ``direction``, ``trials`` (N), ``pbo`` ({"pbo": ...}) ...
        links: ``ui`` (the command that starts the MLflow UI), ``ranked`` and ``grid`` (URLs of the two views).
        submitted: what the submit did (new and total tasks, store URL, tracking URI, experiment).
        text: the summary ``qlib-ext run`` prints (leaderboard table, failures, links).
    """

    pool: str
    exit_code: int
    counts: dict[str, int] = field(default_factory=dict)
    leaderboard: Any = None
    grid: dict[str, Any] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    submitted: Submitted | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        """Whether the run ended cleanly (exit code 0)."""
        return self.exit_code == 0

    @property
    def pbo(self) -> float | None:
        """The grid's probability of backtest overfitting (None when not computed)."""
        value = (self.grid.get("pbo") or {}).get("pbo")
        return float(value) if value is not None else None


def result_of(outcome: Any, metric: str | None = None) -> RunResult:
    """The :class:`RunResult` of a finished session (:class:`qlib_ext.session.run.Outcome`)."""
    import pandas as pd

    sub, summary = outcome.submitted, outcome.summary
    frame, grid = pd.DataFrame(), dict(summary.grid)
    try:
        from qlib_ext.analysis.leaderboard import leaderboard_frame

        frame, grid = leaderboard_frame(outcome.pool, mongo_url=sub.mongo_url, mlflow_uri=sub.mlflow_uri,
                                        metric=metric)
        frame.attrs["grid"] = grid
    except Exception as e:  # noqa: BLE001 - the result still holds the counts, links and exit code
        logger.warning("run %s: no leaderboard: %s", outcome.pool, e)
    return RunResult(outcome.pool, outcome.code, dict(summary.counts), frame, grid, dict(summary.links), sub,
                     outcome.text)
