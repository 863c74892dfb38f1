"""The ``grid:`` and ``workers:`` sections of a workflow YAML: dataclasses and their validation.

Everything here runs once, at load time (``qlib_ext.workflow.load.load_workflow``), so a bad grid fails
before a single task is submitted. Messages follow Hydra's style: what is wrong, in which key of
which file, and what would be valid.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import ConfigError
from qlib_ext.names import POOL_NAME_RULE, pool_name_problem
from qlib_ext.pool.record import Metric
from qlib_ext.workflow.limits import check_grid_size
from qlib_ext.workflow.paths import check_path, get_parent
from qlib_ext.workflow.records import is_port_ana, portana_configs  # noqa: F401 - re-exported

SAMPLERS = ("tpe", "cmaes", "gp", "qmc", "nsga2")
"""Model-based searches: an Optuna sampler proposes each point (``qlib_ext.search``)."""

SEARCHES = ("grid", "random", *SAMPLERS)
"""Values of ``grid.search``."""

DIRECTIONS = ("maximize", "minimize")
"""Values of ``grid.objective.direction``."""

MULTI_OBJECTIVE_SEARCHES = ("grid", "random", "tpe", "nsga2", "qmc")
"""Searches that take several objectives (Optuna's multi-objective samplers: TPE, NSGA-II, QMC)."""

PRUNE_METHODS = ("successive_halving", "median", "wilcoxon")
"""Values of ``grid.prune.method`` (Optuna's pruners, stepping on the rolling window index)."""

DISTS = ("int", "uniform", "loguniform")
"""Distributions a random-search axis may use."""

ROLLING_TYPES = ("expanding", "sliding")
"""Values of ``grid.rolling.type`` (Qlib's ``RollingGen.ROLL_EX`` / ``ROLL_SD``)."""

MODEL_KEYS = ("class", "module_path", "kwargs", "params")
"""Keys of one entry under ``grid.models``."""

ROLLING_KEYS = ("step", "type", "trunc_days")
"""Keys of ``grid.rolling``."""

DIST_FORM = "a non-empty list of values or {dist: int|uniform|loguniform, low: ..., high: ...}"
"""What an axis may look like, for error messages."""



@dataclass(frozen=True)
class Dist:
    """A random-search distribution; bounds are inclusive for ``int``."""

    dist: str  # one of DISTS
    low: float  # lower bound (> 0 for loguniform)
    high: float  # upper bound, > low


Values = list | Dist
"""One axis: a list (every value in a grid, a uniform choice in random search) or a ``Dist``."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """What ranks configurations: a committed metric and whether higher or lower is better."""

    metric: str = Metric.IC  # a key of the committed result's metrics (rolling: mean over windows)
    direction: str = "maximize"  # maximize | minimize


@dataclass(frozen=True)
class PruneSpec:
    """Walk-forward pruning: judge a configuration after each window, drop the ones falling behind."""

    method: str = "successive_halving"  # one of PRUNE_METHODS
    min_windows: int = 2  # windows every configuration runs before it can be pruned


@dataclass
class ModelSpec:
    """One alternative ``task.model`` block of the ``grid.models`` axis."""

    name: str  # short name used in run names and the leaderboard (its key under grid.models)
    block: dict  # the block that replaces task.model: class, module_path, kwargs
    params: dict[str, Values] = field(default_factory=dict)  # axes of this model only, root paths


@dataclass
class RollingSpec:
    """Walk-forward windows through Qlib's ``RollingGen``."""

    step: int  # trading days between window starts; also the length of each test window
    type: str = "expanding"  # expanding: train start fixed; sliding: train window moves too
    trunc_days: int | None = None  # trading days cut before test start from train/valid (label leakage)


@dataclass
class GridSpec:
    """The ``grid:`` section: which axes to vary and how to search them."""

    pool: str | None = None  # task pool (Mongo collection) name; None = the YAML file's stem
    search: str = "grid"  # grid = cartesian product; random = n_trials seeded samples; tpe|cmaes|gp|qmc = Optuna
    n_trials: int | None = None  # number of random-search samples / sampler trials (random and samplers)
    seed: int = 0  # random-search / sampler seed: same YAML + same seed = same tasks (random)
    batch: str | int = "auto"  # sampler trials in flight at once; auto = the number of workers
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)  # what the samplers and pruners optimise
    # every objective when grid.objective is a list (the first is also `objective`); () for a single objective
    objectives: tuple[ObjectiveSpec, ...] = ()
    prune: PruneSpec | None = None  # walk-forward pruning (needs rolling); None = every window runs
    params: dict[str, Values] = field(default_factory=dict)  # dotted path from the YAML root -> axis
    models: dict[str, ModelSpec] = field(default_factory=dict)  # short name -> alternative task.model
    strategies: dict[str, Values] = field(default_factory=dict)  # key inside strategy.kwargs -> axis
    rolling: RollingSpec | None = None  # walk-forward windows; None = the segments as written
    train_once: bool = True  # one training task per model config, its strategy points as backtest tasks
    max_points: int = defaults.MAX_GRID_POINTS  # most tasks the grid may expand to, count (not in its identity)


