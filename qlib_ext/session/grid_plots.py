"""The grid plots of a finished run, drawn in a background process after ``qlib-ext run`` printed its summary.

The plots (heatmap, slices, top returns, PBO, importances, stage times) need every row's daily returns, one
MLflow artifact download per row, the hyperparameter importances (fANOVA: optuna and scikit-learn imported,
seconds of fitting; also logged as the grid run's ``importance.*`` metrics) and a dozen matplotlib figures:
seconds to tens of seconds that the researcher does not wait for at the prompt (issue 24). :func:`start` runs
``python -m qlib_ext.session.grid_plots POOL`` as a detached process (its own session, output to a log
file) that calls :func:`qlib_ext.analysis.grid_run.finish_grid` once more, plots included: the call is safe
to repeat, so ``qlib-ext report POOL`` meanwhile draws them too. The store URL travels in the child's
environment, not its command line (it may hold a password).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from qlib_ext import defaults

logger = logging.getLogger(__name__)

_MONGO_ENV = "QLIB_EXT_MONGO_URL"
"""The child reads the store URL from here (the same variable ``qlib-ext`` reads)."""


def in_background() -> bool:
    """Whether ``qlib-ext run``/``worker`` leave the grid plots to a background process (``$QLIB_EXT_GRID_PLOTS``
    is not ``wait``)."""
    return os.environ.get(defaults.GRID_PLOTS_ENV, "").strip().lower() != "wait"


def start(pool: str, *, mongo_url: str, mlflow_uri: str, metric: str | None, log: Path) -> subprocess.Popen:
    """Start the detached process that draws ``pool``'s grid plots into its grid run; its output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "qlib_ext.session.grid_plots", pool, "--mlflow-uri", mlflow_uri]
    if metric:
        cmd += ["--metric", metric]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env={**os.environ, _MONGO_ENV: mongo_url}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    """Draw and upload the grid plots of one pool (the background process of :func:`start`); 1 if none."""
    ap = argparse.ArgumentParser(prog="python -m qlib_ext.session.grid_plots", description=__doc__.split("\n")[0])
    ap.add_argument("pool")
    ap.add_argument("--mlflow-uri", required=True)
    ap.add_argument("--metric", default=None)
    args = ap.parse_args(argv)
    from qlib_ext.analysis.grid_run import finish_grid
    from qlib_ext.tables import log_to_terminal

    log_to_terminal(logging.INFO)
    data = finish_grid(args.pool, mongo_url=os.environ.get(_MONGO_ENV), mlflow_uri=args.mlflow_uri,
                       metric=args.metric)
    logger.info("grid plots: pool %s: %s", args.pool, "drawn" if data is not None else "not drawn (see above)")
    return 0 if data is not None else 1


if __name__ == "__main__":
    sys.exit(main())
