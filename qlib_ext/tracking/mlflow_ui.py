"""How a grid looks in the MLflow UI: experiment kind, one parent run per grid, short names, the view URL.

MLflow 3.17's UI (``mlflow/server/js``) decides between its GenAI pages and the training-runs table
from the ``workflowType`` query parameter, else the browser's ``localStorage['mlflow.workflowType']``,
else GenAI; the experiment tag ``mlflow.experimentKind`` is read only when a feature flag that
3.17 hard-wires on is off. So the URL qlib-ext prints carries ``workflowType=machine_learning``,
and the tag is set as well (older/newer UIs and MLflow's own "experiment type" selector read it).

The run hierarchy (the runs table nests on ``mlflow.parentRunId`` to any depth):

* one **grid run** per pool (``qlib_ext.kind = grid``, named ``<pool> (grid)``), created at submit,
  holding the workflow YAML, the expanded tasks, the axis names and, once the grid finished,
  the grid's metrics (trials, done, failed, best objective, PBO, DSR of the best), plots and report;
* under it one row per **configuration**: a plain task run; a rolling configuration's
  **config run** (``qlib_ext.kind = config``, created at submit) with its windows' runs under it
  and their mean metrics on it; or a strategy sweep's **training run** with one backtest run per
  strategy point under it (each backtest row is a model x strategy configuration).

Grid axes are params under short unique names (``learning_rate``, ``strategy.topk``,
``handler.start_time``), each axis once; the full dotted paths are the grid run's ``qlib_ext.axes``
tag and its ``axes.md`` artifact. Headline metrics get short names (``ann_ret``, ``IR``, ``max_dd``)
so five columns fit a screen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlib_ext.pool.record import HEADLINE_METRICS, STRATEGY_PREFIX, Metric, SweepPoint, Tag, TaskMeta

logger = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""Experiment tag MLflow's UI and its experiment-type selector read."""

EXPERIMENT_KIND = "custom_model_development"
"""The value MLflow calls "Machine learning" (training runs, not GenAI traces)."""

WORKFLOW_TYPE = "machine_learning"
"""``workflowType`` query parameter that opens MLflow 3.17's training-runs view."""

NOTE_TAG = "mlflow.note.content"
"""MLflow's run description (markdown), shown on the run page."""

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
"""Experiment tag prefix of a saved runs-table view, opened by ``?viewStateShareKey=<key>``."""

AXES_TAG = Tag.AXES
"""Grid-run tag: JSON ``{short param name: full dotted path}`` of the grid's axes."""

ROW_TAG = Tag.ROW
"""What a run is in the grid's tables: ``grid``, ``config`` (one configuration: the ranked view's rows),
``window`` (a rolling window of a config run) or ``model`` (a sweep's training run)."""

ROW_CONFIG = "config"
"""``qlib_ext.row`` of a configuration's run."""

RANKED = "ranked"
"""The view with one row per configuration, best objective first."""

GRID = "grid"
"""The view with the grid as one expandable row."""

KIND_GRID = "grid"
"""``qlib_ext.kind`` of a grid's parent run."""

KIND_CONFIG = "config"
"""``qlib_ext.kind`` of a rolling configuration's run (parent of its windows)."""

HEADLINE = HEADLINE_METRICS
"""Short metric name -> Qlib's PortAnaRecord name; logged again under the short name."""

COLUMNS = (Metric.IC, Metric.ICIR, "ann_ret", "IR", "max_dd")
"""Headline metric columns of the saved runs-table view, after the objective."""

_DROP = {"task", "kwargs", "port_analysis_config", "config", "dataset", "model"}
_CONTEXT = ("strategy", "handler", "backtest", "segments", "exchange_kwargs", "executor")

_grid_cache: dict[tuple[str, str], GridRuns] = {}


@dataclass
class GridRuns:
    """The MLflow runs that hold a grid together: its parent run and its rolling configurations' runs."""

    grid_run_id: str
    experiment_id: str
    config_runs: dict[str, str] = field(default_factory=dict)  # config_id -> run id
    axes: dict[str, str] = field(default_factory=dict)  # short name -> full dotted path


def short_names(paths: list[str] | set[str]) -> dict[str, str]:
    """A short unique param name per dotted path: the last meaningful part, prefixed by its context
    (``strategy.``, ``handler.``, ``backtest.``), more parts where two would clash. Run names label their
    coordinates differently (:func:`qlib_ext.workflow.expand._labels`, fixed: they are hashed)."""
    keep = {p: [s for s in p.split(".") if s not in _DROP] or p.split(".") for p in paths}
    depth = dict.fromkeys(paths, 1)
    for _ in range(8):
        names = {p: _name(keep[p], depth[p]) for p in paths}
        clashes = {n for n in names.values() if list(names.values()).count(n) > 1}
        if not clashes:
            return names
        for p, n in names.items():
            if n in clashes:
                depth[p] += 1
    return {p: p for p in paths}


