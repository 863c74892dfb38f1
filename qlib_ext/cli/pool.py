"""The ``qlib-ext`` commands on a pool: submit, run, worker, status, search, retry, cancel, leaderboard,
reproduce, report and demo. Each parses its flags and calls the library (:mod:`qlib_ext.session` for a run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from qlib_ext import defaults
from qlib_ext.cli.app import (
    echo,
    main,
    mlflow_option,
    mongo_option,
    pool_name,
    printer,
    provider_option,
    session_options,
)


@main.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@session_options("submit")
def submit_cmd(file: Path, mongo_url: str, task_db: str | None, mlflow_uri: str | None, provider_uri: str | None,
               max_attempts: int | None, limit: int | None) -> None:
    """Expand FILE (a qrun YAML with an optional grid: section) and add its new tasks to the pool."""
    from qlib_ext.session.plan import submit

    defaults.use_task_db(task_db)
    echo(submit(file, mongo_url=mongo_url, mlflow_uri=mlflow_uri, provider_uri=provider_uri,
                      max_attempts=max_attempts, limit=limit))


@main.command("worker")
@click.option("--pool", required=True, callback=pool_name, help="Name of the pool to drain.")
@click.option("--experiment", default=None,
              help="MLflow experiment of the tasks Qlib submitted to the pool (TrainerRM, TaskManager.create_task: "
                   "no qlib_ext block): TrainerRM's experiment_name (default: the pool's name, TrainerRM's own "
                   "choice when task_pool is None). Tasks qlib-ext submitted keep their workflow's.")
@click.option("--trainer", type=click.Choice(["rm", "delay"]), default="rm", show_default=True,
              help="On a pool Qlib made, whose worker() to run: rm = TrainerRM's (waiting tasks, task_train), "
                   "delay = DelayTrainerRM's (part_done tasks, end_task_train in the run DelayTrainerRM.train began).")
@session_options("worker")
@click.pass_context
def worker_cmd(ctx: click.Context, pool: str, experiment: str | None, trainer: str, **opts: object) -> None:
    """Start worker processes that drain POOL (submitted by qlib-ext, or made by Qlib's TrainerRM, DelayTrainerRM
    or TaskManager); they exit when the pool is finished."""
    from qlib_ext.session.options import RunOptions
    from qlib_ext.session.run import work

    outcome = work(pool, RunOptions(**opts), printer(), experiment=experiment,  # type: ignore[arg-type]
                   trainer=trainer)
    echo(outcome.text)
    ctx.exit(outcome.code)


@main.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@session_options("run")
@click.pass_context
def run_cmd(ctx: click.Context, file: Path, **opts: object) -> None:
    """Submit FILE, run local workers with a live progress line, then print the leaderboard."""
    from qlib_ext.session.options import RunOptions
    from qlib_ext.session.run import run

    outcome = run(file, RunOptions(**opts), printer())  # type: ignore[arg-type]
    echo(outcome.text)
    ctx.exit(outcome.code)


@main.command("status")
@click.argument("pool", required=False, callback=pool_name)
@mongo_option
def status_cmd(pool: str | None, mongo_url: str) -> None:
    """Counts per status, running tasks (worker, age) and failed tasks (last error) of POOL;
    without POOL, every pool with its counts."""
    from qlib_ext.pool.progress import status_report
    from qlib_ext.session.plan import embedded_note
    from qlib_ext.store import resolve_mongo_url
    from qlib_ext.summary import pools_table

    note = embedded_note(mongo_url, resolve_mongo_url(mongo_url))
    if note:  # on stderr: the report stays what scripts read
        echo(note, err=True)
    if pool is None:
        echo(pools_table(mongo_url))
        return
    _pool_tm(pool, mongo_url)  # a typo in POOL is an error listing the known pools, not "empty"
    echo(status_report(pool, mongo_url))
    _echo_search(pool, mongo_url)


def _echo_search(pool: str, mongo_url: str) -> None:
    """A search's trials per state and how its best improved (nothing for a grid)."""
    from qlib_ext.session.run import report_search

    report_search(pool, mongo_url, printer())

