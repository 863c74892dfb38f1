"""Expand a workflow's grid into plain Qlib task dicts through Qlib's ``task_generator``.

The axis generators (``ModelGen``, ``ParamGen``, ``StrategyGen``, ``RandomGen``) are ``TaskGen``
subclasses that work on the *whole* qrun config, not on ``config['task']``: a YAML alias such as
``*data_handler_config`` is one Python object shared by the root and the task, ``copy.deepcopy``
keeps that sharing inside each copy, so setting ``data_handler_config.start_time`` on a copy of the
root changes the handler inside that copy's task. After the axes, each root becomes its ``task``,
and ``WindowGen`` (a subclass of Qlib's ``RollingGen``) turns each task into walk-forward windows.

Every task carries its coordinates under ``task["qlib_ext"]`` (see ``expand``).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from qlib.workflow.task.gen import RollingGen, TaskGen, task_generator, trunc_segments
from qlib.workflow.task.utils import TimeAdjuster

from qlib_ext.data.qlib_format import calendar_path
from qlib_ext.data.qlib_format import read_calendar as qlib_calendar
from qlib_ext.errors import ConfigError
from qlib_ext.identity import canonical_json, digest
from qlib_ext.pool.record import META, STRATEGY_PREFIX, TaskMeta, edit_meta
from qlib_ext.workflow.limits import check_grid_size
from qlib_ext.workflow.load import Workflow, date_str, normalise_dates
from qlib_ext.workflow.paths import set_path
from qlib_ext.workflow.spec import Dist, GridSpec, ModelSpec, RollingSpec, Values, portana_configs

logger = logging.getLogger(__name__)

ABBREVIATIONS = {
    "learning_rate": "lr", "num_leaves": "leaves", "max_depth": "depth", "num_boost_round": "rounds",
    "colsample_bytree": "colsample", "lambda_l1": "l1", "lambda_l2": "l2", "min_data_in_leaf": "min_leaf",
    "early_stopping_rounds": "es", "estimator": "est",
}
"""Short labels of common parameter names in run names; others use the last path part."""

_BSON_SCALARS = (str, int, float, bool, type(None))


def expand(wf: Workflow, provider_uri: str | None = None) -> list[dict]:
    """Expand ``wf`` into Qlib task dicts, one per grid point (and rolling window).

    Args:
        wf: a loaded workflow.
        provider_uri: Qlib data directory whose calendar (``calendars/day.txt``) cuts rolling
            windows and checks backtest ends; default ``qlib_init.provider_uri`` of the YAML.
            Required only with ``grid.rolling``; without it a missing calendar skips the check.

    Returns:
        Plain task dicts (``model``, ``dataset``, ``record``, ...) each with a ``qlib_ext`` block:
        ``pool``, ``experiment``, ``grid_hash``, ``config_id``, ``coords``, ``model``, ``strategy``,
        ``window``, ``run_name``. Every value is BSON-encodable. With ``grid.train_once`` (the
        default), points that differ only in their ``PortAnaRecord`` configs are one training task
        whose ``qlib_ext.workflow.sweep`` lists them (see :mod:`qlib_ext.workflow.sweep`).

    Raises:
        ConfigError: the calendar is missing (rolling) or too short, a backtest ends on the
            calendar's last day or later, or a value cannot be stored in MongoDB.
    """
    if wf.grid.search not in ("grid", "random"):
        raise ConfigError(f"search: {wf.grid.search} in grid.search of {wf.path} proposes its points while it runs "
                          "(qlib_ext.search), so there is no list of tasks to expand; expected `qlib-ext run`, or "
                          "`qlib-ext submit` then `qlib-ext search POOL`")
    root = copy.deepcopy(wf.config)
    root[META] = draft_meta()
    tasks = [_to_task(r) for r in task_generator(root, axis_generators(wf.grid))]
    calendar = read_calendar(wf, provider_uri, required=wf.grid.rolling is not None)
    if wf.grid.rolling is not None:
        windows = WindowGen(wf.grid.rolling, calendar, wf.path)
        if tasks:  # the windows of one point, counted before every point's are built
            check_grid_size(wf.grid, wf.path, windows=len(windows.generate(copy.deepcopy(tasks[0]))))
        tasks = task_generator(tasks, windows)
    grid_hash = workflow_hash(wf)
    labels = _labels({path for t in tasks for path in TaskMeta.of(t).coords})
    for task in tasks:
        _finish(task, wf, grid_hash, labels)
    for task in tasks:
        check_bson(task, wf.path, TaskMeta.of(task).run_name or "")
        if calendar:
            check_backtest_end(task, calendar, wf.path)
    if wf.grid.train_once:
        from qlib_ext.workflow.sweep import train_once  # sweep builds on this module; a top import would be circular

        tasks = train_once(tasks, lambda t: _finish(t, wf, grid_hash, labels), wf.path)
    return tasks


def draft_meta() -> dict:
    """The ``qlib_ext`` block of a root config before the axes fill it (coordinates, model, strategy, window)."""
    return TaskMeta(coords={}, strategy={}).to_dict()


def workflow_hash(wf: Workflow) -> str:
    """The grid hash of ``wf`` (``qlib_ext.grid_hash``): identity of its qrun config and ``grid:`` section."""
    grid = {k: v for k, v in asdict(wf.grid).items() if k != "max_points"}  # a cap, not what is computed
    return digest({"config": wf.config, "grid": grid}, length=12)


def axis_generators(grid: GridSpec) -> list[TaskGen]:
    """The ``TaskGen`` chain for ``grid`` (its product is the grid; random search is one generator)."""
    if grid.search == "random":
        return [RandomGen(grid)]
    gens: list[TaskGen] = [ModelGen(grid.models)] if grid.models else []
    return [*gens, ParamGen(grid.params), StrategyGen(grid.strategies)]


class ParamGen(TaskGen):
    """Cartesian product of dotted-path axes, each path set from the root of the qrun config."""

    def __init__(self, axes: dict[str, Values]):
        self.axes = axes  # lists: a Dist axis is random search's (RandomGen), refused for a grid by the spec

    def generate(self, task: dict) -> list[dict]:
        """Return one deep copy of ``task`` (a root config) per combination of axis values."""
        out = []
        for combo in itertools.product(*self.axes.values()):  # type: ignore[arg-type]
            root = copy.deepcopy(task)
            for key, value in zip(self.axes, combo, strict=True):
                self.apply(root, key, value)
            out.append(root)
        return out

    @staticmethod
    def apply(root: dict, key: str, value: Any) -> None:
        apply_param(root, key, value)


class ModelGen(TaskGen):
    """The ``grid.models`` axis: each alternative ``task.model`` block times its own axes."""

    def __init__(self, models: dict[str, ModelSpec]):
        self.models = models

    def generate(self, task: dict) -> list[dict]:
        """Return, per model, the product of that model's ``params`` over a copy with its block."""
        out = []
        for spec in self.models.values():
            root = copy.deepcopy(task)
            apply_model(root, spec)
            out.extend(ParamGen(spec.params).generate(root))
        return out