def _name(parts: list[str], depth: int) -> str:
    context = next((s for s in parts[:-1] if s in _CONTEXT), None)
    tail = parts[-depth:]
    if context and context not in tail:
        tail = [context, *tail]
    return ".".join(tail)


def grid_axes(tasks: list[dict]) -> dict[str, str]:
    """Short name -> full path of every axis the tasks vary (coordinates and strategy keys)."""
    paths: set[str] = set()
    for t in tasks:
        meta = TaskMeta.of(t)
        paths.update(meta.coords)
        paths.update(STRATEGY_PREFIX + k for k in meta.strategy)
        for point in meta.sweep or []:
            paths.update(STRATEGY_PREFIX + k for k in SweepPoint.from_dict(point).strategy)
    return {short: full for full, short in sorted(short_names(paths).items())}


def run_params(task: dict, axes: dict[str, str] | None = None) -> dict[str, Any]:
    """A task run's params: each grid axis once under its short name, model, window."""
    meta = TaskMeta.of(task)
    values = dict(meta.coords)
    values.update({STRATEGY_PREFIX + k: v for k, v in meta.strategy.items()})
    by_path = {full: short for short, full in (axes or {}).items()}
    missing = [p for p in values if p not in by_path]
    if missing:  # a path the grid run does not know (e.g. a search proposal): a name that does not clash
        extra = short_names(set(missing) | set(by_path))
        by_path.update({p: extra[p] for p in missing})
    params: dict[str, Any] = {by_path[p]: v for p, v in values.items()}
    model_class = meta.model_class or (task.get("model") or {}).get("class")
    params["model"] = meta.model or model_class
    if model_class:
        params["model.class"] = model_class
    window = meta.window or {}
    for seg in ("train", "valid", "test"):
        if seg in window:
            params[f"window.{seg}_start"], params[f"window.{seg}_end"] = window[seg]
    if "index" in window:
        params["window.index"] = window["index"]
    return params


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The headline metrics under their short names (only those the run logged)."""
    return {short: metrics[full] for short, full in HEADLINE.items() if full in metrics}


def run_note(task: dict, task_id: str = "") -> str:
    """A markdown description of what a task run is (``mlflow.note.content``)."""
    meta = TaskMeta.of(task)
    lines = []
    if meta.is_backtest:
        lines.append(f"**Backtest** of training run `{meta.parent_run_id or ''}`'s predictions.")
    else:
        model = (task.get("model") or {}).get("class", meta.model or "model")
        handler = (((task.get("dataset") or {}).get("kwargs") or {}).get("handler") or {})
        hname = handler.get("class", "") if isinstance(handler, dict) else str(handler)
        lines.append(f"**{meta.model or model}** ({model}) on {hname or 'its dataset'}.")
    axes = run_params(task)
    shown = {k: v for k, v in axes.items() if not k.startswith(("model", "window."))}
    if shown:
        lines.append("Grid point: " + ", ".join(f"`{k}={v}`" for k, v in shown.items()) + ".")
    window = meta.window or {}
    if "test" in window:
        lines.append(f"Rolling window {window.get('index')}: test {window['test'][0]} .. {window['test'][1]}.")
    if meta.sweep:
        lines.append(f"Trains once; {len(meta.sweep)} strategy backtests run as child runs.")
    lines.append(f"Task `{task_id}` of pool `{meta.pool or ''}` (config `{meta.config_id or ''}`).")
    return "\n\n".join(lines)


def _client(mlflow_uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=mlflow_uri)


def _find(client: Any, experiment_id: str, pool: str, kind: str) -> list[Any]:
    flt = f"tags.`{Tag.POOL}` = '{pool}' and tags.`{Tag.KIND}` = '{kind}'"
    return list(client.search_runs([experiment_id], filter_string=flt, max_results=5000))


def ensure_grid_runs(mlflow_uri: str, experiment: str, pool: str, tasks: list[dict],
                     workflow: str | Path | None = None, objective: str = Metric.IC) -> GridRuns:
    """Create (or find, on a resubmit) the grid's parent run and its rolling configurations' runs;
    tag the experiment for the training-runs view and save the grid's runs-table view.

    Args:
        mlflow_uri: tracking URI (the experiment must exist: ``ensure_experiment``).
        experiment: experiment name.
        pool: pool name (one grid run per pool).
        tasks: the expanded task dicts.
        workflow: the YAML, logged as an artifact of the grid run.
        objective: metric the saved view sorts by.
    """
    client = _client(mlflow_uri)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    axes = grid_axes(tasks)
    found = _find(client, exp_id, pool, KIND_GRID)
    if found:
        grid_id = found[0].info.run_id
    else:
        grid_id = client.create_run(exp_id, run_name=f"{pool} (grid)", tags={
            Tag.POOL: pool, Tag.KIND: KIND_GRID, ROW_TAG: GRID}).info.run_id
    client.set_tag(grid_id, AXES_TAG, json.dumps(axes)[:5000])
    client.set_tag(grid_id, NOTE_TAG, _grid_note(pool, tasks, axes, workflow))
    _log_grid_artifacts(client, grid_id, tasks, axes, workflow)
    runs = GridRuns(grid_id, exp_id, _ensure_config_runs(client, exp_id, pool, grid_id, tasks, axes), axes)
    save_view(client, exp_id, pool, objective, axes)
    return runs


def _grid_note(pool: str, tasks: list[dict], axes: dict[str, str], workflow: str | Path | None) -> str:
    lines = [f"**Grid `{pool}`**: {len(tasks)} tasks" + (f" from `{workflow}`" if workflow else "") + "."]
    if axes:
        lines.append("Axes: " + ", ".join(f"`{s}` = `{f}`" for s, f in axes.items()) + ".")
    lines.append("Expand this row for one run per configuration; `report.html` is the grid's report.")
    return "\n\n".join(lines)


def _log_grid_artifacts(client: Any, run_id: str, tasks: list[dict], axes: dict[str, str],
                        workflow: str | Path | None) -> None:
    table = ["| param | full path |", "|---|---|", *(f"| `{s}` | `{f}` |" for s, f in axes.items())]
    with tempfile.TemporaryDirectory(prefix="qlib-ext-grid-") as tmp:
        (Path(tmp) / "axes.md").write_text("\n".join(table) + "\n")
        (Path(tmp) / "tasks.json").write_text(json.dumps(tasks, indent=1, default=str))
        if workflow and Path(workflow).is_file():
            (Path(tmp) / "workflow.yaml").write_text(Path(workflow).read_text())
        client.log_artifacts(run_id, tmp)


def _ensure_config_runs(client: Any, exp_id: str, pool: str, grid_id: str, tasks: list[dict],
                        axes: dict[str, str]) -> dict[str, str]:
    """One run per configuration that has rolling windows (its windows nest under it)."""
    rolling: dict[str, dict] = {}
    for t in tasks:
        meta = TaskMeta.of(t)
        if meta.window and meta.config_id:
            rolling.setdefault(meta.config_id, t)
    if not rolling:
        return {}
    have = {r.data.tags.get(Tag.CONFIG_ID): r.info.run_id for r in _find(client, exp_id, pool, KIND_CONFIG)}
    for config_id, task in rolling.items():
        if config_id in have:
            continue
        name = str(TaskMeta.of(task).run_name or config_id).rsplit(" w", 1)[0]
        params = {k: v for k, v in run_params(task, axes).items() if not k.startswith("window.")}
        run = client.create_run(exp_id, run_name=name, tags={
            Tag.POOL: pool, Tag.KIND: KIND_CONFIG, Tag.CONFIG_ID: config_id, Tag.MLFLOW_PARENT: grid_id,
            ROW_TAG: ROW_CONFIG,
            NOTE_TAG: f"Rolling configuration `{config_id}` of grid `{pool}`: its windows are the child runs; "
                      f"the metrics here are their means (set when the grid finishes)."})
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        have[config_id] = run.info.run_id
    return {c: have[c] for c in rolling}


def grid_runs(client: Any, experiment_id: str, pool: str) -> GridRuns | None:
    """The grid's runs as recorded in MLflow (cached per process), or None before a submit made them."""
    key = (experiment_id, pool)
    if key not in _grid_cache:
        found = _find(client, experiment_id, pool, KIND_GRID)
        if not found:
            return None
        configs = {r.data.tags.get(Tag.CONFIG_ID): r.info.run_id
                   for r in _find(client, experiment_id, pool, KIND_CONFIG)}
        axes = json.loads(found[0].data.tags.get(AXES_TAG) or "{}")
        _grid_cache[key] = GridRuns(found[0].info.run_id, experiment_id, configs, axes)
    return _grid_cache[key]