@dataclass
class WorkersSpec:
    """The ``workers:`` section: how workers treat this pool's tasks."""

    lease_seconds: float = defaults.LEASE_SECONDS  # a claim expires this long after the last heartbeat, s
    # (unset: LEASE_HEARTBEATS x heartbeat_seconds)
    heartbeat_seconds: float = defaults.HEARTBEAT_SECONDS  # interval between lease renewals, s
    max_attempts: int = defaults.MAX_ATTEMPTS  # attempts before a task is marked failed
    task_timeout: float | None = defaults.TASK_TIMEOUT_SECONDS  # wall-clock limit per task, s; None = none
    grace_seconds: float = defaults.GRACE_SECONDS  # time to finish after SIGTERM before handing back, s
    threads_per_worker: str | int = defaults.THREADS_PER_WORKER  # 'auto' (cores // workers) or a count
    allowed_modules: tuple[str, ...] = ()  # module prefixes added to the workers' default allow-list
    fast_backtest: bool = defaults.FAST_BACKTEST  # covered PortAnaRecord backtests on the fast, identical path
    gpus: list | str | None = None  # GPU ids the workers get, one each ([0, 1] or "all"); None: no GPUs
    workers_per_gpu: int = 1  # workers sharing each of those devices


# --------------------------------------------------------------------------- validation
def _err(file: Path, key: str, what: str, expected: str | None = None) -> ConfigError:
    """Hydra-style message: what is wrong, where (key and file), what would be valid."""
    return ConfigError(f"{what} in {key} of {file}" + (f"; expected {expected}" if expected else ""))


def _mapping(raw: Any, file: Path, key: str, allowed: tuple[str, ...] | None = None) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _err(file, key, f"{type(raw).__name__} value {raw!r}", "a mapping")
    unknown = [k for k in raw if allowed is not None and k not in allowed]
    if unknown:
        raise _err(file, key, f"unknown key '{unknown[0]}'", "one of: " + ", ".join(allowed or ()))
    return raw


def _number(raw: Any, file: Path, key: str, *, integer: bool = False, low: float | None = 0,
            strict: bool = True) -> Any:
    """Check a number (bools rejected) against a lower bound (exclusive when ``strict``)."""
    ok = isinstance(raw, int) if integer else isinstance(raw, (int, float))
    kind = "an integer" if integer else "a number"
    if not ok or isinstance(raw, bool):
        raise _err(file, key, f"{type(raw).__name__} value {raw!r}", kind)
    if low is not None and (raw <= low if strict else raw < low):
        raise _err(file, key, f"value {raw}", f"{kind} {'>' if strict else '>='} {low}")
    return raw


def _values(raw: Any, file: Path, key: str, search: str) -> Values:
    """Parse one axis: a non-empty list, or a distribution (random search only)."""
    if isinstance(raw, list):
        if not raw:
            raise _err(file, key, "empty list", "at least one value")
        return list(raw)
    if not isinstance(raw, dict) or "dist" not in raw:
        raise _err(file, key, f"{type(raw).__name__} value {raw!r}", DIST_FORM)
    _mapping(raw, file, key, ("dist", "low", "high"))
    if raw["dist"] not in DISTS:
        raise _err(file, f"{key}.dist", f"unknown dist '{raw['dist']}'", "one of: " + ", ".join(DISTS))
    if search == "grid":
        raise _err(file, key, f"distribution '{raw['dist']}' with search: {search}",
                   "a list of values, or grid.search: " + " | ".join(s for s in SEARCHES if s != "grid"))
    integer = raw["dist"] == "int"
    low, high = (_number(raw.get(b), file, f"{key}.{b}", integer=integer, low=None) for b in ("low", "high"))
    if low >= high:
        raise _err(file, key, f"low {low} >= high {high}", "low < high")
    if raw["dist"] == "loguniform" and low <= 0:
        raise _err(file, f"{key}.low", f"loguniform low {low}", "low > 0")
    return Dist(raw["dist"], low, high)


