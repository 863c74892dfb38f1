"""Plots as PNG files: per run (returns, IC, turnover) and per grid (heatmap, top-N, windows, stages, PBO,
a search's history).

matplotlib, not plotly: MLflow's artifact viewer previews PNGs inline (an HTML plot would need its
own JavaScript, which MLflow sandboxes), the HTML report embeds the same PNGs as data URIs and
stays one self-contained file that opens offline, and a notebook shows the figures unchanged.
Everything here draws with the Agg backend (no display) and is cheap: a run's figure of 250 days
takes ~0.5 s of CPU on a loaded 2-core machine, 1.15 s while its daily IC was drawn as one bar per day
(measured; matplotlib's first import aside).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DPI = 90
"""Resolution of every PNG, dots per inch (an 8-inch-wide figure is 720 px)."""

TOP_N = 5
"""Configurations drawn in the top-N cumulative return plot."""

HEATMAP_MAX_CELLS = 12
"""Most values of a heatmap axis; past it (a search's continuous axes) :func:`param_slices` draws instead."""

HEATMAP_MAX_FACETS = 6
"""Most panels (values of the third axis) in one heatmap."""


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display): every figure of qlib-ext is drawn with it."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return path


# --------------------------------------------------------------------------- one run
def run_figure(report: Any, ic: Any, out: Path, title: str = "") -> Path:
    """Cumulative excess return with/without cost and the benchmark, daily IC, turnover: one PNG.

    Args:
        report: PortAnaRecord's daily report (columns ``return``, ``bench``, ``cost``, ``turnover``)
            or None.
        ic: SigAnaRecord's daily IC series, or None.
        out: PNG path.
        title: figure title (the run name).
    """
    plt = pyplot()
    panels = (report is not None) * 2 + (ic is not None)
    fig, axes = plt.subplots(max(panels, 1), 1, figsize=(8, 2.3 * max(panels, 1)), sharex=True, squeeze=False)
    axes = list(axes[:, 0])
    if report is not None:
        ax = axes.pop(0)
        ax.plot((report["return"] - report["bench"] - report["cost"]).cumsum(), label="excess, with cost")
        ax.plot((report["return"] - report["bench"]).cumsum(), label="excess, without cost")
        ax.plot(report["bench"].cumsum(), label="benchmark", color="grey", alpha=0.7)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("cumulative return")
        ax.legend(loc="upper left", fontsize=8)
    if ic is not None:
        ax = axes.pop(0)
        # one filled step polygon, not one bar patch per day (a year of bars took most of the figure's time)
        ax.fill_between(ic.index, ic.values, step="mid", color="tab:blue", alpha=0.5, lw=0, label="daily IC")
        ax.plot(ic.rolling(20, min_periods=1).mean(), color="tab:red", label="20-day mean")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("IC")
        ax.legend(loc="upper left", fontsize=8)
    if report is not None:
        ax = axes.pop(0)
        ax.plot(report["turnover"], color="tab:green")
        ax.set_ylabel("turnover")
    fig.suptitle(title, fontsize=10)
    fig.autofmt_xdate()
    return save_png(fig, out)


RUN_FIGURE = "plots/run.png"
"""A task run's figure, as an MLflow artifact."""


def log_run_figure(client: Any, run_id: str, digests: dict | None, title: str = "") -> str | None:
    """Draw a finished task run's figure from its Qlib artifacts and log it as ``plots/run.png``; None when the
    run has one already or has neither a backtest report nor a daily IC.

    Drawn after the run, not by its worker (issue 24: ~0.5 s a task, most of a small task's time outside its
    stages): by the background process that draws the grid plots, and by ``qlib-ext report``. The artifacts
    are checked against the pool's ``digests`` and read as data. Never raises (a plot must not fail anything):
    logs a WARNING and returns None instead.
    """
    import tempfile

    try:
        if any(a.path == RUN_FIGURE for a in client.list_artifacts(run_id, "plots")):
            return None
        with tempfile.TemporaryDirectory(prefix="qlib-ext-plot-") as tmp:
            report = _load(client, run_id, "portfolio_analysis/report_normal_1day.pkl", tmp, digests)
            ic = _load(client, run_id, "sig_analysis/ic.pkl", tmp, digests)
            if report is None and ic is None:
                return None
            path = run_figure(report, ic, Path(tmp) / "run.png", title)
            client.log_artifact(run_id, str(path), "plots")
        return RUN_FIGURE
    except Exception as e:  # noqa: BLE001 - a run without its figure is still a result
        logger.warning("plots: no run figure for run %s: %s", run_id, e)
        return None


