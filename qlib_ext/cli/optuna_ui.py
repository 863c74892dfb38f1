"""The Optuna-facing commands: ``qlib-ext search export`` and ``qlib-ext dashboard`` (optuna-dashboard)."""

from __future__ import annotations

import click

from qlib_ext import defaults
from qlib_ext.cli.app import echo, main, mlflow_option, mongo_option, pool_name
from qlib_ext.cli.pool import search_group

_STORAGE_HELP = "Optuna storage URL, e.g. sqlite:///study.db (default: sqlite under $QLIB_EXT_HOME/optuna/POOL.db)."


@search_group.command("export")
@click.argument("pool", callback=pool_name)
@mongo_option
@mlflow_option
@click.option("--storage", default=None, help=_STORAGE_HELP)
def export_cmd(pool: str, mongo_url: str, mlflow_uri: str | None, storage: str | None) -> None:
    """Write POOL's trials into an Optuna storage as the study POOL: params, distributions, states, values
    (one per objective), window values as intermediate values, and the MLflow run ids as user attributes.
    Repeating it brings the study up to date."""
    from qlib_ext.pool.database import open_db
    from qlib_ext.search.dashboard import default_storage
    from qlib_ext.search.export import export

    url = storage or default_storage(pool)
    done = export(pool, url, db=open_db(mongo_url), mlflow_uri=mlflow_uri)
    echo(f"study {done.study}: {done.trials} trials in {url} ({done.added} added, {done.updated} finished "
               f"since the last export)")


@main.command("dashboard")
@click.argument("pool", callback=pool_name)
@mongo_option
@click.option("--storage", default=None, help=_STORAGE_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to serve on.")
@click.option("--port", default=defaults.DASHBOARD_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--every", default=defaults.DASHBOARD_REFRESH_SECONDS, show_default=True,
              type=click.FloatRange(min=0.5), help="Seconds between two exports of the pool (kept in step).")
def dashboard_cmd(pool: str, mongo_url: str, storage: str | None, host: str, port: int, every: float) -> None:
    """Serve optuna-dashboard (history, slices, importances, Pareto front, parallel coordinates) on POOL,
    exported to an Optuna storage and re-exported every --every seconds while the search runs (Ctrl-C stops).
    Needs `pip install qlib-ext[dashboard]`."""
    import importlib.util

    if importlib.util.find_spec("optuna_dashboard") is None:
        raise click.ClickException("optuna-dashboard is not installed: pip install 'qlib-ext[dashboard]' "
                                   "(or pip install optuna-dashboard)")
    from qlib_ext.pool.database import open_db
    from qlib_ext.search.dashboard import default_storage, serve

    url = storage or default_storage(pool)
    echo(f"dashboard {pool}: http://{host}:{port}/dashboard (storage {url}; re-exported every {every:g} s)")
    try:
        serve(pool, url, db=open_db(mongo_url), host=host, port=port, every=every)
    except KeyboardInterrupt:
        echo("dashboard stopped")