def parse_grid(raw: Any, config: dict, file: Path) -> GridSpec:
    """Parse and validate the ``grid:`` section against the (date-normalised) qrun ``config``.

    Raises:
        ConfigError: naming ``file``, the key, and what was expected.
    """
    raw = _mapping(raw, file, "grid", tuple(f.name for f in fields(GridSpec)))
    search = raw.get("search", "grid")
    if search not in SEARCHES:
        raise _err(file, "grid.search", f"unknown search '{search}'", "one of: " + ", ".join(SEARCHES))
    spec = GridSpec(pool=_pool(raw.get("pool"), file), search=search,
                    seed=_number(raw.get("seed", 0), file, "grid.seed", integer=True, low=None))
    if search != "grid":
        if raw.get("n_trials") is None:
            raise _err(file, "grid.n_trials", f"missing n_trials for search: {search}", "an integer > 0")
        spec.n_trials = _number(raw["n_trials"], file, "grid.n_trials", integer=True)
    spec.batch = _batch(raw.get("batch", "auto"), file)
    spec.objectives = _parse_objectives(raw.get("objective"), file, search)
    spec.objective = spec.objectives[0] if spec.objectives else _parse_objective(raw.get("objective"), file)
    if search == "gp" and importlib.util.find_spec("torch") is None:
        raise _err(file, "grid.search", "search: gp needs PyTorch (Optuna's GPSampler), which is not installed",
                   "pip install torch, or one of: " + ", ".join(s for s in SEARCHES if s != "gp"))
    if "models" in raw and not raw["models"]:
        raise _err(file, "grid.models", "empty mapping", "short name -> {class, module_path, kwargs}")
    spec.models = _parse_models(raw.get("models"), file, search)
    spec.params = _parse_params(raw.get("params"), config, file, search, bool(spec.models))
    spec.strategies = _parse_strategies(raw.get("strategies"), config, file, search)
    spec.rolling = _parse_rolling(raw.get("rolling"), config, file)
    spec.prune = _parse_prune(raw.get("prune"), file, spec.rolling)
    if spec.objectives and spec.prune is not None:
        raise _err(file, "grid.prune", "pruning with several objectives (Optuna prunes one objective only)",
                   "one objective, or no grid.prune")
    spec.train_once = raw.get("train_once", True)
    if not isinstance(spec.train_once, bool):
        raise _err(file, "grid.train_once", f"{type(spec.train_once).__name__} value {spec.train_once!r}",
                   "true (train each model once, backtest every strategy on it) or false")
    spec.max_points = _number(raw.get("max_points", defaults.MAX_GRID_POINTS), file, "grid.max_points", integer=True)
    check_grid_size(spec, file)  # before anything is built: a 10^7-point grid is refused here
    if search == "random" and _space_size(spec) < (spec.n_trials or 0):
        raise _err(file, "grid.n_trials", f"n_trials {spec.n_trials} exceeds the {_space_size(spec)} "
                   "distinct points of the search space", "fewer trials, more values, or search: grid")
    return spec


def _batch(raw: Any, file: Path) -> str | int:
    if raw == "auto":
        return raw
    if isinstance(raw, str):
        raise _err(file, "grid.batch", f"unknown batch {raw!r}", "auto (the number of workers) or an integer > 0")
    return _number(raw, file, "grid.batch", integer=True)


def _parse_objective(raw: Any, file: Path, key: str = "grid.objective") -> ObjectiveSpec:
    raw = _mapping(raw, file, key, ("metric", "direction"))
    spec = ObjectiveSpec(**raw)
    if not isinstance(spec.metric, str) or not spec.metric:
        raise _err(file, f"{key}.metric", f"metric {spec.metric!r}", "a metric name such as IC or ICIR")
    if spec.direction not in DIRECTIONS:
        raise _err(file, f"{key}.direction", f"unknown direction {spec.direction!r}",
                   "one of: " + ", ".join(DIRECTIONS))
    return spec


def _parse_objectives(raw: Any, file: Path, search: str) -> tuple[ObjectiveSpec, ...]:
    """``grid.objective`` as a list: several objectives (a Pareto front); () when it is a single mapping."""
    if not isinstance(raw, list):
        return ()
    if len(raw) < 2:
        raise _err(file, "grid.objective", f"a list of {len(raw)} objective(s)",
                   "a mapping {metric, direction}, or a list of two or more of them")
    specs = tuple(_parse_objective(item, file, f"grid.objective.{i}") for i, item in enumerate(raw))
    metrics = [s.metric.lower() for s in specs]
    if len(set(metrics)) < len(metrics):
        raise _err(file, "grid.objective", f"a metric listed twice ({', '.join(s.metric for s in specs)})",
                   "distinct metrics")
    if search not in MULTI_OBJECTIVE_SEARCHES:
        raise _err(file, "grid.search", f"search: {search} with several objectives",
                   "one of: " + ", ".join(MULTI_OBJECTIVE_SEARCHES))
    return specs