def _load(client: Any, run_id: str, name: str, tmp: str, digests: dict | None) -> Any:
    from qlib_ext.errors import ArtifactTampered
    from qlib_ext.tracking.artifacts import download_checked, read_frame

    try:
        return read_frame(download_checked(client, run_id, name, tmp, digests))
    except ArtifactTampered:
        raise
    except Exception:  # noqa: BLE001 - the record was not part of this task
        return None


# --------------------------------------------------------------------------- one grid
def heatmap(rows: list[dict], axes: Sequence[str], metric: str, out: Path) -> Path | None:
    """The objective over two axes (rows x columns), one panel per value of a third; more axes: the best.

    Args:
        rows: leaderboard rows (``params``, ``metrics``).
        axes: axis param names, in grid order; only those with two or more values are drawn.
        metric: the objective.
        out: PNG path.
    """
    import numpy as np

    varied = [a for a in axes if len({str(r["params"].get(a)) for r in rows}) > 1]
    if not varied:
        return None
    x, y = varied[0], (varied[1] if len(varied) > 1 else None)
    facet = varied[2] if len(varied) > 2 else None
    facets = _values(rows, facet) if facet else [None]
    xs, ys = _values(rows, x), (_values(rows, y) if y else [""])
    if max(len(xs), len(ys)) > HEATMAP_MAX_CELLS or len(facets) > HEATMAP_MAX_FACETS:
        return None  # not a grid a person can read cell by cell: param_slices draws it
    plt = pyplot()
    fig, axs = plt.subplots(1, len(facets), figsize=(min(4 * len(facets), 16), 3.2), squeeze=False)
    for ax, fv in zip(axs[0], facets, strict=True):
        grid = np.full((len(ys), len(xs)), np.nan)
        for r in rows:
            if facet and str(r["params"].get(facet)) != fv:
                continue
            v = r["metrics"].get(metric)
            if not _finite(v):
                continue
            i = ys.index(str(r["params"].get(y))) if y else 0
            j = xs.index(str(r["params"].get(x)))
            grid[i, j] = v if math.isnan(grid[i, j]) else max(grid[i, j], v)
        im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        for (i, j), v in np.ndenumerate(grid):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(xs)), xs, fontsize=8)
        ax.set_yticks(range(len(ys)), ys, fontsize=8)
        ax.set_xlabel(x)
        ax.set_ylabel(y or "")
        if facet:
            ax.set_title(f"{facet} = {fv}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    more = f" (best over {', '.join(varied[3:])})" if len(varied) > 3 else ""
    fig.suptitle(f"{metric} by {', '.join(varied[:3])}{more}", fontsize=10)
    return save_png(fig, out)


def param_slices(rows: list[dict], axes: Sequence[str], metric: str, out: Path, limit: int = 4) -> Path | None:
    """The objective against each varied axis, one dot per configuration (coloured by trial number in a
    search): for axes too fine for a heatmap, such as a search's continuous ranges.

    A numeric axis spanning a factor of 10 or more is drawn on a log scale; a non-numeric one by category.
    """
    varied = [a for a in axes if len({str(r["params"].get(a)) for r in rows}) > 1][:limit]
    rows = [r for r in rows if _finite(r["metrics"].get(metric))]
    if not varied or len(rows) < 2:
        return None
    trials = [r.get("trial") for r in rows]
    colour = trials if all(t is not None for t in trials) else None
    plt = pyplot()
    fig, axs = plt.subplots(1, len(varied), figsize=(min(4 * len(varied), 16), 3.2), squeeze=False, sharey=True)
    for ax, axis in zip(axs[0], varied, strict=True):
        xs, labels = _positions([r["params"].get(axis) for r in rows])
        dots = ax.scatter(xs, [r["metrics"][metric] for r in rows], c=colour, cmap="viridis", s=18)
        if labels:
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
        elif min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(axis)
    axs[0][0].set_ylabel(metric)
    if colour is not None:
        from matplotlib.ticker import MaxNLocator

        fig.colorbar(dots, ax=list(axs[0]), shrink=0.8, label="trial", ticks=MaxNLocator(integer=True))
    fig.suptitle(f"{metric} against each axis, one dot per configuration", fontsize=10)
    return save_png(fig, out)


def _positions(values: list) -> tuple[list[float], list[str] | None]:
    """Numeric x positions of ``values``, or category indices and their labels when one is not a number."""
    try:
        return [float(v) for v in values], None
    except (TypeError, ValueError):
        labels = sorted({str(v) for v in values})
        return [float(labels.index(str(v))) for v in values], labels


def _values(rows: list[dict], axis: str) -> list[str]:
    raw = list(dict.fromkeys(r["params"].get(axis) for r in rows))
    try:
        raw.sort(key=lambda v: float(v))
    except (TypeError, ValueError):
        raw.sort(key=str)
    return [str(v) for v in raw]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def top_returns(series: dict[str, Any], out: Path, title: str = "") -> Path | None:
    """Cumulative daily excess return (with cost) of the top configurations, one line each."""
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for name, s in series.items():
        ax.plot(s.cumsum(), label=name)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("cumulative excess return")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title or f"top {len(series)} configurations", fontsize=10)
    fig.autofmt_xdate()
    return save_png(fig, out)