def run_decoration(client: Any, experiment_id: str, task: dict, task_id: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Tags (parent run, note) and params (short axis names) of a task's run.

    A backtest keeps its training run as parent; a rolling window nests under its config run; every
    other task run under the grid run. Never raises: a grid submitted before this existed has none.
    """
    meta = TaskMeta.of(task)
    row = "window" if meta.window else "model" if meta.sweep else ROW_CONFIG
    tags = {NOTE_TAG: run_note(task, task_id), ROW_TAG: row}
    try:
        runs = grid_runs(client, experiment_id, str(meta.pool or ""))
    except Exception as e:  # noqa: BLE001 - the run still gets logged, only not nested
        logger.warning("mlflow ui: no grid run for pool %s (%s)", meta.pool, e)
        runs = None
    if runs is not None and not meta.is_backtest:
        parent = runs.config_runs.get(meta.config_id or "") if meta.window else None
        tags[Tag.MLFLOW_PARENT] = parent or runs.grid_run_id
    return tags, run_params(task, runs.axes if runs else None)


# --------------------------------------------------------------------------- the saved view and its URL
def view_key(pool: str, objective: str, view: str = RANKED) -> str:
    """Key of one of the grid's saved runs-table views (stable per pool, objective and view)."""
    return hashlib.sha1(f"qlib-ext:{pool}:{objective}:{view}".encode()).hexdigest()[:16]


def metric_column(objective: str) -> str:
    """The short headline name of a metric where it has one (``ann_ret``), else the metric itself."""
    return next((s for s, f in HEADLINE.items() if f == objective), objective)


def view_state(pool: str, objective: str, axes: dict[str, str], view: str = RANKED) -> dict:
    """Runs-table state with the headline metrics and the axes as columns.

    ``ranked``: one row per configuration of the pool (tag ``qlib_ext.row = config``), best objective
    first. ``grid``: the grid's runs nested under its parent run, newest first — MLflow 3.17 nests
    children only when the table is sorted by start time (or neither sorted nor filtered).
    """
    column = metric_column(objective)
    metrics = [column, *[m for m in COLUMNS if m != column]]
    # five metrics and the axes fit 1440 px (the run name names the model; MLflow sorts params by name)
    selected = [f"metrics.`{m}`" for m in metrics] + [f"params.`{a}`" for a in axes]
    if view == RANKED:
        flt, order = f"tags.`{Tag.POOL}` = '{pool}' and tags.`{ROW_TAG}` = '{ROW_CONFIG}'", f"metrics.`{column}`"
    else:
        flt, order = f"tags.`{Tag.POOL}` = '{pool}'", "attributes.start_time"
    return {
        "searchFilter": flt,
        "orderByKey": order, "orderByAsc": False,
        "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": selected, "columnOrder": [], "columnWidths": {},
        "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
        "groupBy": None, "groupsExpanded": {}, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
    }


def save_view(client: Any, experiment_id: str, pool: str, objective: str, axes: dict[str, str]) -> None:
    """Store the grid's two views (ranked, grid) as experiment tags."""
    for view in (RANKED, GRID):
        state = json.dumps(view_state(pool, objective, axes, view))
        client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + view_key(pool, objective, view), state)


