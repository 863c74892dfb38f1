"""The ``qlib-ext`` commands around the pool: data, store, expand, mlflow, cache and bench."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qlib_ext import defaults
from qlib_ext.cli.app import _Group, echo, main, mongo_option, pool_name, printer, provider_option
from qlib_ext.pool.record import STRATEGY_PREFIX, TaskMeta
from qlib_ext.tables import text_table


# --------------------------------------------------------------------------- data
@main.group(cls=_Group)
def data() -> None:
    """Make, import and inspect Qlib-format datasets."""


@data.command("synth")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--instruments", default=300, show_default=True, help="Number of stocks.")
@click.option("--days", default=1500, show_default=True, help="Number of trading days.")
@click.option("--start", default="2015-01-05", show_default=True, help="First trading day.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same data).")
@click.option("--market", default="csi300", show_default=True, help="Name of the instrument list.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def data_synth(out: Path, instruments: int, days: int, start: str, seed: int, market: str,
               overwrite: bool) -> None:
    """Write a synthetic Qlib dataset with planted, learnable cross-sectional alpha.

    Stocks follow a market factor, 8 sectors and their own noise (GARCH volatility, fat tails);
    a short-term reversal, stronger after heavy volume, is planted for models to find. The
    benchmark SH000300 gets features but is not in the instrument lists.
    """
    from qlib_ext.data.synth import write_synthetic

    summary = write_synthetic(out, instruments=instruments, days=days, start=start, seed=seed, market=market,
                              overwrite=overwrite)
    echo(summary)


@data.command("import-csv")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--market", default="all", show_default=True, help="Name of the instrument list.")
@click.option("--benchmark", default=None, help="Symbol to keep as a benchmark index (not in lists).")
@click.option("--min-rows", default=20, show_default=True, help="Fewest rows a symbol may have.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def data_import_csv(files: tuple[Path, ...], out: Path, market: str, benchmark: str | None, min_rows: int,
                    overwrite: bool) -> None:
    """Convert long-format CSV (date, symbol, open, high, low, close, volume) to Qlib format.

    Column names are case-insensitive; aliases such as ticker/code (symbol) and adj_close
    (close) are accepted. Only date, symbol and close are required: missing open/high/low are
    copied from close and missing volume stays empty, with a warning. Bad input stops the import
    with the file and line; nothing is written then.
    """
    from qlib_ext.data.csv_import import import_csv

    summary = import_csv(list(files), out, market=market, benchmark=benchmark, min_rows=min_rows,
                         overwrite=overwrite)
    echo(summary)


@data.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def data_info(path: Path) -> None:
    """Show instruments, date range, fields and missing-data share of a Qlib dataset."""
    from qlib_ext.data.info import describe

    echo(describe(path))


# --------------------------------------------------------------------------- store
@main.group(cls=_Group)
def store() -> None:
    """The embedded MongoDB-compatible task store."""


@store.command("serve")
@click.option("--dir", "dir_", type=click.Path(path_type=Path), default=None,
              help="Data directory (default: $QLIB_EXT_HOME/store).")
@click.option("--host", default=defaults.STORE_HOST, show_default=True, help="Address to bind.")
@click.option("--port", default=defaults.STORE_PORT, show_default=True, help="TCP port (0 = any free port).")
@click.option("--auth/--no-auth", default=True, show_default=True,
              help="Require SCRAM-SHA-256 authentication (credentials in DIR/credentials.json); "
                   "--no-auth only on loopback.")
@click.option("--peer-auth/--no-peer-auth", default=True, show_default=True,
              help="Let a loopback client running as the store's owner in without the password (what lets "
                   "Qlib's own `python -m qlib.workflow.task.manage` work unconfigured); other users still need it.")
@click.option("--tls-cert-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PEM certificate (chain): serve TLS only (use it for a LAN bind).")
@click.option("--tls-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PEM private key of --tls-cert-file (if not in the same file).")
@click.option("--tls-ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CA that local clients verify the certificate with (default: the certificate).")
def store_serve(dir_: Path | None, host: str, port: int, auth: bool, peer_auth: bool, tls_cert_file: Path | None,
                tls_key_file: Path | None, tls_ca_file: Path | None) -> None:
    """Run the store in the foreground until SIGTERM/SIGINT."""
    from qlib_ext.store import serve

    serve(dir_, host=host, port=port, auth=auth, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file,
          tls_ca_file=tls_ca_file, peer_auth=peer_auth)


@store.command("url")
@click.option("--dir", "dir_", type=click.Path(path_type=Path), default=None,
              help="Data directory (default: $QLIB_EXT_HOME/store).")
def store_url(dir_: Path | None) -> None:
    """Print the MongoDB URL of the store running on DIR."""
    from qlib_ext.store import running_url
    from qlib_ext.store.access import qlib_note

    url = running_url(dir_)
    if url is None:
        raise click.ClickException("no store is running there; start one with `qlib-ext store serve`")
    echo(url)
    note = qlib_note(url)
    if note:  # on stderr: `$(qlib-ext store url)` stays the URL
        echo(note, err=True)


@store.command("stop")
@click.option("--dir", "dir_", type=click.Path(path_type=Path), default=None,
              help="Data directory (default: $QLIB_EXT_HOME/store).")
def store_stop(dir_: Path | None) -> None:
    """Stop the store running on DIR (SIGTERM; it finishes pending writes first)."""
    from qlib_ext.store import stop

    echo("stopped" if stop(dir_) else "no store was running there")


# --------------------------------------------------------------------------- grid
@main.command("expand")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--provider-uri", default=None,
              help="Qlib data directory whose calendar rolling windows use (default: qlib_init.provider_uri).")
@click.option("--json", "as_json", is_flag=True, help="Print the expanded task dicts as a JSON list.")
def expand_cmd(file: Path, provider_uri: str | None, as_json: bool) -> None:
    """Expand FILE's grid into Qlib tasks and print them (count and coordinates); submits nothing."""
    import json

    from qlib_ext.workflow.load import load_workflow

    wf = load_workflow(file)  # first: a bad or oversized workflow fails before Qlib and MLflow are imported
    from qlib_ext.tracking.params import check_param_names
    from qlib_ext.workflow.expand import expand

    tasks = expand(wf, provider_uri=provider_uri)
    check_param_names(tasks, file, wf.grid)
    if as_json:
        echo(json.dumps(tasks, indent=2))
        return
    metas = [TaskMeta.of(t) for t in tasks]
    swept = sum(len(m.sweep or []) for m in metas)
    echo(f"{len(tasks)} tasks for pool {wf.pool} (experiment {wf.experiment_name}, "
               f"grid {metas[0].grid_hash if metas else '-'})"
               + (f", then {swept} strategy backtests on their predictions" if swept else ""))
    echo(_coords_table(metas))