def _parse_prune(raw: Any, file: Path, rolling: RollingSpec | None) -> PruneSpec | None:
    if raw is None:
        return None
    spec = PruneSpec(**_mapping(raw, file, "grid.prune", ("method", "min_windows")))
    if spec.method not in PRUNE_METHODS:
        raise _err(file, "grid.prune.method", f"unknown method {spec.method!r}", "one of: " + ", ".join(PRUNE_METHODS))
    _number(spec.min_windows, file, "grid.prune.min_windows", integer=True)
    if rolling is None:
        raise _err(file, "grid.prune", "prune without rolling", "a grid.rolling section (pruning judges windows)")
    return spec


def _pool(raw: Any, file: Path) -> str | None:
    problem = None if raw is None else pool_name_problem(raw)
    if problem:
        raise _err(file, "grid.pool", f"invalid pool name {raw!r}", f"{POOL_NAME_RULE} (this one: {problem})")
    return raw


def _parse_params(raw: Any, config: dict, file: Path, search: str, has_models: bool) -> dict[str, Values]:
    params: dict[str, Values] = {}
    for key, value in _mapping(raw, file, "grid.params").items():
        where, path = f"grid.params.{key}", str(key).lstrip("+")
        if has_models and (path == "task.model" or path.startswith("task.model.")):
            raise _err(file, where, "a task.model path together with grid.models",
                       "per-model axes under grid.models.<name>.params (paths relative to the model block)")
        problem = check_path(config, path, allow_new=str(key).startswith("+"))
        if problem:
            raise _err(file, where, *problem)
        if not _reaches_task(config, path):
            raise _err(file, where, f"'{path}' never reaches the task: nothing under 'task' shares it "
                       "(YAML aliases share mappings and lists; a scalar alias like *market is a copy)",
                       "a path under task, or under a mapping that task refers to through an alias")
        params[path] = _values(value, file, where, search)
    return params


def _reaches_task(config: dict, path: str) -> bool:
    """True when setting ``path`` changes ``config['task']`` (the parent is shared into the task)."""
    parent, _ = get_parent(config, path)
    seen: set[int] = set()
    stack = [config["task"]]
    while stack:
        node = stack.pop()
        if id(node) in seen or not isinstance(node, (dict, list)):
            continue
        seen.add(id(node))
        stack.extend(node.values() if isinstance(node, dict) else node)
    return id(parent) in seen


def _parse_models(raw: Any, file: Path, search: str) -> dict[str, ModelSpec]:
    models = {}
    for name, block in _mapping(raw, file, "grid.models").items():
        where = f"grid.models.{name}"
        block = dict(_mapping(block, file, where, MODEL_KEYS))
        if not isinstance(block.get("class"), str):
            raise _err(file, f"{where}.class", f"missing or non-string class {block.get('class')!r}",
                       "a model class name such as LGBModel")
        axes = {}
        for key, value in _mapping(block.pop("params", None), file, f"{where}.params").items():
            path = str(key).lstrip("+")
            problem = check_path(block, path, allow_new=str(key).startswith("+"))
            if problem:
                raise _err(file, f"{where}.params.{key}", *problem)
            axes[f"task.model.{path}"] = _values(value, file, f"{where}.params.{key}", search)
        models[str(name)] = ModelSpec(str(name), block, axes)
    return models


def _parse_strategies(raw: Any, config: dict, file: Path, search: str) -> dict[str, Values]:
    axes = {str(k): _values(v, file, f"grid.strategies.{k}", search)
            for k, v in _mapping(raw, file, "grid.strategies").items()}
    if not axes:
        return axes
    configs = portana_configs(config["task"])
    if not configs:
        raise _err(file, "grid.strategies", "no PortAnaRecord with config.strategy in task.record",
                   "a PortAnaRecord record whose kwargs.config has a strategy block")
    for cfg in configs:
        cls_name, accepted = strategy_params(cfg["strategy"], file)
        for key in axes:
            if key.split(".")[0] not in accepted:
                raise _err(file, f"grid.strategies.{key}", f"unknown key '{key.split('.')[0]}' for {cls_name}",
                           "one of: " + ", ".join(sorted(accepted)))
            problem = check_path(cfg["strategy"].get("kwargs") or {}, key, allow_new=True)
            if problem:
                raise _err(file, f"grid.strategies.{key}", *problem)
    return axes


