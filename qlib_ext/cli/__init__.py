"""The ``qlib-ext`` command line: a thin layer over the library (:mod:`qlib_ext.session` runs a workflow).

Every command imports its heavy module only when it runs, so ``qlib-ext --help`` never imports qlib,
mlflow, lightgbm or optuna. :mod:`~qlib_ext.cli.app` holds the group and the shared options,
:mod:`~qlib_ext.cli.pool` the commands on a pool, :mod:`~qlib_ext.cli.tools` data, store, cache and the rest,
:mod:`~qlib_ext.cli.launch` workers on a cluster.
"""

from __future__ import annotations

from qlib_ext.cli import launch, optuna_ui, pool, tools  # noqa: F401 - registers the commands on main
from qlib_ext.cli.app import main

__all__ = ["main"]
