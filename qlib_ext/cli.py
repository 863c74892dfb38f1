"""The ``qlib-ext`` command line. Thin: every command imports its heavy module only when it runs,
so ``qlib-ext --help`` never imports qlib, mlflow or lightgbm."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click

from qlib_ext import defaults
from qlib_ext.errors import QlibExtError


class _Group(click.Group):
    """Turns qlib-ext's own errors into one readable line and exit code 2, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QlibExtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--profile", "profile_path", envvar="QLIB_EXT_PROFILE", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Settings file (TOML) giving option defaults, e.g. mongo_url, mlflow_uri, provider_uri, "
                   "workers (default: ./qlib-ext.toml, else $QLIB_EXT_HOME/qlib-ext.toml). Precedence: "
                   "flag > env var > profile > pool metadata > built-in. Env: QLIB_EXT_PROFILE.")
@click.version_option(package_name="qlib-ext")
@click.pass_context
def main(ctx: click.Context, verbose: int, profile_path: Path | None) -> None:
    """Run grids of Qlib research tasks on a TaskManager pool with many worker processes."""
    from qlib_ext.profile import load_default_map, redact_url_passwords

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_gym_banner()
    # Subcommand contexts are made after this callback, so they inherit the profile's defaults.
    ctx.default_map = load_default_map(main, profile_path)
    # Qlib logs sys.argv as the MLflow param cmd-sys.argv in every run: no URL passwords there.
    sys.argv[:] = [redact_url_passwords(a) for a in sys.argv]
    # MLflow draws a "Downloading artifacts" bar per artifact read (leaderboard, report): not in our output.
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _quiet_gym_banner() -> None:
    """pyqlib's strategy module imports gym, which prints a multi-line "Gym has been unmaintained"
    banner to stderr on import; qlib-ext never uses gym. gym reads the banner from
    ``gym_notices.notices``: an empty stand-in module there keeps every command's output readable."""
    import types

    if "gym_notices.notices" not in sys.modules:
        stand_in = types.ModuleType("gym_notices.notices")
        stand_in.notices = {}
        sys.modules["gym_notices.notices"] = stand_in


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
    click.echo(summary)


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
    click.echo(summary)


@data.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def data_info(path: Path) -> None:
    """Show instruments, date range, fields and missing-data share of a Qlib dataset."""
    from qlib_ext.data.info import describe

    click.echo(describe(path))


# --------------------------------------------------------------------------- store
@main.group(cls=_Group)
def store() -> None:
    """The embedded MongoDB-compatible task store."""


@store.command("serve")
@click.option("--dir", "dir_", type=click.Path(path_type=Path), default=None,
              help="Data directory (default: $QLIB_EXT_HOME/store).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=27017, show_default=True, help="TCP port (0 = any free port).")
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

    url = running_url(dir_)
    if url is None:
        raise click.ClickException("no store is running there; start one with `qlib-ext store serve`")
    click.echo(url)


@store.command("stop")
@click.option("--dir", "dir_", type=click.Path(path_type=Path), default=None,
              help="Data directory (default: $QLIB_EXT_HOME/store).")
def store_stop(dir_: Path | None) -> None:
    """Stop the store running on DIR (SIGTERM; it finishes pending writes first)."""
    from qlib_ext.store import stop

    click.echo("stopped" if stop(dir_) else "no store was running there")


# --------------------------------------------------------------------------- grid
@main.command("expand")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--provider-uri", default=None,
              help="Qlib data directory whose calendar rolling windows use (default: qlib_init.provider_uri).")
