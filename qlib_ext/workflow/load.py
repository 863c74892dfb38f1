"""Load a workflow YAML exactly as ``qrun`` does, plus qlib-ext's ``grid:`` and ``workers:`` sections.

Loading follows ``qlib/cli/run.py``: the file is rendered as a Jinja template from environment
variables, parsed with ruamel ``YAML(typ="safe", pure=True)``, and merged onto the file named by
``BASE_CONFIG_PATH`` with ``qlib.utils.data.update_config``. Then qlib-ext pops ``grid:`` and
``workers:`` into dataclasses (validated here, once) and rewrites YAML dates as ``YYYY-MM-DD``
strings in place, so YAML aliases (``*data_handler_config``) stay shared Python objects.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlib_ext.errors import ConfigError
from qlib_ext.names import check_pool_name
from qlib_ext.workflow.limits import check_yaml_size
from qlib_ext.workflow.spec import GridSpec, WorkersSpec, parse_grid, parse_workers

__all__ = ["Workflow", "load_workflow", "load_qrun_config", "normalise_dates", "date_str", "GridSpec",
           "WorkersSpec"]

logger = logging.getLogger(__name__)

@dataclass
class Workflow:
    """A loaded, validated workflow YAML."""

    path: Path  # the YAML file
    config: dict  # full qrun config without grid/workers, dates as strings, aliases still shared
    grid: GridSpec  # the grid section (defaults: a one-point grid)
    workers: WorkersSpec  # the workers section (defaults from qlib_ext.defaults)
    pool: str  # grid.pool or the file stem
    experiment_name: str  # config['experiment_name'] or pool


def load_workflow(path: str | Path) -> Workflow:
    """Load, merge, validate and normalise a workflow YAML.

    Args:
        path: the YAML file.

    Returns:
        The workflow; ``config`` is what ``qrun`` would run, minus ``grid:`` and ``workers:``.

    Raises:
        ConfigError: the file is missing or invalid; the message names the file and the key.
    """
    path = Path(path)
    config = load_qrun_config(path)
    had_grid = "grid" in config
    grid_raw, workers_raw = config.pop("grid", None), config.pop("workers", None)
    normalise_dates(config)
    normalise_dates(grid_raw)  # dates as grid values too, so coordinates and run names hold strings
    task = config.get("task")
    if not isinstance(task, dict):
        raise ConfigError(f"missing mapping 'task' in {path}; expected task: {{model: ..., dataset: ..., record: ...}}")
    for key in ("model", "dataset"):
        if not isinstance(task.get(key), dict):
            raise ConfigError(f"missing mapping 'task.{key}' in {path}; "
                              "expected {class: ..., module_path: ..., kwargs: ...}")
    _warn_near_misses(config, path)
    grid = parse_grid(grid_raw, config, path)
    if had_grid and not (grid.params or grid.models or grid.strategies or grid.rolling
                                                      or grid.search != "grid"):
        logger.warning("%s: grid: has no params, models, strategies or rolling: the workflow runs as ONE task",
                       path)
    workers = parse_workers(workers_raw, path)
    pool = grid.pool or check_pool_name(path.stem, f"the file stem of {path}; set grid.pool to choose another")
    return Workflow(path, config, grid, workers, pool, str(config.get("experiment_name") or pool))


_OWN_KEYS = ("grid", "workers")
"""Top-level keys qlib-ext reads itself; a key one typo away from them is warned about."""


def _warn_near_misses(config: dict, path: Path) -> None:
    """A top-level key one edit away from ``grid``/``workers`` (``gird:``) would be ignored silently: warn."""
    import difflib

    for key in config:
        close = difflib.get_close_matches(str(key), _OWN_KEYS, n=1, cutoff=0.74)
        if close and key not in _OWN_KEYS:
            logger.warning("%s: top-level key %r is ignored by qlib-ext; did you mean %r?", path, key, close[0])


def load_qrun_config(path: Path) -> dict:
    """Read ``path`` the way ``qrun`` does (Jinja from env, ruamel safe, ``BASE_CONFIG_PATH``, ``sys``).

    Raises:
        ConfigError: missing file, template or YAML syntax error, missing base file.
    """
    if not path.is_file():
        raise ConfigError(f"workflow file {path} not found")
    config = _parse_yaml(_render(path), path)
    base = config.get("BASE_CONFIG_PATH")
    if base:
        from qlib.utils.data import update_config  # qrun's merge: base first, this file on top

        base_path = _find_base(Path(base), path)
        config = update_config(_parse_yaml(base_path.read_text(), base_path), config)
    _apply_sys_paths(config, path)
    return config


def _render(path: Path) -> str:
    """Render ``path`` as a Jinja template with the environment variables it names (as qrun)."""
    import jinja2
    from jinja2 import meta

    text = path.read_text()
    try:
        template = jinja2.Template(text)
        names = meta.find_undeclared_variables(template.environment.parse(text))
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"template syntax error in {path} at line {e.lineno}: {e.message}") from e
    return template.render({n: os.environ[n] for n in names if n in os.environ})


def _parse_yaml(text: str, path: Path) -> dict:
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        data = YAML(typ="safe", pure=True).load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"YAML syntax error in {path}{where}: {e.problem or e.context}") from e
    except YAMLError as e:
        raise ConfigError(f"YAML error in {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"top level of {path} is {type(data).__name__}; expected a mapping of sections")
    check_yaml_size(data, path)  # before anything copies, hashes or prints it: refuses alias bombs
    return data


def _find_base(base: Path, path: Path) -> Path:
    """Resolve ``BASE_CONFIG_PATH`` like qrun: absolute or cwd-relative first, then next to the file."""
    for candidate in (base, path.absolute().parent / base):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"BASE_CONFIG_PATH '{base}' of {path} not found; looked in {Path.cwd()} "
                      f"and {path.absolute().parent}")


def _apply_sys_paths(config: dict, path: Path) -> None:
    """Add ``sys.path`` / ``sys.rel_path`` entries as qrun does, once each (custom classes import)."""
    section = config.get("sys") or {}
    entries = _as_list(section.get("path", []))
    entries += [str(path.parent.resolve() / p) for p in _as_list(section.get("rel_path", []))]
    sys.path.extend(p for p in entries if p not in sys.path)


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value)


def normalise_dates(obj: Any, _seen: set[int] | None = None) -> Any:
    """Replace every date/datetime inside ``obj`` by a string, mutating containers in place.

    In place, so objects shared through YAML aliases stay shared. Dates become ``YYYY-MM-DD``;
    datetimes with a time of day keep it (``YYYY-MM-DD HH:MM:SS``). Tuples become lists.

    Returns:
        ``obj`` (or its string form when ``obj`` itself is a date).
    """
    seen = set() if _seen is None else _seen
    if isinstance(obj, (dt.date, dt.datetime)):
        return date_str(obj)
    if isinstance(obj, tuple):
        return normalise_dates(list(obj), seen)
    if id(obj) in seen or not isinstance(obj, (dict, list)):
        return obj
    seen.add(id(obj))
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in list(items):
        obj[key] = normalise_dates(value, seen)
    return obj


def date_str(value: Any) -> str:
    """Format a date, datetime or pandas Timestamp as ``YYYY-MM-DD`` (with the time if not midnight)."""
    if isinstance(value, dt.datetime) and value.time() != dt.time():
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return value.strftime("%Y-%m-%d")
