"""The Python API: a thin layer over the run session (:mod:`qlib_ext.session`), as the command line is.

``run`` returns data and prints nothing unless asked; ``submit`` only adds the tasks; ``leaderboard`` and
``report`` read a pool's results.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qlib_ext.session.options import RunOptions, from_environment
from qlib_ext.session.plan import Submitted, submit
from qlib_ext.session.result import RunResult

logger = logging.getLogger(__name__)

__all__ = ["RunResult", "Submitted", "leaderboard", "report", "run", "submit"]


def run(path: str | Path, workers: int | None = None, *, progress: bool = False, **options: Any) -> RunResult:
    """Submit a workflow, drain its pool with local worker processes and return what happened (``qlib-ext run``).

    Example (a notebook cell; docs/ui.md has a longer one)::

        import qlib_ext
        result = qlib_ext.run("workflows/quickstart.yaml", workers=2)
        result.leaderboard.head()            # pandas DataFrame, best first
        result.grid["trials"], result.pbo    # N configurations tried, probability of backtest overfitting
        result.links["ranked"]               # the ranked view in the MLflow UI

    Usable inside a running event loop (Jupyter): the call blocks until the workers exit.

    Args:
        path: the workflow YAML.
        workers: worker processes (None: one per core).
        progress: print what ``qlib-ext run`` prints while it runs (the progress line and the steps);
            the summary is ``result.text``.
        **options: any ``qlib-ext run`` option by its Python name (:class:`qlib_ext.session.options.RunOptions`:
            ``mongo_url``, ``mlflow_uri``, ``provider_uri``, ``threads``, ``lease_seconds``, ``cache``,
            ``metric``, ``limit``, ...). Unset ones come from their environment variable, then the
            profile (qlib-ext.toml), as on the command line.

    Returns:
        :class:`RunResult`: pool, exit code / ``ok``, counts, leaderboard, grid, links.

    Raises:
        ConfigError: an unknown keyword (the message lists the valid ones), a bad value, or a bad workflow.
    """
    from qlib_ext.session import run as session
    from qlib_ext.session.result import result_of

    given = {k: v for k, v in {"workers": workers, **options}.items() if v is not None}
    RunOptions.of(given)  # the keywords are checked before the environment and the profile fill the rest
    opts = RunOptions.of({**_profile_values(), **from_environment(), **given})
    reporter = session.Reporter(echo=print, warn=print, progress=True) if progress else session.Reporter()
    _quiet_downloads()
    return result_of(session.run(path, opts, reporter), metric=opts.metric)


def _profile_values() -> dict[str, Any]:
    """The run options the profile (qlib-ext.toml) sets: top-level keys, then its ``[run]`` table."""
    from qlib_ext.profile import find_profile, read_profile

    path = find_profile()
    if path is None:
        return {}
    profile = read_profile(path)
    names = {name for name in RunOptions.__dataclass_fields__}
    values = {k: v for k, v in profile.items() if k in names}
    values.update({k: v for k, v in (profile.get("run") or {}).items() if k in names})
    return values


def _default(name: str, value: Any) -> Any:
    """A keyword's value, else its environment variable, else the profile's: what the command line would use."""
    if value is not None:
        return value
    return {**_profile_values(), **from_environment()}.get(name)


def leaderboard(pool: str, *, metric: str | None = None, mongo_url: str | None = None,
                mlflow_uri: str | None = None) -> Any:
    """The pool's leaderboard as a ``pandas.DataFrame``, best first (one row per configuration).

    Columns: ``rank, run_name, <metric>``, Sharpe/PSR/DSR statistics and ``flags``, every other metric,
    then ``config_id, run_id, windows``. ``frame.attrs["grid"]`` holds the grid's numbers (metric,
    trials, PBO).
    """
    from qlib_ext.analysis.leaderboard import leaderboard_frame
    from qlib_ext.names import check_pool_name

    check_pool_name(pool)
    _quiet_downloads()
    frame, grid = leaderboard_frame(pool, mongo_url=_default("mongo_url", mongo_url),
                                    mlflow_uri=_default("mlflow_uri", mlflow_uri), metric=metric)
    frame.attrs["grid"] = grid
    return frame


def report(pool: str, *, out: str | Path | None = None, metric: str | None = None, mongo_url: str | None = None,
           mlflow_uri: str | None = None) -> Path:
    """Write the pool's HTML report (``qlib-ext report``), log it to the grid's MLflow run, return its path."""
    from qlib_ext.analysis.report import build
    from qlib_ext.names import check_pool_name

    check_pool_name(pool)
    _quiet_downloads()
    return build(pool, mongo_url=_default("mongo_url", mongo_url), mlflow_uri=_default("mlflow_uri", mlflow_uri),
                 metric=metric, out=out)


def _quiet_downloads() -> None:
    """No "Downloading artifacts" progress bar per artifact read (a notebook cell would fill with them)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