def window_metrics(per_config: dict[str, list[tuple[int, float]]], metric: str, out: Path) -> Path | None:
    """The metric per rolling window, one line per configuration."""
    if not per_config:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for name, points in per_config.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("window")
    ax.set_ylabel(metric)
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title(f"{metric} per rolling window", fontsize=10)
    return save_png(fig, out)


def stage_times(runs: dict[str, dict[str, float]], out: Path, limit: int = 40) -> Path | None:
    """Seconds per stage (``time.<stage>_s`` metrics) of each run, as stacked horizontal bars."""
    runs = {k: {m[5:-2]: v for m, v in ms.items() if m.startswith("time.") and m.endswith("_s")}
            for k, ms in list(runs.items())[:limit]}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return None
    stages = list(dict.fromkeys(s for v in runs.values() for s in v))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.28 * len(runs)))
    left = [0.0] * len(runs)
    names = list(runs)
    for stage in stages:
        widths = [runs[n].get(stage, 0.0) for n in names]
        ax.barh(names, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7, ncols=len(stages), loc="lower right")
    ax.set_title("time per stage", fontsize=10)
    return save_png(fig, out)


def search_history(rows: list[dict], metric: str, direction: str, out: Path) -> Path | None:
    """A search's objective by trial number, with the best so far as a step line (Optuna's optimization
    history): whether the sampler is still finding better points or has settled.

    Args:
        rows: leaderboard rows; those with a ``trial`` number and a finite ``metric`` are drawn.
        metric: the objective.
        direction: ``max``/``maximize`` or ``min``/``minimize``.
        out: PNG path.

    Returns:
        ``out``, or None when fewer than two trials have a value (nothing to compare).
    """
    points = sorted((r["trial"], r["metrics"][metric]) for r in rows
                    if r.get("trial") is not None and _finite(r["metrics"].get(metric)))
    if len(points) < 2:
        return None
    from itertools import accumulate

    from matplotlib.ticker import MaxNLocator

    better = max if direction.startswith("max") else min
    trials = [p[0] for p in points]
    best_so_far = list(accumulate((p[1] for p in points), better))
    improved = [(t, b) for i, (t, b) in enumerate(zip(trials, best_so_far, strict=True))
                if i == 0 or b != best_so_far[i - 1]]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.scatter(trials, [p[1] for p in points], s=18, color="#4c72b0", label=f"{metric} of the trial", zorder=3)
    ax.step([*trials, trials[-1] + 0.5], [*best_so_far, best_so_far[-1]], where="post", color="#dd8452", lw=2,
            label="best so far")
    ax.scatter([t for t, _ in improved], [b for _, b in improved], s=60, facecolors="none", edgecolors="#dd8452",
               lw=1.5, zorder=4, label="a new best")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (in the order proposed)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, loc="lower right" if better is max else "upper right")
    ax.set_title(f"search: {metric} per trial ({'higher' if better is max else 'lower'} is better)", fontsize=10)
    return save_png(fig, out)


def pbo_figure(logits: Any, is_sharpe: Any, oos_sharpe: Any, pbo: float, out: Path) -> Path | None:
    """PBO's logit histogram and the in- vs out-of-sample Sharpe of each split's in-sample best."""
    import numpy as np

    if logits is None or not len(logits):
        return None
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.hist(np.clip(logits, -10, 10), bins=20, color="tab:purple")
    a.axvline(0, color="black", lw=0.8)
    a.set_title(f"logits (PBO = {pbo:.2f}: share <= 0)", fontsize=9)
    b.scatter(is_sharpe, oos_sharpe, s=8, alpha=0.6)
    b.axhline(0, color="black", lw=0.5)
    b.set_xlabel("in-sample Sharpe (best)")
    b.set_ylabel("out-of-sample Sharpe")
    b.set_title("IS vs OOS of the IS-best", fontsize=9)
    return save_png(fig, out)