class StrategyGen(ParamGen):
    """The ``grid.strategies`` axis: keys set in every ``PortAnaRecord``'s strategy kwargs."""

    @staticmethod
    def apply(root: dict, key: str, value: Any) -> None:
        apply_strategy(root, key, value)


class RandomGen(TaskGen):
    """Random search: ``n_trials`` distinct points drawn with ``random.Random(seed)``.

    Each trial draws a model (uniformly, when there is a models axis), then every global axis,
    that model's axes and every strategy axis, in YAML order; so the same YAML and seed give the
    same tasks. Lists are a uniform choice; ``int`` bounds are inclusive; floats keep 6 digits.
    """

    def __init__(self, grid: GridSpec):
        self.grid = grid

    def generate(self, task: dict) -> list[dict]:
        """Return up to ``n_trials`` copies of ``task``, one per distinct draw."""
        rng, out, seen, n_trials = random.Random(self.grid.seed), [], set(), int(self.grid.n_trials or 0)
        for _ in range(n_trials * 1000):
            draw = self._draw(rng)
            key = canonical_json(draw)
            if key not in seen:
                seen.add(key)
                out.append(self._build(task, *draw))
            if len(out) == n_trials:
                break
        if len(out) < n_trials:
            logger.warning("gen: random search found only %d distinct points of %d", len(out), n_trials)
        return out

    def _draw(self, rng: random.Random) -> tuple[str | None, dict, dict]:
        name = rng.choice(list(self.grid.models)) if self.grid.models else None
        axes = dict(self.grid.params, **(self.grid.models[name].params if name else {}))
        params = {path: sample(rng, values) for path, values in axes.items()}
        return name, params, {key: sample(rng, values) for key, values in self.grid.strategies.items()}

    def _build(self, task: dict, name: str | None, params: dict, strategies: dict) -> dict:
        root = copy.deepcopy(task)
        if name is not None:
            apply_model(root, self.grid.models[name])
        for path, value in params.items():
            apply_param(root, path, value)
        for key, value in strategies.items():
            apply_strategy(root, key, value)
        return root


