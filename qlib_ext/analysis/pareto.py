"""Several objectives at once: Pareto fronts (non-dominated sorting) and the plot of the first front.

A configuration *dominates* another when it is at least as good on every objective and strictly better on
one. Front 1 (the Pareto front) is every configuration nobody dominates; front 2 is the Pareto front of
the rest, and so on (Deb's non-dominated sorting, the order NSGA-II ranks by). A configuration missing an
objective's value is dominated by any that has it (it ranks after every complete one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qlib_ext.errors import ConfigError

logger = logging.getLogger(__name__)

_MAXIMIZE = ("max", "maximize")

_DIRECTIONS = {"max": "max", "maximize": "max", "min": "min", "minimize": "min"}


def _signed(values: Sequence[Any], directions: Sequence[str]) -> tuple[float, ...] | None:
    """The values turned so that larger is better on each objective; None when one is missing."""
    out = []
    for value, direction in zip(values, directions, strict=True):
        if not isinstance(value, (int, float)) or math.isnan(value):
            return None
        out.append(float(value) if direction in _MAXIMIZE else -float(value))
    return tuple(out)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` dominates ``b`` (both signed so that larger is better)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def front_ranks(values: Sequence[Sequence[Any]], directions: Sequence[str]) -> list[int]:
    """The front (1 = Pareto front) of each point in ``values``, one tuple of objective values per point.

    Args:
        values: each point's objective values, in the order of ``directions``.
        directions: ``max``/``maximize`` or ``min``/``minimize`` per objective.

    Returns:
        One rank per point; a point with a missing or NaN value gets the rank after the last front.
    """
    signed = [_signed(v, directions) for v in values]
    ranks = [0] * len(values)
    left = [i for i, s in enumerate(signed) if s is not None]
    rank = 0
    while left:
        rank += 1
        front = [i for i in left if not any(dominates(signed[j], signed[i])  # type: ignore[arg-type]
                                            for j in left if j != i)]
        for i in front:
            ranks[i] = rank
        left = [i for i in left if ranks[i] == 0]
    return [r or rank + 1 for r in ranks]


def choose_objectives(rows: list[dict], wanted: Sequence[str], recorded: list[dict],
                       pool: str) -> list[tuple[str, str]]:
    """The objectives to rank by: ``--objective METRIC[:max|min]`` each (repeated), else the pool's
    ``grid.objective`` list; [] when there are none. Each metric is matched case-insensitively.

    Raises:
        ConfigError: a metric no run logged, or a direction that is not max/min (the message lists them).
    """
    items = [_split_objective(w) for w in wanted] if wanted else [
        (str(o.get("metric")), _DIRECTIONS.get(str(o.get("direction")), "max")) for o in recorded]
    where = "--objective" if wanted else f"grid.objective of pool {pool}"
    available = sorted({k for r in rows for k in r["metrics"]} | ({"sharpe", "psr", "dsr"} if rows else set()))
    by_lower = {k.lower(): k for k in available}
    for m, _ in items:
        if rows and m.lower() not in by_lower:
            raise ConfigError(f"unknown metric '{m}' in {where}; the runs logged: {', '.join(available)}")
    return [(by_lower.get(m.lower(), m), d) for m, d in items]


def _split_objective(text: str) -> tuple[str, str]:
    """``METRIC[:max|min|maximize|minimize]`` -> (metric, max|min); higher is better by default."""
    metric, _, direction = text.rpartition(":") if ":" in text else (text, "", "max")
    if direction not in _DIRECTIONS:
        raise ConfigError(f"unknown direction '{direction}' in --objective {text}; expected one of: "
                          + ", ".join(_DIRECTIONS))
    return metric, _DIRECTIONS[direction]


def mark_fronts(rows: list[dict], objectives: list[tuple[str, str]], value: Callable[[dict, str], Any]) -> None:
    """Each row's Pareto front over ``objectives`` (``front``: 1 = nobody dominates it), ``value(row, metric)``
    reading a row's metric; pruned rows rank after the rest and are not compared."""
    live = [r for r in rows if not r.get("pruned")]
    ranks = front_ranks([[value(r, m) for m, _ in objectives] for r in live], [d for _, d in objectives])
    for r, rank in zip(live, ranks, strict=True):
        r["front"] = rank
    for r in rows:
        r.setdefault("front", max(ranks, default=0) + 1)


def front_cell(row: dict) -> str:
    """``pareto`` for a row on the Pareto front, ``dominated (k)`` for one on the k-th front."""
    return "pareto" if row.get("front") == 1 else f"dominated ({row.get('front')})"


def front_line(grid: dict, rows: list[dict]) -> str:
    """The line above a multi-objective leaderboard: the objectives and the size of the front."""
    names = ", ".join(f"{o['metric']} ({o['direction']})" for o in grid["pareto_over"])
    n = sum(1 for r in rows if r.get("front") == 1)
    return (f"Pareto front over {names}: {n} of {len(rows)} configurations, listed first; each row below it "
            f"is dominated (another configuration is at least as good on every objective and better on one)")


def plot_front(points: Sequence[Sequence[float]], ranks: Sequence[int], names: Sequence[str],
               directions: Sequence[str], labels: Sequence[str], path: Path, title: str = "") -> Path:
    """Scatter of the first two objectives, the Pareto front highlighted and joined in order, as a PNG.

    Args:
        points: each configuration's objective values (the first two are drawn).
        ranks: each configuration's front (:func:`front_ranks`).
        names: the objectives' metric names.
        directions: each objective's direction (shown on the axis labels).
        labels: each configuration's short label (written next to the front's points).
        path: the PNG to write.
        title: the figure's title.

    Returns:
        ``path``.
    """
    from qlib_ext.analysis.plots import pyplot, save_png

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = [(p, r, lab) for p, r, lab in zip(points, ranks, labels, strict=True) if _signed(p[:2], directions[:2])]
    dominated = [p for p, r, _ in drawn if r > 1]
    front = sorted([(p, lab) for p, r, lab in drawn if r == 1], key=lambda t: t[0][0])
    if dominated:
        ax.scatter([p[0] for p in dominated], [p[1] for p in dominated], c="#9e9e9e", s=28,
                   label=f"dominated ({len(dominated)})")
    if front:
        ax.plot([p[0] for p, _ in front], [p[1] for p, _ in front], "-o", color="#d62728", ms=7,
                label=f"Pareto front ({len(front)})")
        for p, lab in front:
            ax.annotate(lab, (p[0], p[1]), textcoords="offset points", xytext=(-6, 6), ha="right", fontsize=7)
    ax.set_xlabel(f"{names[0]} ({_word(directions[0])})")
    ax.set_ylabel(f"{names[1]} ({_word(directions[1])})")
    ax.set_title(title or "Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def _word(direction: str) -> str:
    return "higher is better" if direction in _MAXIMIZE else "lower is better"
