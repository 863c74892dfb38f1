"""One run, start to end: submit -> search proposer -> cache warm-up -> workers -> summary.

``qlib-ext run`` and ``qlib_ext.run`` both call :func:`run`; ``qlib-ext worker`` calls :func:`work` and
``qlib-ext cache warm`` :func:`warm_cache`. What a session has to say goes to a :class:`Reporter`: the
command line prints it, the Python API stays quiet unless asked. Never calls ``asyncio.run`` and
installs no signal handler off the main thread, so a notebook's running event loop is no obstacle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import QlibExtError
from qlib_ext.session.options import RunOptions
from qlib_ext.session.plan import Plan, Submitted

logger = logging.getLogger(__name__)


@dataclass
class Reporter:
    """Where a session's messages go: ``echo``/``warn`` (None: the log), whether to draw the progress line, and
    whether the grid plots may be drawn after the session returns, in a background process (the command line:
    the prompt comes back without waiting for them; ``$QLIB_EXT_GRID_PLOTS=wait`` waits)."""

    echo: Callable[[str], Any] | None = None
    warn: Callable[[str], Any] | None = None
    progress: bool = False
    plots_later: bool = False

    def say(self, text: str) -> None:
        (self.echo or (lambda t: logger.info("%s", t)))(text)

    def alert(self, text: str) -> None:
        (self.warn or (lambda t: logger.warning("%s", t.strip())))(text)


@dataclass
class Outcome:
    """What a session did: the submit, the summary (text and exit code) and the grid data behind it."""

    pool: str
    code: int
    text: str
    submitted: Submitted | None = None
    summary: Any = None  # qlib_ext.summary.Summary


def run(path: str | Path, options: RunOptions, reporter: Reporter) -> Outcome:
    """Submit the workflow at ``path`` and drain its pool with local workers; summarise.

    Raises:
        ConfigError: a bad workflow, option or data directory (before anything runs).
    """
    defaults.use_task_db(options.task_db)
    plan = Plan.load(path, mlflow_uri=options.mlflow_uri, provider_uri=options.provider_uri, limit=options.limit)
    sub = plan.submit(mongo_url=options.mongo_url, max_attempts=options.max_attempts)
    reporter.say(str(sub))
    n = options.workers or os.cpu_count() or 1
    settings, n = _on_gpus(_settings_of(plan, sub, options, n), options, n)
    searcher = _start_search(plan, sub, n, reporter)
    code = _drain_warm(settings, n, reporter)
    if searcher is not None:
        searcher.stop()
        report_search(sub.pool, sub.mongo_url, reporter)
    stopped = _stopped(sub.pool, sub.mongo_url)
    if stopped:
        reporter.say(f"stopped: unfinished tasks stay in pool {sub.pool}; resume with "
                     f"`qlib-ext worker --pool {sub.pool}` (the store keeps running in the background)")
    from qlib_ext.summary import after_workers

    # leaderboard, failures (all failed: exit 1), Ctrl-C (exit 130), MLflow UI command and links
    summary = after_workers(sub.pool, mongo_url=sub.mongo_url, mlflow_uri=sub.mlflow_uri, metric=options.metric,
                            code=code, stopped=stopped, plots_log=_plots_log(settings, reporter))
    return Outcome(sub.pool, summary.code, summary.text, sub, summary)


def work(pool: str, options: RunOptions, reporter: Reporter, experiment: str | None = None,
         trainer: str = "rm") -> Outcome:
    """Drain ``pool`` with local workers, settings from the pool's metadata in the store (``qlib-ext worker``).

    ``experiment``: the MLflow experiment of tasks Qlib submitted (no ``qlib_ext`` block; None: the pool's name).
    ``trainer``: on a pool Qlib made, run ``TrainerRM``'s stage (``rm``) or ``DelayTrainerRM``'s second (``delay``).
    """
    from qlib_ext.worker.delayed import left_for_delay, only_second_stage_left
    from qlib_ext.worker.settings import worker_settings

    defaults.use_task_db(options.task_db)
    n = options.workers or os.cpu_count() or 1
    settings = worker_settings(pool, mongo_url=options.mongo_url, mlflow_uri=options.mlflow_uri,
                               provider_uri=options.provider_uri, workers=n, threads=options.threads,
                               cache=options.cache, log_level=logging.getLogger().getEffectiveLevel(),
                               log_to_files=True, experiment=experiment, trainer=trainer, **options.knobs())
    settings, n = _on_gpus(settings, options, n)
    on = f" on GPUs {','.join(settings.gpus)}" if settings.gpus else ""
    code = 0
    if not only_second_stage_left(settings):  # else no worker would claim anything: none started
        reporter.say(f"pool {pool}: starting {n} workers x {settings.threads} threads{on} (worker logs: "
                     f"{settings.log_dir})")
        code = _drain(pool, settings, n, reporter)
    from qlib_ext.summary import after_workers

    summary = after_workers(pool, mongo_url=settings.mongo_url, mlflow_uri=settings.mlflow_uri, metric=None,
                            code=code, leaderboard=False, plots_log=_plots_log(settings, reporter))
    text = summary.text + left_for_delay(pool, summary.counts, settings.trainer)
    return Outcome(pool, summary.code, text, None, summary)


def warm_cache(pool: str, *, mongo_url: str | None, provider_uri: str | None, cache_dir: Path | None,
               reporter: Reporter) -> None:
    """Build what ``pool``'s waiting tasks need into the shared cache, with every core (``qlib-ext cache warm``)."""
    from qlib_ext.worker.settings import worker_settings
    from qlib_ext.worker.warm import Warmer

    settings = worker_settings(pool, mongo_url=mongo_url, provider_uri=provider_uri,
                               log_level=logging.getLogger().getEffectiveLevel())
    warmer = Warmer(replace(settings, cache_dir=str(cache_dir)) if cache_dir else settings).start()
    try:
        _warm_report(warmer.wait, reporter)
    finally:
        warmer.close()


def _plots_log(settings: Any, reporter: Reporter) -> Path | None:
    """The log of the background process drawing the grid plots; None: draw them before the session returns."""
    from qlib_ext.session.grid_plots import in_background

    if not (reporter.plots_later and in_background()):
        return None
    return Path(settings.log_dir or defaults.home() / "logs" / settings.pool) / "grid_plots.log"


def _on_gpus(settings: Any, options: RunOptions, n: int) -> tuple[Any, int]:
    """With GPUs and no ``-n``: one worker per place on the devices, threads re-split over that many."""
    from qlib_ext.worker import gpus
    from qlib_ext.worker.settings import auto_threads

    places = gpus.default_workers(settings.gpus, settings.workers_per_gpu)
    if places is None or options.workers is not None:
        return settings, n
    threads = auto_threads(places) if options.threads is None and settings.threads == auto_threads(n) else (
        settings.threads)
    return replace(settings, threads=threads), places


def _settings_of(plan: Plan, sub: Submitted, options: RunOptions, n: int) -> Any:
    """Worker settings from the plan's pool metadata (in memory: no read-back from the store)."""
    from qlib_ext.worker.settings import settings_from_meta

    return settings_from_meta(sub.pool, plan.meta, mongo_url=sub.mongo_url, provider_uri=plan.provider_uri,
                              mlflow_uri=sub.mlflow_uri, workers=n, threads=options.threads, cache=options.cache,
                              log_level=logging.getLogger().getEffectiveLevel(), log_to_files=True,
                              **options.knobs())


def _start_search(plan: Plan, sub: Submitted, workers: int, reporter: Reporter) -> Any:
    """For a search workflow (a sampler, or pruning), a proposer thread already holding the pool open;
    ``run --limit`` caps the number of trials."""
    if not plan.searching:
        return None
    from qlib_ext.pool.manager import open_db
    from qlib_ext.search.runner import SearchThread

    grid = plan.wf.grid
    reporter.say(f"search {grid.search}" + (f" with {grid.prune.method} pruning" if grid.prune else "")
                 + ": the proposer queues trials as results come in")
    return SearchThread(plan.wf, open_db(sub.mongo_url), workers=workers, provider_uri=plan.meta.provider_uri,
                        mlflow_uri=sub.mlflow_uri, n_trials=plan.limit).start()


def _drain_warm(settings: Any, n: int, reporter: Reporter) -> int:
    """Run the workers while a warmer fills the cache with every core (when there is a cache)."""
    warmer = None
    if settings.cache_dir:
        from qlib_ext.worker.warm import Warmer

        warmer = Warmer(settings).start()
        settings = replace(settings, start_after=str(warmer.ready))
        reporter.say("cache: preparing datasets and backtest exchanges with all cores ...")
    reported = warmer is None

    def note() -> str:
        nonlocal reported
        if not reported and warmer is not None:
            reported = _warm_report(warmer.poll, reporter) is not None
        return "" if reported else "building the shared cache (datasets, exchanges) before the first task"

    reporter.say(f"starting {n} workers x {settings.threads} threads (worker logs: {settings.log_dir})")
    try:
        code = _drain(settings.pool, settings, n, reporter, note)
        if not reported and warmer is not None:  # the workers ended (Ctrl-C) before the warmer
            _warm_report(warmer.wait, reporter)
    finally:
        if warmer is not None:
            warmer.close()
    return code


def _drain(pool: str, settings: Any, n: int, reporter: Reporter, note: Callable[[], str] = str) -> int:
    """Run ``n`` workers until they exit, drawing the progress line when the reporter wants it."""
    from qlib_ext.pool.progress import Progress
    from qlib_ext.worker.group import run_workers

    progress = Progress(pool, settings.mongo_url) if reporter.progress else None

    def tick() -> None:
        text = note()
        if progress is not None:
            progress.note = text
            progress.tick()

    code = run_workers(settings, n, on_tick=tick)
    if progress is not None:
        progress.finish()
    return code


def _warm_report(result: Callable[[], object], reporter: Reporter) -> object:
    """Report what the cache warmer did (``result()``: its outcome, None while it runs); return it."""
    try:
        outcome = result()
    except RuntimeError as e:  # the workers build what they need: slower, not wrong
        reporter.alert(f"\nwarning: {e}; the workers build what they need")
        return e
    if outcome is not None:
        reporter.say(f"\n{outcome}")
    return outcome


def report_search(pool: str, mongo_url: str, reporter: Reporter) -> None:
    """A search's trials per state and how its best improved."""
    from qlib_ext.pool.manager import open_db
    from qlib_ext.search.summary import summary_lines

    for line in summary_lines(open_db(mongo_url), pool):
        reporter.say(line)


def _stopped(pool: str, mongo_url: str) -> bool:
    """Whether the pool still has unfinished tasks after the workers exited (a Ctrl-C stop)."""
    from qlib_ext.pool.manager import GridTaskManager, open_db

    try:
        return GridTaskManager(pool, open_db(mongo_url)).unfinished() > 0
    except QlibExtError:
        return False