def sample(rng: random.Random, values: Values) -> Any:
    """Draw one value of an axis: a list element, or from an int/uniform/loguniform ``Dist``."""
    if isinstance(values, list):
        return values[rng.randrange(len(values))]
    if values.dist == "int":
        return rng.randint(int(values.low), int(values.high))
    if values.dist == "uniform":
        return float(f"{rng.uniform(values.low, values.high):.6g}")
    return float(f"{math.exp(rng.uniform(math.log(values.low), math.log(values.high))):.6g}")


def apply_param(root: dict, path: str, value: Any) -> None:
    """Set ``path`` in a root config copy and record it as a coordinate."""
    set_path(root, path, copy.deepcopy(value))
    with edit_meta(root) as meta:
        meta.coords[path] = value
        if path.startswith(STRATEGY_PREFIX):
            meta.strategy[path[len(STRATEGY_PREFIX):]] = value


def apply_model(root: dict, spec: ModelSpec) -> None:
    """Replace ``task.model`` of a root config copy by the block of ``spec``."""
    root["task"]["model"] = copy.deepcopy(spec.block)
    with edit_meta(root) as meta:
        meta.model = spec.name


def apply_strategy(root: dict, key: str, value: Any) -> None:
    """Set ``key`` (dotted, inside ``strategy.kwargs``) in every ``PortAnaRecord`` of the task."""
    for cfg in portana_configs(root["task"]):
        set_path(cfg["strategy"].setdefault("kwargs", {}), key, copy.deepcopy(value))
    with edit_meta(root) as meta:
        meta.coords[STRATEGY_PREFIX + key] = value
        meta.strategy[key] = value


def _to_task(root: dict) -> dict:
    task = root["task"]
    task[META] = root[META]
    return task


class _Calendar(TimeAdjuster):
    """Qlib's ``TimeAdjuster`` over a given calendar instead of Qlib's global ``D.calendar``."""

    def __init__(self, calendar: list[pd.Timestamp]):  # noqa: D107 - no super(): it would call D
        self._future = True
        self.cals = calendar

    def shift(self, seg: tuple, step: int, rtype: str = TimeAdjuster.SHIFT_SD) -> tuple:
        """Qlib's shift, but a start shifted to exactly one past the calendar also ends the rolling.

        Qlib raises ``KeyError`` (its end-of-rolling signal) only past ``len(cals)``; at
        ``len(cals)`` it returns a None start, which ``gen_following_tasks`` then compares.
        """
        if rtype == self.SHIFT_SD and seg[0] is not None and self.align_idx(seg[0]) + step >= len(self.cals):
            raise KeyError("The segment is out of valid calendar")
        return super().shift(seg, step, rtype)


