"""What drove the result: hyperparameter importances over a pool's finished configurations.

Two of Optuna's evaluators, because they answer two different questions (docs/validity.md):

- **fANOVA** (``FanovaImportanceEvaluator``, Hutter et al. 2014): a random forest fitted to objective ~ axes,
  then each axis's share of the objective's variance over the whole space (its main effect). It answers
  "which axis moves the objective", for a grid, a random pool or a search alike.
- **PED-ANOVA** (``PedAnovaImportanceEvaluator``, Watanabe et al. 2023): how differently an axis is spread in
  the top quantile of configurations than in all of them. It answers "which axis must be set right to be among
  the best", needs no model fit, and with several objectives it measures what it takes to reach the Pareto front.

The configurations are read from the pool's committed results (no MLflow needed): one point per configuration
(its windows' mean for a walk-forward pool) with its grid coordinates as the axes; pruned configurations are
left out (their mean covers only their first windows). A walk-forward pool also gets fANOVA per window, shown
when the windows disagree (an axis's share differs by more than ``IMPORTANCE_DISAGREE`` between two windows).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlib_ext import defaults
from qlib_ext.pool.record import HEADLINE_METRICS, Doc, Outcome, TaskMeta

logger = logging.getLogger(__name__)

FANOVA, PED_ANOVA = "fanova", "ped_anova"
"""Keys of the two evaluators' results."""


@dataclass
class Point:
    """One configuration (or one window of it): its axes and its value per objective."""

    params: dict[str, Any]  # axis (dotted path, or "model") -> value
    values: list[float | None]  # one per objective; None where the result has no such metric
    config: str = ""  # config_id
    window: int | None = None  # rolling window index (None: the whole configuration)


@dataclass
class Importance:
    """The importances of one pool: per objective and evaluator, axis -> share (summing to 1)."""

    configurations: int
    objectives: list[tuple[str, str]]  # (metric, max|min)
    shares: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # metric -> evaluator -> axis
    front: dict[str, float] = field(default_factory=dict)  # PED-ANOVA of reaching the Pareto front (several)
    windows: dict[int, dict[str, float]] = field(default_factory=dict)  # window -> fANOVA of the first objective
    disagree: bool = False  # the windows' fANOVA shares differ (see IMPORTANCE_DISAGREE)
    note: str = ""  # why nothing was computed

    def to_dict(self) -> dict:
        """Plain data (JSON, ``leaderboard --json``)."""
        return {"configurations": self.configurations, "ranked_by": [list(o) for o in self.objectives],
                "shares": self.shares, "front": self.front, "windows": {str(k): v for k, v in self.windows.items()},
                "disagree": self.disagree, "note": self.note}


# --------------------------------------------------------------------------- reading a pool
def points_from_results(results: list[dict], objectives: list[tuple[str, str]],
                        pruned: set[str] = frozenset()) -> list[Point]:  # type: ignore[assignment]
    """One point per committed task (a window of a rolling configuration is a point of its own)."""
    points = []
    for res in results:
        meta = TaskMeta.from_dict(res.get("meta") or {})
        if meta.sweep or meta.config_id in pruned:
            continue
        params = dict(meta.coords)
        if meta.model:
            params["model"] = meta.model
        metrics = res.get(Outcome.METRICS) or {}
        values = [_metric(metrics, m) for m, _ in objectives]
        points.append(Point(params, values, str(meta.config_id or res.get(Doc.ID)), (meta.window or {}).get("index")))
    return points


def _metric(metrics: dict, name: str) -> float | None:
    value = metrics.get(name, metrics.get(HEADLINE_METRICS.get(name, "")))
    if value is None:
        lower = {k.lower(): v for k, v in metrics.items()}
        value = lower.get(name.lower())
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def by_config(points: list[Point]) -> list[Point]:
    """One point per configuration: the mean of each objective over its windows."""
    groups: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        groups[p.config].append(p)
    out = []
    for config, members in groups.items():
        values: list[float | None] = []
        for i in range(len(members[0].values)):
            vs = [m.values[i] for m in members]
            values.append(None if any(v is None for v in vs) else statistics.fmean(vs))  # type: ignore[arg-type]
        params = {k: v for k, v in members[0].params.items() if not k.startswith("window")}
        out.append(Point(params, values, config))
    return out