@click.option("--json", "as_json", is_flag=True, help="Print the expanded task dicts as a JSON list.")
def expand_cmd(file: Path, provider_uri: str | None, as_json: bool) -> None:
    """Expand FILE's grid into Qlib tasks and print them (count and coordinates); submits nothing."""
    import json

    from qlib_ext.pool.record import META
    from qlib_ext.workflow.expand import expand
    from qlib_ext.workflow.load import load_workflow

    wf = load_workflow(file)
    tasks = expand(wf, provider_uri=provider_uri)
    if as_json:
        click.echo(json.dumps(tasks, indent=2))
        return
    swept = sum(len(t[META].get("sweep", [])) for t in tasks)
    click.echo(f"{len(tasks)} tasks for pool {wf.pool} (experiment {wf.experiment_name}, "
               f"grid {tasks[0][META]['grid_hash'] if tasks else '-'})"
               + (f", then {swept} strategy backtests on their predictions" if swept else ""))
    click.echo(_coords_table([t[META] for t in tasks]))


def _coords_table(metas: list[dict]) -> str:
    """One row per task: its varied dotted paths, model, strategy and window, aligned in columns."""
    from qlib_ext.workflow.expand import STRATEGY_PREFIX

    paths = list(dict.fromkeys(p for m in metas for p in m["coords"] if not p.startswith(STRATEGY_PREFIX)))
    header = ["#", *paths, "model", "strategy", "window"]
    rows = [header] + [[str(i), *(_cell(m["coords"].get(p, "")) for p in paths), m["model"],
                        _strategy_cell(m),
                        _window_cell(m["window"])] for i, m in enumerate(metas)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _strategy_cell(meta: dict) -> str:
    if meta.get("sweep"):
        return f"sweep of {len(meta['sweep'])}"
    return " ".join(f"{k}={_cell(v)}" for k, v in meta["strategy"].items()) or "-"


def _cell(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _window_cell(window: dict | None) -> str:
    return f"w{window['index']} test {window['test'][0]}..{window['test'][1]}" if window else "-"


# --------------------------------------------------------------------------- pool: submit, worker, run
def _mongo_option(f):
    return click.option("--mongo-url", envvar="QLIB_EXT_MONGO_URL", default="embedded", show_default=True,
                        help="MongoDB URL of the task pool, or 'embedded' for the built-in store "
                             "(started in the background if needed). Env: QLIB_EXT_MONGO_URL.")(f)


def _mlflow_option(f):
    return click.option("--mlflow-uri", envvar="MLFLOW_TRACKING_URI", default=None,
                        help="MLflow tracking URI (sqlite:///ABS/mlflow.db or http://host:5000). "
                             "Default: what the pool recorded; for submit $QLIB_EXT_HOME/mlflow.db.")(f)


def _provider_option(f):
    return click.option("--provider-uri", envvar="QLIB_EXT_PROVIDER_URI", default=None,
                        help="Qlib data directory; overrides qlib_init.provider_uri (e.g. another mount).")(f)


def _worker_options(f):
    options = [
        click.option("-n", "--workers", "workers", default=None, type=int,
                     help="Worker processes (default: number of cores)."),
        click.option("--threads", default=None, type=int,
                     help="Threads per worker (default: workers.threads_per_worker or cores // workers)."),
        click.option("--lease-seconds", default=None, type=float,
                     help="Lease length of a claimed task, s (default: workers.lease_seconds, "
                          f"{defaults.LEASE_SECONDS:g})."),
        click.option("--heartbeat-seconds", default=None, type=float,
                     help="Interval between lease renewals, s (default: workers.heartbeat_seconds, "
                          f"{defaults.HEARTBEAT_SECONDS:g})."),
        click.option("--grace-seconds", default=None, type=float,
                     help="Time a running task gets to finish after Ctrl-C/SIGTERM, s (default: "
                          f"workers.grace_seconds, {defaults.GRACE_SECONDS:g})."),
        click.option("--task-timeout", default=None, type=float,
                     help="Wall-clock limit per task, s; the task then runs in a child process that is "
                          "killed at the limit (default: workers.task_timeout; 0 = none, in-process)."),
        click.option("--max-attempts", default=None, type=click.IntRange(min=1),
                     help="Attempts before a task is marked failed (default: workers.max_attempts, "
                          f"{defaults.MAX_ATTEMPTS}). "
                          "run: stamped on the pool's tasks; worker: applies to the attempts it records."),
        click.option("--exit-when-idle", is_flag=True, default=None,
                     help="Exit as soon as nothing is waiting (default: when nothing is unfinished)."),
        click.option("--no-cache", is_flag=True, default=False,
                     help="Build every dataset anew instead of sharing prepared ones (for measurement)."),
        click.option("--allow-module", "allow_module", multiple=True, default=None, metavar="PREFIX",
                     help="Module prefix a task's class/module_path may name (repeatable; replaces the default "
                          "qlib., qlib_ext., lightgbm and the workflow's workers.allowed_modules). "
                          "Env: QLIB_EXT_ALLOWED_MODULES (comma-separated). See docs/security.md."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _limit_option(f):
    return click.option("--limit", default=None, type=click.IntRange(min=1),
                        help="Submit only N tasks, evenly spread over the grid (first and last included): "
                             "a smoke test before the full run.")(f)


def _settings(pool, mongo_url, mlflow_uri, provider_uri, workers, threads, no_cache, **knobs):
    """Worker settings: the pool's recorded ``workers:`` section, then the flags that were given."""
    import os

    from qlib_ext.worker.settings import worker_settings

    n = workers or os.cpu_count() or 1
    settings = worker_settings(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, provider_uri=provider_uri,
                               workers=n, threads=threads, cache=not no_cache,
                               log_level=logging.getLogger().getEffectiveLevel(), **knobs)
    return settings, n


def _stopped(pool: str, mongo_url: str) -> bool:
    """Whether the pool still has unfinished tasks after the workers exited (a Ctrl-C stop)."""
    from qlib_ext.pool.manager import GridTaskManager, open_db

    try:
        return GridTaskManager(pool, open_db(mongo_url)).unfinished() > 0
    except QlibExtError:
        return False


@main.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_mongo_option
@_mlflow_option
@_provider_option
@click.option("--max-attempts", default=None, type=click.IntRange(min=1),
              help="Attempts before a task is marked failed (default: workers.max_attempts, 3).")
@_limit_option
def submit_cmd(file: Path, mongo_url: str, mlflow_uri: str | None, provider_uri: str | None,
               max_attempts: int | None, limit: int | None) -> None:
    """Expand FILE (a qrun YAML with an optional grid: section) and add its new tasks to the pool."""
    from qlib_ext.api import submit

    click.echo(submit(file, mongo_url=mongo_url, mlflow_uri=mlflow_uri, provider_uri=provider_uri,
                      max_attempts=max_attempts, limit=limit))


@main.command("worker")
@click.option("--pool", required=True, help="Name of the pool to drain.")
@_mongo_option
@_mlflow_option
@_provider_option
@_worker_options
@click.pass_context
def worker_cmd(ctx: click.Context, pool: str, mongo_url: str, mlflow_uri: str | None, provider_uri: str | None,
               **opts) -> None:
    """Start worker processes that drain POOL; they exit when the pool is finished."""
    from qlib_ext.pool.progress import Progress
    from qlib_ext.summary import after_workers
    from qlib_ext.worker.group import run_workers

    settings, n = _settings(pool, mongo_url, mlflow_uri, provider_uri, log_to_files=True, **opts)
    click.echo(f"pool {pool}: starting {n} workers x {settings.threads} threads (worker logs: {settings.log_dir})")
    progress = Progress(pool, settings.mongo_url)
    code = run_workers(settings, n, on_tick=progress.tick)
    progress.finish()
    summary = after_workers(pool, mongo_url=settings.mongo_url, mlflow_uri=settings.mlflow_uri, metric=None,
                            code=code, leaderboard=False)
    click.echo(summary.text)
    ctx.exit(summary.code)


@main.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_mongo_option
@_mlflow_option
@_provider_option
@_worker_options
@click.option("--metric", default=None, help="Metric that ranks the leaderboard (default: grid.objective, else "
              "IC; a strategy sweep: 1day.excess_return_with_cost.information_ratio).")
@_limit_option
@click.pass_context
def run_cmd(ctx: click.Context, file: Path, mongo_url: str, mlflow_uri: str | None, provider_uri: str | None,
            metric: str, limit: int | None, **opts) -> None:
    """Submit FILE, run local workers with a live progress line, then print the leaderboard."""
    from qlib_ext.api import submit
    from qlib_ext.pool.progress import Progress
    from qlib_ext.summary import after_workers
    from qlib_ext.worker.group import run_workers

    sub = submit(file, mongo_url=mongo_url, mlflow_uri=mlflow_uri, provider_uri=provider_uri,
                 max_attempts=opts.pop("max_attempts"), limit=limit)
    click.echo(sub)
    settings, n = _settings(sub.pool, sub.mongo_url, sub.mlflow_uri, provider_uri, log_to_files=True, **opts)
    searcher = _start_search(file, sub, n, limit)
    warmer = None
    if settings.cache_dir:  # fill the cache with every core while the workers start up
        from qlib_ext.worker.warm import Warmer

        warmer = Warmer(settings).start()
        settings = replace(settings, start_after=str(warmer.ready))
        click.echo("cache: preparing datasets and backtest exchanges with all cores ...")
    click.echo(f"starting {n} workers x {settings.threads} threads (worker logs: {settings.log_dir})")
    progress = Progress(sub.pool, sub.mongo_url)
    reported = warmer is None

    def tick() -> None:
        nonlocal reported
        if not reported:
            reported = _warm_report(warmer.poll) is not None
        progress.note = "" if reported else "building the shared cache (datasets, exchanges) before the first task"
        progress.tick()

    try:
        code = run_workers(settings, n, on_tick=tick)
        if not reported:  # the workers ended (Ctrl-C) before the warmer
            _warm_report(warmer.wait)
    finally:
        if warmer is not None:
            warmer.close()
    progress.finish()
    if searcher is not None:
        searcher.stop()
        _echo_search(sub.pool, sub.mongo_url)
    if _stopped(sub.pool, sub.mongo_url):
        click.echo(f"stopped: unfinished tasks stay in pool {sub.pool}; resume with "
                   f"`qlib-ext worker --pool {sub.pool}` (the store keeps running in the background)")
    # leaderboard, failures (all failed: exit 1), Ctrl-C (exit 130), MLflow UI command and links
    summary = after_workers(sub.pool, mongo_url=sub.mongo_url, mlflow_uri=sub.mlflow_uri, metric=metric, code=code,
                            stopped=_stopped(sub.pool, sub.mongo_url))
    click.echo(summary.text)
    ctx.exit(summary.code)


def _warm_report(result: Callable[[], object]) -> object:
    """Print what the cache warmer did (``result()``: its outcome, None while it runs); return it."""
    try:
        outcome = result()
    except RuntimeError as e:  # the workers build what they need: slower, not wrong
        click.echo(f"\nwarning: {e}; the workers build what they need", err=True)
        return e
    if outcome is not None:
        click.echo(f"\n{outcome}")
    return outcome


@main.command("status")
@click.argument("pool", required=False)
@_mongo_option
def status_cmd(pool: str | None, mongo_url: str) -> None:
    """Counts per status, running tasks (worker, age) and failed tasks (last error) of POOL;
    without POOL, every pool with its counts."""
    from qlib_ext.pool.progress import status_report
    from qlib_ext.summary import pools_table

    if pool is None:
        click.echo(pools_table(mongo_url))
        return
    _pool_tm(pool, mongo_url)  # a typo in POOL is an error listing the known pools, not "empty"
    click.echo(status_report(pool, mongo_url))
    _echo_search(pool, mongo_url)


# --------------------------------------------------------------------------- search
def _start_search(file: Path, sub, workers: int, limit: int | None = None):
    """For a search workflow (a sampler, or pruning), a proposer thread already holding the pool open;
    ``limit`` (``run --limit``) caps the number of trials."""
    from qlib_ext.search.proposer import is_search
    from qlib_ext.workflow.load import load_workflow

    wf = load_workflow(file)
    if not is_search(wf.grid):
        return None
    from qlib_ext.pool.manager import load_pool_meta, open_db
    from qlib_ext.search.runner import SearchThread

    db = open_db(sub.mongo_url)
    click.echo(f"search {wf.grid.search}" + (f" with {wf.grid.prune.method} pruning" if wf.grid.prune else "")
               + ": the proposer queues trials as results come in")
    return SearchThread(wf, db, workers=workers, provider_uri=load_pool_meta(db, sub.pool).provider_uri,
                        mlflow_uri=sub.mlflow_uri, n_trials=limit).start()


def _echo_search(pool: str, mongo_url: str) -> None:
    from qlib_ext.pool.manager import open_db
    from qlib_ext.search.summary import summary_lines

    for line in summary_lines(open_db(mongo_url), pool):
        click.echo(line)


@main.command("search")
@click.argument("pool")
@_mongo_option
@_mlflow_option
@_provider_option
@click.option("--workflow", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The pool's workflow YAML on this host (default: the path recorded at submit).")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Trials in flight (default: grid.batch; auto = this host's core count).")
def search_cmd(pool: str, mongo_url: str, mlflow_uri: str | None, provider_uri: str | None, workflow: Path | None,
               batch: int | None) -> None:
    """Propose POOL's trials (Optuna ask-and-tell) until n_trials have finished; workers on any host run them.

    The pool is the study: a restarted proposer (even after kill -9) rebuilds it from the pool's trials
    and continues, and several proposers on one pool never exceed n_trials."""
    from qlib_ext.search.runner import run_search

    click.echo(run_search(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, provider_uri=provider_uri,
                          workflow=workflow, batch=batch))


def _pool_tm(pool: str, mongo_url: str):
    from qlib_ext.pool.manager import GridTaskManager, load_pool_meta, open_db

    db = open_db(mongo_url)
    load_pool_meta(db, pool)  # a typo in POOL is an error listing the known pools, not "0 tasks"
    return GridTaskManager(pool, db)


@main.command("retry")
@click.argument("pool")
@_mongo_option
@click.option("--failed", "failed_only", is_flag=True, help="Only failed tasks (default: failed and cancelled).")
@click.option("--task", "task_id", default=None, help="Only this task id (any state but running).")
def retry_cmd(pool: str, mongo_url: str, failed_only: bool, task_id: str | None) -> None:
    """Requeue POOL's failed/cancelled tasks (or one task): attempts start over, the error history stays."""
    from bson import ObjectId
    from bson.errors import InvalidId

    tm = _pool_tm(pool, mongo_url)
    try:
        oid = None if task_id is None else ObjectId(task_id)
    except InvalidId as e:
        raise click.BadParameter(f"{task_id!r} is not a task id (24 hex digits, see `qlib-ext status`)") from e
    n = tm.retry(oid, failed_only=failed_only)
    if oid is not None and n == 0:
        raise click.ClickException(f"task {task_id} not requeued: no such task in pool {pool}, or it is running "
                                   f"(stop it first with `qlib-ext cancel {pool} --now`)")
    click.echo(f"pool {pool}: {n} tasks requeued")


@main.command("cancel")
@click.argument("pool")
@_mongo_option
@click.option("--now", is_flag=True, help="Also stop running tasks (their workers interrupt them).")
def cancel_cmd(pool: str, mongo_url: str, now: bool) -> None:
    """Stop POOL's waiting tasks from being claimed; running ones finish unless --now.
    `qlib-ext retry POOL` requeues cancelled tasks."""
    n = _pool_tm(pool, mongo_url).cancel(now=now)
    click.echo(f"pool {pool}: {n} tasks cancelled" + ("" if now else "; running tasks will finish"))


@main.command("leaderboard")
@click.argument("pool")
@_mongo_option
@_mlflow_option
@click.option("--metric", default=None, help="Metric to rank by, any the runs logged (case-insensitive) or "
              "sharpe/psr/dsr (default: grid.objective, else IC; a strategy sweep: "
              "1day.excess_return_with_cost.information_ratio).")
@click.option("--top", default=None, type=click.IntRange(min=1), help="Show only the best K rows.")
@click.option("--trials", default=None, type=click.IntRange(min=0),
              help="Configurations tried outside this pool, added to N for the Deflated Sharpe.")
@click.option("--blocks", default=16, show_default=True, type=click.IntRange(min=2),
              help="CSCV blocks S for the PBO (even).")
@click.option("--tag-runs", is_flag=True, help="Also set the tags qlib_ext.flags and qlib_ext.dsr on the runs.")
@click.option("--json", "as_json", is_flag=True, help="Print {rows: [...best first], grid: {N, PBO, ...}} as JSON.")
def leaderboard_cmd(pool: str, mongo_url: str, mlflow_uri: str | None, metric: str | None, top: int | None,
                    trials: int | None, blocks: int, tag_runs: bool, as_json: bool) -> None:
    """Rank POOL's finished runs (rolling windows aggregated per configuration), with N tried,
    Sharpe, PSR, Deflated Sharpe, sanity flags and PBO (docs/validity.md)."""
    import json

    from qlib_ext.analysis.leaderboard import format_table, ranked, tag_flags

    rows, grid = ranked(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric, trials=trials,
                        blocks=blocks)
    if tag_runs:
        tag_flags(rows, grid)
    if as_json:
        click.echo(json.dumps({"rows": rows[:top] if top else rows, "grid": grid}, indent=2, default=str))
    else:
        click.echo(format_table(rows, grid, top=top))
        _echo_search(pool, mongo_url)  # a search's trials per state and how its best improved


@main.command("reproduce")
@click.argument("run_id")
@_mlflow_option
@_mongo_option
@_provider_option
@click.option("--tolerance", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Largest absolute metric difference accepted.")
def reproduce_cmd(run_id: str, mlflow_uri: str | None, mongo_url: str, provider_uri: str | None,
                  tolerance: float) -> None:
    """Re-run RUN_ID's task (its MLflow 'task' artifact) and compare the metrics with the recorded ones.

    Exit code 0 when every recorded metric (timings aside) is reproduced within --tolerance, 1 otherwise.
    """
    from qlib_ext.worker.reproduce import reproduce

    result = reproduce(run_id, mlflow_uri=mlflow_uri, mongo_url=mongo_url, provider_uri=provider_uri,
                       tolerance=tolerance)
    click.echo(result.table())
    sys.exit(0 if result.ok else 1)


@main.command("report")
@click.argument("pool")
@_mongo_option
@_mlflow_option
@click.option("--metric", default=None, help="Metric to rank by (default: the leaderboard's).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for report.html (default: $QLIB_EXT_HOME/reports/POOL).")
def report_cmd(pool: str, mongo_url: str, mlflow_uri: str | None, metric: str | None, out: Path | None) -> None:
    """Write POOL's report (leaderboard, grid plots, the best run) as one self-contained HTML page and
    attach it to the grid's parent run in MLflow."""
    from qlib_ext.analysis.report import build

    click.echo(f"report: {build(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric, out=out)}")


# --------------------------------------------------------------------------- demo
@main.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where data, store and MLflow DB live (default: $QLIB_EXT_HOME, else ~/.qlib-ext).")
@click.option("-n", "--workers", default=None, type=int, help="Worker processes (default: number of cores).")
@click.pass_context
def demo_cmd(ctx: click.Context, workdir: Path | None, workers: int | None) -> None:
    """Make synthetic data if needed, then run workflows/quickstart.yaml on the defaults
    (embedded task store, sqlite MLflow) and print the leaderboard."""
    import os

    from qlib_ext import defaults

    if workdir is not None:
        os.environ[defaults.HOME_ENV] = str(workdir.resolve())
    data_dir = defaults.synth_data_dir()
    if not (data_dir / "calendars" / "day.txt").exists():
        from qlib_ext.data.synth import write_synthetic

        click.echo(f"writing synthetic data to {data_dir} ...")
        click.echo(write_synthetic(data_dir, instruments=300, days=1500, start="2015-01-05", seed=0, market="csi300"))
    quickstart = Path(__file__).resolve().parent.parent / "workflows" / "quickstart.yaml"
    if not quickstart.exists():
        raise click.ClickException(f"{quickstart} not found: run the demo from a source checkout (pip install -e .)")
    # Every option left out takes its default: the demo runs on the built-in defaults only.
    ctx.invoke(run_cmd, file=quickstart, mongo_url="embedded", mlflow_uri=None, provider_uri=str(data_dir),
               workers=workers)


# --------------------------------------------------------------------------- mlflow
@main.group("mlflow", cls=_Group)
def mlflow_group() -> None:
    """MLflow tracking server for workers on several machines."""


@mlflow_group.command("serve")
@click.option("--dir", "dir_", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Holds mlflow.db and mlartifacts/ (default: $QLIB_EXT_HOME/mlflow-server).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; workers on other hosts need a LAN address (no authentication!).")
@click.option("--port", default=5000, show_default=True, help="TCP port.")
@click.option("--server-workers", default=1, show_default=True, type=click.IntRange(1, 8),
              help="MLflow server worker processes.")
@click.option("--basic-auth", is_flag=True, help="Require logins (MLflow's basic-auth app; users in DIR/basic_auth.db; "
                                                 "first start needs MLFLOW_AUTH_ADMIN_PASSWORD).")
@click.pass_context
def mlflow_serve(ctx: click.Context, dir_: Path | None, host: str, port: int, server_workers: int,
                 basic_auth: bool) -> None:
    """Run MLflow's tracking server (sqlite backend, proxied artifacts) in the foreground and print the
    --mlflow-uri for workers. Stops on SIGTERM/SIGINT."""
    from qlib_ext import defaults
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

    from qlib_ext import defaults
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
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    click.echo("\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows))
    click.echo(f"{len(rows) - 1} entries in {folder}")


@cache_group.command("warm")
@click.argument("pool")
@_mongo_option
@_provider_option
@_cache_dir_option
def cache_warm(pool: str, mongo_url: str, provider_uri: str | None, dir_: Path | None) -> None:
    """Build the datasets and backtest exchanges POOL's waiting tasks need, with every core of this host
    (`qlib-ext run` does this itself; use it before starting workers on other hosts)."""
    from qlib_ext.worker.settings import worker_settings
    from qlib_ext.worker.warm import Warmer

    settings = worker_settings(pool, mongo_url=mongo_url, provider_uri=provider_uri,
                               log_level=logging.getLogger().getEffectiveLevel())
    warmer = Warmer(replace(settings, cache_dir=str(dir_)) if dir_ else settings).start()
    try:
        _warm_report(warmer.wait)
    finally:
        warmer.close()


@cache_group.command("clear")
@_cache_dir_option
@click.option("--older-than", "older_than", type=float, default=None, metavar="DAYS",
              help="Only entries not used for DAYS days (default: all).")
def cache_clear(dir_: Path | None, older_than: float | None) -> None:
    """Delete cache entries; safe while workers run (they rebuild or keep their mapped copy)."""
    from qlib_ext import defaults
    from qlib_ext.cache.datasets import clear

    folder = dir_ or defaults.cache_dir()
    click.echo(f"deleted {len(clear(folder, older_than))} entries from {folder}")


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

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        raise click.ClickException(f"{root} not found: run the benchmarks from a source checkout (pip install -e .)")
    failed = []
    for script, (quick_args, full_args) in BENCHES.items():
        if only and script not in only:
            continue
        click.echo(f"=== {script}")
        code = subprocess.call([sys.executable, script, *(quick_args if quick else full_args)], cwd=root)
        if code:
            failed.append(script)
    if failed:
        raise click.ClickException(f"failed: {', '.join(failed)}")