class WindowGen(RollingGen):
    """Qlib's ``RollingGen`` on a calendar read from the data directory, windows clipped to the test end.

    ``RollingGen.__init__`` and ``generate`` read Qlib's global ``D.calendar``, which needs a
    ``qlib.init`` that would replace the caller's Qlib settings (its mongo and MLflow config), so
    this subclass sets the same attributes itself and computes the first window and the test end
    from the given calendar; the following windows come from ``RollingGen.gen_following_tasks``.
    Each window's test segment ends no later than the written test end; the handler's
    ``end_time`` is extended to it, and every ``PortAnaRecord`` backtests exactly that window.
    """

    def __init__(self, spec: RollingSpec, calendar: list[pd.Timestamp], file: Path):  # noqa: D107
        self.step, self.rtype, self.trunc_days = spec.step, spec.type, spec.trunc_days
        self.ds_extra_mod_func = None  # the handler end_time is set after clipping, in _fit
        self.ta = _Calendar(calendar)
        self.test_key, self.train_key = "test", "train"
        self.task_copy_func = copy.deepcopy
        self.file = file

    def generate(self, task: dict) -> list[dict]:
        """Return the walk-forward windows of ``task``, numbered from 0 in ``qlib_ext.window``."""
        first = self.task_copy_func(task)
        segments = self._aligned(first["dataset"]["kwargs"]["segments"])
        test_end = self._test_end(segments)
        start = self.ta.align_idx(segments[self.test_key][0])
        segments[self.test_key] = (self.ta.get(start), self.ta.get(start + self.step - 1))
        if self.trunc_days is not None:
            self._check_trunc(segments, int(self.trunc_days))
            trunc_segments(self.ta, segments, self.trunc_days, self.test_key)
        self._update_task_segs(first, segments)
        windows = [first, *self.gen_following_tasks(first, test_end)]
        for index, window in enumerate(windows):
            self._fit(window, index, test_end)
        return windows

    def _aligned(self, segments: dict) -> dict:
        try:
            return copy.deepcopy(self.ta.align_seg(segments))
        except IndexError as e:
            raise ConfigError(f"segments {segments} lie after the calendar's last day "
                              f"{self.ta.max():%Y-%m-%d} in task.dataset.kwargs.segments of {self.file}") from e

    def _check_trunc(self, segments: dict, days: int) -> None:
        """Raise ``ConfigError`` where Qlib's ``TimeAdjuster.truncate`` would fail its bare assertion: every
        truncated date of train/valid must land after the calendar's first day (index 0 is refused too)."""
        test_idx = self.ta.align_idx(min(t for t in segments[self.test_key] if t is not None))
        first, second = (f"{d:%Y-%m-%d}" for d in self.ta.cals[:2])
        for key, seg in segments.items():
            points = [p for p in (seg if key != self.test_key and isinstance(seg, tuple) else ()) if p is not None]
            if not any(min(self.ta.align_idx(p), test_idx - days) <= 0 for p in points):
                continue
            where = f"grid.rolling.trunc_days ({days}) with task.dataset.kwargs.segments.{key} of {self.file}"
            if test_idx - days <= 0:
                raise ConfigError(f"{where}: cutting {days} trading days before the test start "
                                  f"{self.ta.get(test_idx):%Y-%m-%d} reaches the calendar's first day {first}; "
                                  f"use trunc_days {max(test_idx - 1, 0)} or less, or start the test later")
            raise ConfigError(f"{where}: segment {key} starts on the calendar's first day {first}, which Qlib's "
                              f"TimeAdjuster.truncate refuses (AssertionError) when trunc_days is set; start "
                              f"segments.{key} on {second} or later")

    def _test_end(self, segments: dict) -> pd.Timestamp:
        """The written test end, checked to leave one trading day before the calendar ends."""
        cals, (start, end) = self.ta.cals, segments[self.test_key]
        if len(cals) < 2 or end > cals[-2] or start > end:
            latest = f"{cals[-2]:%Y-%m-%d}" if len(cals) > 1 else "(none)"
            raise ConfigError(
                f"test segment {start:%Y-%m-%d}..{end:%Y-%m-%d} does not end before the calendar's last day "
                f"{cals[-1]:%Y-%m-%d} in task.dataset.kwargs.segments.test of {self.file}; a Qlib backtest "
                f"must end at least one trading day before the calendar does: end the test on {latest} "
                "or earlier, or use a data directory with a longer calendar (--provider-uri)")
        return end

    def _fit(self, task: dict, index: int, test_end: pd.Timestamp) -> None:
        kwargs = task["dataset"]["kwargs"]
        segs = kwargs["segments"]
        start, end = segs[self.test_key]
        segs[self.test_key] = (start, test_end if end is None or end > test_end else end)
        segs = kwargs["segments"] = {k: [date_str(d) if d is not None else None for d in v] for k, v in segs.items()}
        handler = kwargs.get("handler")
        hkw = handler.get("kwargs") if isinstance(handler, dict) else None
        test_end_str = segs["test"][1] or ""
        if isinstance(hkw, dict) and hkw.get("end_time") is not None and str(hkw["end_time"]) < test_end_str:
            hkw["end_time"] = segs["test"][1]
        for cfg in portana_configs(task):
            if isinstance(cfg.get("backtest"), dict):
                cfg["backtest"]["start_time"], cfg["backtest"]["end_time"] = segs["test"]
        with edit_meta(task) as meta:
            meta.window = {"index": index, "train": segs.get("train"), "valid": segs.get("valid"), "test": segs["test"]}


def read_calendar(wf: Workflow, provider_uri: str | None = None, *, required: bool = True) -> list[pd.Timestamp]:
    """Read the daily calendar (``calendars/day.txt``) of the workflow's Qlib data directory.

    Args:
        wf: the workflow (its ``qlib_init.provider_uri`` is the default directory).
        provider_uri: a directory that overrides it.
        required: raise when there is no calendar; otherwise return an empty list.

    Raises:
        ConfigError: ``required`` and no local provider directory, or no calendar in it.
    """
    uri = provider_uri or (wf.config.get("qlib_init") or {}).get("provider_uri")
    local = isinstance(uri, str) and "://" not in uri
    if not required and not (local and calendar_path(str(uri)).is_file()):
        return []
    if not isinstance(uri, str) or "://" in uri:
        raise ConfigError(f"grid.rolling needs a local Qlib data directory for its calendar, but "
                          f"qlib_init.provider_uri of {wf.path} is {uri!r}; pass --provider-uri PATH")
    path = calendar_path(uri)
    if not path.is_file():
        raise ConfigError(f"grid.rolling of {wf.path} needs the Qlib calendar, but {path} does not exist; "
                          f"make the data with `qlib-ext data synth --out {path.parent.parent}` "
                          "or pass --provider-uri PATH")
    return list(qlib_calendar(uri))