def runs_url(base: str, experiment_id: str, pool: str, objective: str, view: str = RANKED) -> str:
    """URL of the experiment's training-runs table in one of the grid's views (see :func:`view_state`)."""
    query = urllib.parse.urlencode({"workflowType": WORKFLOW_TYPE,
                                    "viewStateShareKey": view_key(pool, objective, view)})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def ui_command(mlflow_uri: str, port: int = 5000) -> str:
    """A command that starts the MLflow UI on these runs, working as pasted (no venv activation needed)."""
    import shlex
    import sys

    if mlflow_uri.startswith("http"):
        return f"open {mlflow_uri} in a browser"
    return (f"{shlex.quote(sys.executable)} -m mlflow ui --backend-store-uri {shlex.quote(mlflow_uri)} "
            f"--host 127.0.0.1 --port {port}")


def ui_base(mlflow_uri: str, port: int = 5000) -> str:
    """Where the UI answers: the tracking server itself, or ``mlflow ui`` on localhost."""
    return mlflow_uri.rstrip("/") if mlflow_uri.startswith("http") else f"http://127.0.0.1:{port}"


def log_headline_metrics(client: Any, run_id: str, metrics: dict[str, float]) -> None:
    """Log the headline metrics of a task's run again under their short names, before its result is committed.

    Never raises (logs a WARNING): the short names only help the UI, the result is complete without them.
    """
    try:
        short = headline_metrics(metrics)
        if short:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in short.items()])
    except Exception as e:  # noqa: BLE001 - short names are cosmetic; the full names are logged
        logger.warning("mlflow ui: no short metric names on run %s: %s", run_id, e)