def pool_importance(pool: str, objectives: list[tuple[str, str]], *, mongo_url: str | None = None,
                    db_name: str | None = None) -> Importance:
    """The importances of ``pool``'s finished configurations over ``objectives`` ((metric, max|min) each)."""
    from qlib_ext.pool.database import open_db
    from qlib_ext.pool.manager import GridTaskManager

    tm = GridTaskManager(pool, open_db(mongo_url, db_name or defaults.TASK_DB_NAME))
    pruned = {str(TaskMeta.from_dict(block).config_id) for block in tm.metas("pruned")}
    return importance(points_from_results(tm.results(), objectives, pruned), objectives)


# --------------------------------------------------------------------------- computing
def importance(points: list[Point], objectives: list[tuple[str, str]], seed: int = 0) -> Importance:
    """fANOVA and PED-ANOVA per objective over ``points`` (windows folded per configuration), PED-ANOVA of the
    Pareto front for several objectives, and fANOVA per window when there are windows."""
    configs = by_config(points)
    result = Importance(len(configs), list(objectives))
    axes = varied_axes(configs)
    if len(configs) < defaults.IMPORTANCE_MIN_CONFIGS or not axes:
        result.note = (f"needs {defaults.IMPORTANCE_MIN_CONFIGS} finished configurations over at least one varied "
                       f"axis, have {len(configs)} over {len(axes)}")
        return result
    for i, (metric, direction) in enumerate(objectives):
        study = _study(configs, axes, [(i, direction)])
        if len(study.trials) < defaults.IMPORTANCE_MIN_CONFIGS:
            continue
        result.shares[metric] = {FANOVA: _evaluate(study, FANOVA, seed),
                                 PED_ANOVA: _evaluate(study, PED_ANOVA, seed)}
    if len(objectives) > 1:
        study = _study(configs, axes, list(enumerate(d for _, d in objectives)))
        if len(study.trials) >= defaults.IMPORTANCE_MIN_CONFIGS:
            result.front = _evaluate(study, PED_ANOVA, seed)
    windows = sorted({p.window for p in points if p.window is not None})
    if len(windows) > 1 and objectives:
        for w in windows:
            study = _study([p for p in points if p.window == w], axes, [(0, objectives[0][1])])
            if len(study.trials) >= defaults.IMPORTANCE_MIN_CONFIGS:
                result.windows[w] = _evaluate(study, FANOVA, seed)
        result.disagree = _disagree(list(result.windows.values()))
    return result


def varied_axes(points: list[Point]) -> dict[str, Any]:
    """Each axis that takes two or more values across ``points``, with the Optuna distribution it is read as:
    integers as an int range, other numbers as a float range (log where they span a factor of 10 or more above
    zero), anything else as categorical."""
    import optuna.distributions as od

    values: dict[str, list[Any]] = defaultdict(list)
    for p in points:
        for k, v in p.params.items():
            values[k].append(scalar(v))
    axes: dict[str, Any] = {}
    for k, vs in values.items():
        distinct = sorted(set(vs), key=repr)
        if len(distinct) < 2 or len(vs) < len(points):  # constant, or conditional (not on every point)
            continue
        if all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
            axes[k] = od.IntDistribution(min(distinct), max(distinct))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
            low, high = float(min(distinct)), float(max(distinct))
            axes[k] = od.FloatDistribution(low, high, log=low > 0 and high / low >= 10)
        else:
            axes[k] = od.CategoricalDistribution(distinct)
    return axes


def scalar(value: Any) -> Any:
    """A value Optuna can hold as a parameter (a list or mapping becomes its JSON text)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _study(points: list[Point], axes: dict[str, Any], which: list[tuple[int, str]]) -> Any:
    """An in-memory Optuna study of ``points``' values ``which`` ((index, direction) each) over ``axes``."""
    import optuna

    directions: Any = ["maximize" if d in ("max", "maximize") else "minimize" for _, d in which]
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line per study
    study = optuna.create_study(directions=directions)
    for p in points:
        values: Any = [p.values[i] for i, _ in which]
        if any(v is None for v in values):
            continue
        params = {k: scalar(p.params[k]) for k in axes}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=axes, values=values))
    return study