class _SearchGroup(click.Group):
    """``qlib-ext search POOL`` proposes (the ``propose`` subcommand); ``qlib-ext search export POOL`` exports."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["propose", *args]
        return super().parse_args(ctx, args)


@main.group("search", cls=_SearchGroup)
def search_group() -> None:
    """A search pool's proposer (`qlib-ext search POOL`, the same as `search propose POOL`) and its export
    to an Optuna storage (`qlib-ext search export POOL --storage URL`)."""


@search_group.command("propose")
@click.argument("pool", callback=pool_name)
@mongo_option
@mlflow_option
@provider_option
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

    echo(run_search(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, provider_uri=provider_uri,
                          workflow=workflow, batch=batch))


def _pool_tm(pool: str, mongo_url: str):
    from qlib_ext.pool.manager import GridTaskManager, load_pool_meta, open_db

    db = open_db(mongo_url)
    load_pool_meta(db, pool)  # a typo in POOL is an error listing the known pools, not "0 tasks"
    return GridTaskManager(pool, db)


@main.command("retry")
@click.argument("pool", callback=pool_name)
@mongo_option
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
    echo(f"pool {pool}: {n} tasks requeued")


@main.command("cancel")
@click.argument("pool", callback=pool_name)
@mongo_option
@click.option("--now", is_flag=True, help="Also stop running tasks (their workers interrupt them).")
def cancel_cmd(pool: str, mongo_url: str, now: bool) -> None:
    """Stop POOL's waiting (and part_done) tasks from being claimed; running ones finish unless --now.
    `qlib-ext retry POOL` requeues cancelled tasks, each to the state it was cancelled from."""
    n = _pool_tm(pool, mongo_url).cancel(now=now)
    echo(f"pool {pool}: {n} tasks cancelled" + ("" if now else "; running tasks will finish"))


@main.command("leaderboard")
@click.argument("pool", callback=pool_name)
@mongo_option
@mlflow_option
@click.option("--metric", default=None, help="Metric to rank by, any the runs logged (case-insensitive) or "
              "sharpe/psr/dsr (default: grid.objective, else IC; a strategy sweep: "
              "1day.excess_return_with_cost.information_ratio).")
@click.option("--objective", "objectives", multiple=True, metavar="METRIC[:max|min]",
              help="Rank by several objectives (repeat the option): the Pareto front first, dominated rows marked "
              "(default: the pool's grid.objective list; direction max unless :min).")
@click.option("--top", default=None, type=click.IntRange(min=1), help="Show only the best K rows.")
@click.option("--trials", default=None, type=click.IntRange(min=0),
              help="Configurations tried outside this pool, added to N for the Deflated Sharpe.")
@click.option("--blocks", default=defaults.PBO_BLOCKS, show_default=True, type=click.IntRange(min=2),
              help="CSCV blocks S for the PBO (even).")
@click.option("--tag-runs", is_flag=True, help="Also set the tags qlib_ext.flags and qlib_ext.dsr on the runs.")
@click.option("--importance", is_flag=True, help="Also print which axes drove each objective (Optuna's fANOVA and "
              "PED-ANOVA over the finished configurations; per window too when walk-forward windows disagree).")
@click.option("--json", "as_json", is_flag=True, help="Print {rows: [...best first], grid: {N, PBO, ...}} as JSON.")
def leaderboard_cmd(pool: str, mongo_url: str, mlflow_uri: str | None, metric: str | None,
                    objectives: tuple[str, ...], top: int | None, trials: int | None, blocks: int, tag_runs: bool,
                    importance: bool, as_json: bool) -> None:
    """Rank POOL's finished runs (rolling windows aggregated per configuration), with N tried,
    Sharpe, PSR, Deflated Sharpe, sanity flags and PBO (docs/validity.md)."""
    import json

    from qlib_ext.analysis.leaderboard import format_table, ranked, tag_flags

    if metric and objectives:
        raise click.UsageError("--metric and --objective exclude each other: give one metric, or the objectives")
    rows, grid = ranked(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric, trials=trials,
                        blocks=blocks, objectives=objectives)
    if tag_runs:
        tag_flags(rows, grid)
    imp = _importance(pool, mongo_url, grid) if importance else None
    if as_json:
        extra = {"importance": imp.to_dict()} if imp is not None else {}
        echo(json.dumps({"rows": rows[:top] if top else rows, "grid": grid, **extra}, indent=2, default=str))
    else:
        echo(format_table(rows, grid, top=top))
        _echo_search(pool, mongo_url)  # a search's trials per state and how its best improved
        if imp is not None:
            from qlib_ext.analysis.importance import format_importance

            echo(format_importance(imp, _short_axes(imp)))


def _importance(pool: str, mongo_url: str, grid: dict) -> Any:
    """The importances over the objectives the leaderboard ranked by."""
    from qlib_ext.analysis.importance import pool_importance

    objectives = [(o["metric"], o["direction"]) for o in grid.get("pareto_over") or []]
    return pool_importance(pool, objectives or [(grid["metric"], grid["direction"])], mongo_url=mongo_url)


def _short_axes(imp: Any) -> dict[str, str]:
    from qlib_ext.tracking.mlflow_ui import short_names

    return short_names({a for m in imp.shares.values() for ev in m.values() for a in ev})


@main.command("reproduce")
@click.argument("run_id")
@mlflow_option
@mongo_option
@provider_option
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
    echo(result.table())
    sys.exit(0 if result.ok else 1)


@main.command("report")
@click.argument("pool", callback=pool_name)
@mongo_option
@mlflow_option
@click.option("--metric", default=None, help="Metric to rank by (default: the leaderboard's).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for report.html (default: $QLIB_EXT_HOME/reports/POOL).")
def report_cmd(pool: str, mongo_url: str, mlflow_uri: str | None, metric: str | None, out: Path | None) -> None:
    """Write POOL's report (leaderboard, grid plots, the best run) as one self-contained HTML page and
    attach it to the grid's parent run in MLflow."""
    from qlib_ext.analysis.report import build

    echo(f"report: {build(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric, out=out)}")


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

    if workdir is not None:
        os.environ[defaults.HOME_ENV] = str(workdir.resolve())
    data_dir = defaults.synth_data_dir()
    if not (data_dir / "calendars" / "day.txt").exists():
        from qlib_ext.data.synth import write_synthetic

        echo(f"writing synthetic data to {data_dir} ...")
        echo(write_synthetic(data_dir, instruments=300, days=1500, start="2015-01-05", seed=0, market="csi300"))
    quickstart = Path(__file__).resolve().parents[2] / "workflows" / "quickstart.yaml"
    if not quickstart.exists():
        raise click.ClickException(f"{quickstart} not found: run the demo from a source checkout (pip install -e .)")
    # Every option left out takes its default: the demo runs on the built-in defaults only.
    ctx.invoke(run_cmd, file=quickstart, mongo_url="embedded", mlflow_uri=None, provider_uri=str(data_dir),
               workers=workers)