def strategy_params(strategy: dict, file: Path) -> tuple[str, set[str]]:
    """Return the strategy class name and every keyword its ``__init__`` chain accepts.

    Walks the MRO while each ``__init__`` forwards ``**kwargs`` (TopkDropoutStrategy ->
    BaseSignalStrategy -> BaseStrategy).
    """
    name, module = str(strategy.get("class")), strategy.get("module_path")
    if not module and "." in name:
        module, name = name.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(str(module)), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise _err(file, "port_analysis_config.strategy", f"cannot import strategy {module}.{name}: {e}",
                   "an importable class and module_path") from e
    accepted: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        accepted |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return cls.__name__, accepted


def _parse_rolling(raw: Any, config: dict, file: Path) -> RollingSpec | None:
    if raw is None:
        return None
    raw = _mapping(raw, file, "grid.rolling", ROLLING_KEYS)
    if "step" not in raw:
        raise _err(file, "grid.rolling.step", "missing step", "trading days between windows, an integer > 0")
    spec = RollingSpec(step=_number(raw["step"], file, "grid.rolling.step", integer=True),
                       type=raw.get("type", "expanding"), trunc_days=raw.get("trunc_days"))
    if spec.type not in ROLLING_TYPES:
        raise _err(file, "grid.rolling.type", f"unknown type '{spec.type}'", "one of: " + ", ".join(ROLLING_TYPES))
    if spec.trunc_days is not None:
        _number(spec.trunc_days, file, "grid.rolling.trunc_days", integer=True, strict=False)
    segments = (config["task"]["dataset"].get("kwargs") or {}).get("segments")
    for seg in ("train", "test"):
        value = (segments or {}).get(seg)
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise _err(file, f"task.dataset.kwargs.segments.{seg}", f"{seg} segment {value!r} cannot roll",
                       "[start date, end date] (grid.rolling needs both ends)")
    return spec


def _space_size(spec: GridSpec) -> float:
    """Number of distinct points random search can draw (inf with a continuous axis)."""
    def size(axes: dict[str, Values]) -> float:
        return math.prod(len(v) if isinstance(v, list) else
                         (v.high - v.low + 1 if v.dist == "int" else math.inf) for v in axes.values())
    models = sum(size(m.params) for m in spec.models.values()) if spec.models else 1
    return size(spec.params) * size(spec.strategies) * models


def parse_workers(raw: Any, file: Path) -> WorkersSpec:
    """Parse and validate the ``workers:`` section (defaults from ``qlib_ext.defaults``).

    Raises:
        ConfigError: naming ``file``, the key, and what was expected.
    """
    given = _mapping(raw, file, "workers", tuple(f.name for f in fields(WorkersSpec)))
    spec = WorkersSpec(**given)
    for name in ("lease_seconds", "heartbeat_seconds"):
        _number(getattr(spec, name), file, f"workers.{name}")
    if "lease_seconds" not in given:  # the lease follows the heartbeat: a few missed beats and it is over
        spec.lease_seconds = defaults.lease_for(spec.heartbeat_seconds)
    if spec.heartbeat_seconds >= spec.lease_seconds:
        raise _err(file, "workers.heartbeat_seconds", f"heartbeat {spec.heartbeat_seconds} s >= lease "
                   f"{spec.lease_seconds} s", "a heartbeat well below lease_seconds (a lease would expire)")
    _number(spec.max_attempts, file, "workers.max_attempts", integer=True)
    if spec.task_timeout is not None:
        _number(spec.task_timeout, file, "workers.task_timeout")
    _number(spec.grace_seconds, file, "workers.grace_seconds", strict=False)
    if spec.threads_per_worker != "auto":
        _number(spec.threads_per_worker, file, "workers.threads_per_worker", integer=True)
    modules = spec.allowed_modules
    if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) and m for m in modules):
        raise _err(file, "workers.allowed_modules", f"got {modules!r}", "a list of module prefixes, e.g. [mylab.]")
    spec.allowed_modules = tuple(modules)
    if not isinstance(spec.fast_backtest, bool):
        raise _err(file, "workers.fast_backtest", f"got {spec.fast_backtest!r}", "true or false")
    _number(spec.workers_per_gpu, file, "workers.workers_per_gpu", integer=True)
    if spec.gpus is not None and not isinstance(spec.gpus, (str, int, list)):
        raise _err(file, "workers.gpus", f"got {spec.gpus!r}", "a list of device ids such as [0, 1], or all")
    return spec