def check_backtest_end(task: dict, calendar: list[pd.Timestamp], file: Path) -> None:
    """Raise ``ConfigError`` when a ``PortAnaRecord`` backtest ends after the calendar's last-but-one day.

    Qlib fails inside the backtest (``IndexError`` in ``get_step_time``) when it ends on the last day.
    """
    for cfg in portana_configs(task):
        end = (cfg.get("backtest") or {}).get("end_time")
        if isinstance(end, str) and len(calendar) > 1 and pd.Timestamp(end) > calendar[-2]:
            raise ConfigError(
                f"backtest end_time {end} is not before the calendar's last day {calendar[-1]:%Y-%m-%d} in "
                f"port_analysis_config.backtest.end_time of {file} (task '{TaskMeta.of(task).run_name}'); a Qlib "
                f"backtest must end at least one trading day before the calendar does: end it on "
                f"{calendar[-2]:%Y-%m-%d} or earlier, or use a data directory with a longer calendar")


def _finish(task: dict, wf: Workflow, grid_hash: str, labels: dict[str, str]) -> None:
    """Fill the meta block in its final key order, then make the whole task BSON-friendly."""
    draft = TaskMeta.from_dict(task.pop(META))  # re-added last: the block ends the task dict
    model = draft.model or model_short_name(task["model"])
    coords, window = draft.coords, draft.window
    parts = [model, *(f"{labels[p]}={_fmt(v)}" for p, v in coords.items())]
    task[META] = TaskMeta(
        pool=wf.pool, experiment=wf.experiment_name, grid_hash=grid_hash,
        config_id=digest({"model": model, "coords": coords}, length=10),
        coords=coords, model=model, strategy=draft.strategy, window=window,
        run_name=" ".join(parts + ([f"w{window['index']}"] if window else [])), sweep=draft.sweep,
    ).to_dict()
    normalise_dates(task)


def model_short_name(block: dict) -> str:
    """Short name of a model block: ``LGBModel`` -> ``lgb``, ``LinearModel`` -> ``linear``."""
    name = str(block.get("class", "model")).rsplit(".", 1)[-1]
    return name.replace("Model", "").lower() or "model"


def _labels(paths: set[str]) -> dict[str, str]:
    """Run-name label per coordinate: an abbreviation of the last part, two parts if that clashes.

    Not :func:`qlib_ext.tracking.mlflow_ui.short_names` (MLflow param names): a run name is part of the
    ``qlib_ext`` block and so of ``task_hash``, and changing its labels would stop submitted pools deduplicating.
    """
    short = {p: ABBREVIATIONS.get(p.rsplit(".", 1)[-1], p.rsplit(".", 1)[-1]) for p in paths}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {p: (".".join(p.split(".")[-2:]) if s in clashes else s) for p, s in short.items()}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= 24 else text[:21] + "..."


def check_bson(obj: Any, file: Path, run_name: str, where: str = "") -> None:
    """Raise ``ConfigError`` at the first value MongoDB (BSON) cannot store.

    Allowed: str, int (64-bit), float, bool, None, list, and dict with str keys.
    """
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ConfigError(f"task '{run_name}' of {file} has a non-string key {key!r} at {where or '<root>'}; "
                                  "MongoDB keys must be strings")
            check_bson(value, file, run_name, f"{where}.{key}" if where else key)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            check_bson(value, file, run_name, f"{where}.{i}")
    elif not isinstance(obj, _BSON_SCALARS) or (isinstance(obj, int) and not -2**63 <= obj < 2**63):
        raise ConfigError(f"task '{run_name}' of {file} holds {type(obj).__name__} {obj!r} at {where}, which "
                          "MongoDB (BSON) cannot store; expected str, int, float, bool, None, list or dict")


__all__ = ["expand", "axis_generators", "ParamGen", "ModelGen", "StrategyGen", "RandomGen", "WindowGen",
           "read_calendar", "model_short_name", "check_bson", "sample", "Dist", "META"]
