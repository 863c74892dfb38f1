"""qlib-ext: grids of Qlib research tasks on Qlib's TaskManager, many worker processes, MLflow results.

The notebook API, loaded on first use (``import qlib_ext`` stays light: no qlib, mlflow or lightgbm)::

    qlib_ext.run(path, workers=2)       # like `qlib-ext run`, quiet: a RunResult (counts, leaderboard, PBO, links)
    qlib_ext.leaderboard(pool)          # pandas DataFrame, best first
    qlib_ext.report(pool)               # self-contained HTML report, also on the grid's MLflow run
    qlib_ext.submit(path)               # only add the tasks
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["leaderboard", "report", "run", "submit"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from qlib_ext import api

        return getattr(api, name)
    raise AttributeError(f"module 'qlib_ext' has no attribute {name!r}")