def _coords_table(metas: list[TaskMeta]) -> str:
    """One row per task (a TaskMeta): its varied dotted paths, model, strategy and window, aligned in columns."""
    paths = list(dict.fromkeys(p for m in metas for p in m.coords if not p.startswith(STRATEGY_PREFIX)))
    header = ["#", *paths, "model", "strategy", "window"]
    rows = [header] + [[str(i), *(_cell(m.coords.get(p, "")) for p in paths), str(m.model), _strategy_cell(m),
                        _window_cell(m.window)] for i, m in enumerate(metas)]
    return text_table(rows)


def _strategy_cell(meta: TaskMeta) -> str:
    if meta.sweep:
        return f"sweep of {len(meta.sweep)}"
    return " ".join(f"{k}={_cell(v)}" for k, v in meta.strategy.items()) or "-"


def _cell(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _window_cell(window: dict | None) -> str:
    return f"w{window['index']} test {window['test'][0]}..{window['test'][1]}" if window else "-"


# --------------------------------------------------------------------------- mlflow
@main.group("mlflow", cls=_Group)
def mlflow_group() -> None:
    """MLflow tracking server for workers on several machines."""


@mlflow_group.command("serve")
@click.option("--dir", "dir_", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Holds mlflow.db and mlartifacts/ (default: $QLIB_EXT_HOME/mlflow-server).")
@click.option("--host", default=defaults.MLFLOW_HOST, show_default=True,
              help="Address to bind; workers on other hosts need a LAN address (logins required there).")
@click.option("--port", default=defaults.MLFLOW_PORT, show_default=True, help="TCP port.")
@click.option("--server-workers", default=1, show_default=True, type=click.IntRange(1, 8),
              help="MLflow server worker processes.")
@click.option("--auth/--no-auth", "basic_auth", default=True, show_default=True,
              help="Require logins (MLflow's basic-auth app; users in DIR/basic_auth.db, the generated admin login in "
                   "DIR/mlflow-credentials.json). --no-auth only on loopback.")
@click.pass_context
def mlflow_serve(ctx: click.Context, dir_: Path | None, host: str, port: int, server_workers: int,
                 basic_auth: bool) -> None:
    """Run MLflow's tracking server (sqlite backend, proxied artifacts, logins on, owner-only files) in the
    foreground and print the --mlflow-uri for workers. Stops on SIGTERM/SIGINT."""
    from qlib_ext.tracking.server import serve

    ctx.exit(serve(dir_ or defaults.home() / "mlflow-server", host=host, port=port, workers=server_workers,
                   basic_auth=basic_auth))


# --- cache
def _cache_dir_option(f):
    return click.option("--dir", "dir_", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Cache directory (default: $QLIB_EXT_HOME/cache).")(f)


@main.group("cache", cls=_Group)
def cache_group() -> None:
    """The shared prepared-dataset cache (see docs/cache.md)."""


@cache_group.command("ls")
@_cache_dir_option
def cache_ls(dir_: Path | None) -> None:
    """List entries: key, handler, instruments, time range, size, created, last used."""
    import datetime

    from qlib_ext.cache.datasets import list_entries

    def when(ts: float | None) -> str:
        return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"

    folder = dir_ or defaults.cache_dir()
    rows = [["key", "handler", "instruments", "time range", "size", "created", "last used"]]
    for e in list_entries(folder):
        handler = (e["handler"] or "").rsplit(".", 1)[-1] if e["complete"] else "(incomplete)"
        span = f"{e['start_time']}..{e['end_time']}" if e["start_time"] or e["end_time"] else "-"
        rows.append([e["key"][:12], handler, "-" if e["instruments"] is None else str(e["instruments"]), span,
                     f"{e['size'] / 2**20:.1f} MB", when(e["created"]), when(e["last_used"])])
    echo(text_table(rows))
    echo(f"{len(rows) - 1} entries in {folder}")


@cache_group.command("warm")
@click.argument("pool", callback=pool_name)
@mongo_option
@provider_option
@_cache_dir_option
def cache_warm(pool: str, mongo_url: str, provider_uri: str | None, dir_: Path | None) -> None:
    """Build the datasets and backtest exchanges POOL's waiting tasks need, with every core of this host
    (`qlib-ext run` does this itself; use it before starting workers on other hosts)."""
    from qlib_ext.session.run import warm_cache

    warm_cache(pool, mongo_url=mongo_url, provider_uri=provider_uri, cache_dir=dir_, reporter=printer())


@cache_group.command("clear")
@_cache_dir_option
@click.option("--older-than", "older_than", type=float, default=None, metavar="DAYS",
              help="Only entries not used for DAYS days (default: all).")
def cache_clear(dir_: Path | None, older_than: float | None) -> None:
    """Delete cache entries; safe while workers run (they rebuild or keep their mapped copy)."""
    from qlib_ext.cache.datasets import clear

    folder = dir_ or defaults.cache_dir()
    echo(f"deleted {len(clear(folder, older_than))} entries from {folder}")


# --------------------------------------------------------------------------- bench
BENCHES = {
    # script: (arguments with --quick, arguments for the full run)
    "queue_bench.py": (["--quick"], []),
    "store_bench.py": (["--seconds", "1"], []),
    "cache_bench.py": (["--quick", "--repeat", "1"], []),
    "scaling_bench.py": (["--quick"], []),
    "train_once_bench.py": (["--repeat", "1"], []),
    "chaos.py": (["--chaos-seconds", "30"], []),
    "search_bench.py": (["--quick"], []),
    "backtest_bench.py": (["--sizes", "20,300", "--repeat", "1", "--sweep-size", "0"], ["--e2e", "2"]),
}
"""The benchmark suite in the order ``qlib-ext bench`` runs it."""


@main.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes and one repetition (minutes, not an hour).")
@click.option("--only", multiple=True, type=click.Choice(sorted(BENCHES)), help="Run only these scripts.")
def bench_cmd(quick: bool, only: tuple[str, ...]) -> None:
    """Run the benchmark suite in benchmarks/ one script after another; each prints its table and
    writes its section of docs/performance.md."""
    import subprocess

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    if not root.is_dir():
        raise click.ClickException(f"{root} not found: run the benchmarks from a source checkout (pip install -e .)")
    failed = []
    for script, (quick_args, full_args) in BENCHES.items():
        if only and script not in only:
            continue
        echo(f"=== {script}")
        code = subprocess.call([sys.executable, script, *(quick_args if quick else full_args)], cwd=root)
        if code:
            failed.append(script)
    if failed:
        raise click.ClickException(f"failed: {', '.join(failed)}")