def _evaluate(study: Any, evaluator: str, seed: int) -> dict[str, float]:
    """Normalised importances (summing to 1) of one evaluator, axes in decreasing order."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    n = len(study.trials)
    target = None
    if evaluator == FANOVA:
        ev: Any = FanovaImportanceEvaluator(n_trees=defaults.FANOVA_TREES, max_depth=defaults.FANOVA_DEPTH, seed=seed)
        if len(study.directions) == 1:
            target = _signed_target(study, lower_better=False)
    else:  # PED-ANOVA takes the top quantile (at least 5 configurations, as its docs advise) as lower-is-better
        ev = PedAnovaImportanceEvaluator(target_quantile=min(0.5, max(0.1, 5 / n)))
        if len(study.directions) == 1:
            target = _signed_target(study, lower_better=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shares = optuna.importance.get_param_importances(study, evaluator=ev, target=target)
    return {k: float(v) for k, v in shares.items()}


def _signed_target(study: Any, lower_better: bool) -> Any:
    """The objective turned so that lower is better (PED-ANOVA) or kept as it is (fANOVA is sign-free)."""
    from optuna.study import StudyDirection

    flip = lower_better and study.directions[0] == StudyDirection.MAXIMIZE
    return (lambda t: -t.values[0]) if flip else (lambda t: t.values[0])


def _disagree(windows: list[dict[str, float]]) -> bool:
    axes = {k for w in windows for k in w}
    return any(max(w.get(a, 0.0) for w in windows) - min(w.get(a, 0.0) for w in windows)
               > defaults.IMPORTANCE_DISAGREE for a in axes)


# --------------------------------------------------------------------------- showing
def format_importance(imp: Importance, short: dict[str, str] | None = None) -> str:
    """Plain-text tables: one row per axis, a column per objective and evaluator (``short``: axis -> name)."""
    from qlib_ext.tables import text_table

    if not imp.shares:
        return f"importances: not computed ({imp.note or 'no objective with enough finished configurations'})"
    name = (short or {}).get
    cols = [(m, ev) for m in imp.shares for ev in (FANOVA, PED_ANOVA)]
    extra = [("front", PED_ANOVA)] if imp.front else []
    axes = sorted({a for m in imp.shares for ev in imp.shares[m] for a in imp.shares[m][ev]},
                  key=lambda a: -imp.shares[cols[0][0]][FANOVA].get(a, 0.0))
    header = ["axis", *[f"{m} {ev}" for m, ev in cols], *(["Pareto front ped_anova"] if extra else [])]
    lines = [header] + [[name(a, a), *[f"{imp.shares[m][ev].get(a, 0.0):.3f}" for m, ev in cols],
                         *([f"{imp.front.get(a, 0.0):.3f}"] if extra else [])] for a in axes]
    text = [f"hyperparameter importances over {imp.configurations} configurations (fANOVA: share of the "
            f"objective's variance; PED-ANOVA: what it takes to be in the top quantile; each column sums to 1)",
            text_table(lines)]
    if imp.windows and imp.disagree:
        wl = [["window", *[name(a, a) for a in axes]]] + [[str(w), *[f"{s.get(a, 0.0):.3f}" for a in axes]]
                                                          for w, s in sorted(imp.windows.items())]
        text += [f"the walk-forward windows disagree on what drove {imp.objectives[0][0]} (fANOVA per window):",
                 text_table(wl)]
    return "\n".join(text)


def plot_importance(imp: Importance, path: Path, short: dict[str, str] | None = None) -> Path | None:
    """Horizontal bars: each axis's fANOVA and PED-ANOVA share, one panel per objective; None if none."""
    if not imp.shares:
        return None
    from qlib_ext.analysis.plots import pyplot, save_png

    plt = pyplot()

    metrics = list(imp.shares)
    fig, axs = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.5 + 0.45 * _n_axes(imp)), squeeze=False)
    for ax, metric in zip(axs[0], metrics, strict=True):
        fan, ped = imp.shares[metric][FANOVA], imp.shares[metric][PED_ANOVA]
        axes = sorted(fan, key=lambda a: fan[a])
        ys = range(len(axes))
        ax.barh([y + 0.2 for y in ys], [fan[a] for a in axes], height=0.4, label="fANOVA", color="#1f77b4")
        ax.barh([y - 0.2 for y in ys], [ped.get(a, 0.0) for a in axes], height=0.4, label="PED-ANOVA",
                color="#ff7f0e")
        ax.set_yticks(list(ys), [(short or {}).get(a, a) for a in axes], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_title(f"{metric}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"What drove the result ({imp.configurations} configurations)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def _n_axes(imp: Importance) -> int:
    return max((len(ev) for m in imp.shares.values() for ev in m.values()), default=1)


def metrics_of(imp: Importance, short: dict[str, str] | None = None) -> dict[str, float]:
    """The importances as MLflow metrics of the grid run: ``importance.<evaluator>.<objective>.<axis>``."""
    out = {}
    for metric, evs in imp.shares.items():
        for ev, shares in evs.items():
            for axis, share in shares.items():
                out[f"importance.{ev}.{_key(metric)}.{_key((short or {}).get(axis, axis))}"] = share
    return out


def _key(text: str) -> str:
    """A metric-key-safe name (MLflow allows letters, digits, _ - . / and spaces)."""
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in text)
