"""The proposer: Optuna's ask-and-tell over the task pool, with the pool as the only source of truth.

Each :meth:`Proposer.step` reads the pool's trial documents (:mod:`qlib_ext.search.trials`) and the tasks
they point to, tells its in-memory Optuna study what finished, reports rolling windows to the pruner,
queues the next window of configurations that survive, and asks for new trials while fewer than
``batch`` are running. There is no second database: a proposer that starts (or restarts after
``kill -9``) replays every trial document into a fresh in-memory study — params through
``enqueue_trial`` + ``ask``, intermediate values, recorded pruning decisions, final states — and goes on
from there; so no trial is lost or counted twice, and the search stops at exactly ``n_trials``.

For ``search: grid | random`` with ``prune:``, the trials are the expanded configurations in order (no
sampler), and the pruner alone decides which windows run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import statistics
import threading
import warnings
from typing import Any

from pymongo.database import Database
from pymongo.errors import PyMongoError

from qlib_ext import defaults
from qlib_ext.errors import StoreError
from qlib_ext.pool.manager import GridTaskManager, task_hash
from qlib_ext.pool.record import HEADLINE_METRICS, Tag, TaskMeta, Trial
from qlib_ext.pool.status import TaskStatus
from qlib_ext.search import pruning, queue
from qlib_ext.search.trials import FINISHED, TrialState, TrialStore, close_search, open_search
from qlib_ext.workflow.load import Workflow
from qlib_ext.workflow.spec import SAMPLERS, GridSpec, ObjectiveSpec

logger = logging.getLogger(__name__)

PRUNE, CONTINUE = "prune", "continue"
"""Pruning decisions recorded per step in a trial document."""


def is_search(grid: GridSpec) -> bool:
    """Whether a workflow's tasks come from a proposer (a sampler, or pruning) rather than ``submit``."""
    return grid.search in SAMPLERS or grid.prune is not None


def objectives(grid: GridSpec) -> tuple[ObjectiveSpec, ...]:
    """The objectives a search optimises: ``grid.objectives`` (several), else ``(grid.objective,)``."""
    return grid.objectives or (grid.objective,)


def make_sampler(grid: GridSpec) -> Any:
    """The Optuna sampler of ``grid.search`` (a no-op random sampler for grid/random with pruning).

    TPE keeps Optuna's constant liar (running trials count as bad, so a batch spreads out) and models
    the parameters jointly; its first ``startup_trials`` trials are random. TPE, NSGA-II and QMC take
    several objectives (Optuna's multi-objective TPE ranks trials by non-domination); NSGA-II's
    population is a third of the budget (2 to 50), so a small search still sees a few generations.
    """
    import optuna

    startup = max(2, min(10, (grid.n_trials or 0) // 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if grid.search == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=grid.seed,
                                                 population_size=max(2, min(50, (grid.n_trials or 0) // 3)))
        if grid.search == "tpe":
            return optuna.samplers.TPESampler(seed=grid.seed, constant_liar=True, multivariate=True,
                                              group=bool(grid.models), n_startup_trials=startup)
        if grid.search == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=grid.seed, n_startup_trials=startup,
                                                warn_independent_sampling=False)
        if grid.search == "gp":
            return optuna.samplers.GPSampler(seed=grid.seed, n_startup_trials=startup, warn_independent_sampling=False)
        if grid.search == "qmc":
            return optuna.samplers.QMCSampler(seed=grid.seed, scramble=True, warn_independent_sampling=False,
                                              warn_asynchronous_seeding=False)
        return optuna.samplers.RandomSampler(seed=grid.seed)


class Proposer:
    """Drives one pool's search. One thread uses one ``Proposer``; any number of proposers (threads,
    processes, hosts) may drive the same pool at once, coordinated only through the store."""

    def __init__(self, wf: Workflow, db: Database, *, batch: int, provider_uri: str | None = None,
                 max_attempts: int | None = None, mlflow_uri: str | None = None, n_trials: int | None = None):
        """``n_trials`` caps the workflow's number of trials (``run --limit``)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.wf, self.grid, self.db = wf, wf.grid, db
        self.batch, self.mlflow_uri = batch, mlflow_uri
        self.max_attempts = max_attempts or wf.workers.max_attempts
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self.tm = GridTaskManager(wf.pool, db)
        self.store = TrialStore(db, wf.pool)
        self.fixed = wf.grid.search not in SAMPLERS
        if self.fixed:
            self.configs = _configs(wf, provider_uri)
            self.n_trials = len(self.configs)
        else:
            from qlib_ext.workflow.space import PointBuilder

            self.builder = PointBuilder(wf, provider_uri)
            self.n_trials = int(wf.grid.n_trials or 0)  # the spec requires n_trials for a sampler
        self.n_trials = min(self.n_trials, n_trials or self.n_trials)
        directions: Any = [o.direction for o in objectives(wf.grid)]  # "maximize" | "minimize", checked by the spec
        self.study = optuna.create_study(directions=directions, sampler=make_sampler(wf.grid),
                                         pruner=pruning.make_pruner(wf.grid.prune))
        self.local: dict[int, Any] = {}  # trial number -> the Optuna trial standing for it
        self.reported: dict[int, int] = {}  # trial number -> windows reported to the pruner
        self.told: dict[int, str] = {}  # trial number -> the state it was told (once)

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event | None = None) -> bool:
        """Step until every trial has finished or ``stop`` is set; True when the search is done."""
        stop = stop or threading.Event()
        done = False
        try:
            while not stop.is_set():
                try:
                    done = self.step()
                except (PyMongoError, StoreError) as e:
                    logger.warning("search %s: task store unreachable (%s); retrying", self.wf.pool, e)
                if done:
                    break
                stop.wait(defaults.SEARCH_POLL_SECONDS)
        finally:
            try:
                close_search(self.db, self.wf.pool, done)
            except PyMongoError as e:
                logger.warning("search %s: could not release the pool (%s); it expires by itself", self.wf.pool, e)
        logger.info("search %s: %s", self.wf.pool, "done" if done else "stopped")
        return done

    def step(self) -> bool:
        """One round: advance every trial, propose while fewer than ``batch`` run. True: all finished."""
        self.hold()
        docs = self.store.all(tasks=False)  # a trial's task dicts are read only when some are queued
        states = [self._advance(doc) for doc in docs]
        running, total = states.count(TrialState.RUNNING.value), len(docs)
        while running < self.batch and total < self.n_trials:
            if self._propose() is None:
                break
            running, total = running + 1, total + 1
        return total >= self.n_trials and running == 0 and self.store.count() >= self.n_trials

    def hold(self) -> None:
        """Keep the pool open for workers for another ``SEARCH_HOLD_SECONDS`` (store clock)."""
        import datetime as dt

        open_search(self.db, self.wf.pool, self.tm.now() + dt.timedelta(seconds=defaults.SEARCH_HOLD_SECONDS),
                    self.owner)

    # ------------------------------------------------------------------ proposing
    def _propose(self) -> int | None:
        """Ask for one trial and queue its first windows; None when the budget is spent."""
        trial = None if self.fixed else self.study.ask()
        if trial is not None:
            from qlib_ext.workflow.space import suggest

            tasks, params = self.builder.tasks(suggest(trial, self.grid)), dict(trial.params)
        number = self.store.reserve(self.n_trials, lambda k: self._doc(*(
            (self.configs[k], {}) if self.fixed else (tasks, params))))
        if number is None:
            if trial is not None:  # another proposer took the last number: this local trial never ran
                import optuna

                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
        if trial is not None:
            self.local[number], self.reported[number] = trial, 0
        doc = self.store.get(number) or {}  # reserved above: it exists
        self._queue(doc, 0, doc[Trial.RELEASED])
        logger.info("search %s: trial %d proposed (%s)", self.wf.pool, number,
                    TaskMeta.of(doc[Trial.TASKS][0]).run_name)
        return number

    def _doc(self, tasks: list[dict], params: dict) -> dict:
        return {Trial.PARAMS: params, Trial.TASKS: tasks, Trial.HASHES: [task_hash(t) for t in tasks],
                Trial.RELEASED: pruning.first_release(self.grid.prune, len(tasks)), Trial.SAMPLER: self.grid.search,
                Trial.CONFIG_ID: TaskMeta.of(tasks[0]).config_id,
                Trial.OBJECTIVE: dataclasses.asdict(self.grid.objective), Trial.JUDGED: {}, Trial.PROPOSER: self.owner,
                **({Trial.OBJECTIVES: [dataclasses.asdict(o) for o in self.grid.objectives]}
                   if self.grid.objectives else {})}

    def _queue(self, doc: dict, start: int, stop: int, status: str = TaskStatus.WAITING.value) -> None:
        tasks = doc.get(Trial.TASKS) or (self.store.get(doc[Trial.NUMBER]) or {})[Trial.TASKS]
        for i in range(start, stop):
            queue.insert(self.tm, [tasks[i]], doc[Trial.NUMBER], i, status=status, max_attempts=self.max_attempts)

    # ------------------------------------------------------------------ advancing a trial
    def _local(self, doc: dict) -> Any:
        """The in-memory Optuna trial of a trial document (replayed from its params when new here)."""
        number = doc[Trial.NUMBER]
        if number not in self.local:
            if doc[Trial.PARAMS]:
                self.study.enqueue_trial(doc[Trial.PARAMS])
            trial = self.study.ask()
            if not self.fixed:
                from qlib_ext.workflow.space import suggest

                suggest(trial, self.grid)  # returns the enqueued params
            self.local[number], self.reported[number] = trial, 0
        return self.local[number]

    def _advance(self, doc: dict) -> str:
        """Bring one trial up to date with its tasks; return its state."""
        number = doc[Trial.NUMBER]
        if number in self.told:
            if not doc.get(Trial.TAGGED):  # the proposer that finished it died before tagging its runs
                self._tag_runs(doc, queue.states(self.tm, doc[Trial.HASHES]))
            return self.told[number]
        trial = self._local(doc)
        states = queue.states(self.tm, doc[Trial.HASHES])
        released = doc[Trial.HASHES][:doc[Trial.RELEASED]]
        if doc[Trial.STATE] == TrialState.RUNNING.value and any(h not in states for h in released):
            self._queue(doc, 0, doc[Trial.RELEASED])  # a proposer died between reserving and queueing
            states = queue.states(self.tm, doc[Trial.HASHES])
        if self.grid.objectives:
            return self._advance_multi(doc, trial, states)
        values, failed = _window_values(doc, states, self.grid.objective.metric)
        if failed and doc[Trial.STATE] == TrialState.RUNNING.value:
            doc = self._finish(doc, TrialState.FAIL.value, None, states)
        doc = self._report(doc, trial, values, states)
        if doc[Trial.STATE] == TrialState.RUNNING.value and len(values) == len(doc[Trial.HASHES]):
            doc = self._finish(doc, TrialState.COMPLETE.value, statistics.fmean(values), states)
        return self._close(doc, trial, states)

    def _advance_multi(self, doc: dict, trial: Any, states: dict) -> str:
        """Several objectives (no pruning): the trial's value is the list of each metric's mean over windows."""
        per_metric = [_window_values(doc, states, o.metric) for o in self.grid.objectives]
        running = doc[Trial.STATE] == TrialState.RUNNING.value
        if running and any(failed for _, failed in per_metric):
            doc = self._finish(doc, TrialState.FAIL.value, None, states)
        elif running and all(len(v) == len(doc[Trial.HASHES]) for v, _ in per_metric):
            doc = self._finish(doc, TrialState.COMPLETE.value, [statistics.fmean(v) for v, _ in per_metric], states)
        return self._close(doc, trial, states)

    def _close(self, doc: dict, trial: Any, states: dict) -> str:
        """Tell Optuna about a finished trial and tag its runs; return the trial's state."""
        if doc[Trial.STATE] in FINISHED:
            self._tell(trial, doc)
            if not doc.get(Trial.TAGGED):
                self._tag_runs(doc, states)
        return doc[Trial.STATE]

    def _report(self, doc: dict, trial: Any, values: list[float], states: dict) -> dict:
        """Report windows done in time order; judge, then prune or queue the next window."""
        number, windows = doc[Trial.NUMBER], len(doc[Trial.HASHES])
        for step in range(self.reported[number], len(values)):
            trial.report(pruning.reported_value(self.grid.prune, values[:step + 1]), step)
            self.reported[number] = step + 1
            if not pruning.judged(self.grid.prune, step, windows):
                continue
            wants = PRUNE if trial.should_prune() else CONTINUE  # also feeds the pruner's own bookkeeping
            running = doc[Trial.STATE] == TrialState.RUNNING.value
            decision = self.store.judge(number, step, wants) if running else doc[Trial.JUDGED].get(str(step), CONTINUE)
            if decision == PRUNE:
                if running:
                    doc = self._finish(doc, TrialState.PRUNED.value, statistics.fmean(values[:step + 1]), states)
                break
            if running and doc[Trial.RELEASED] == step + 1 and self.store.release(number, step + 1):
                doc[Trial.RELEASED] = step + 2
                self._queue(doc, step + 1, step + 2)
        return doc

    def _finish(self, doc: dict, state: str, value: float | list[float] | None, states: dict) -> dict:
        """Move the trial to ``state`` in the store (once, whoever wins); the winner queues a pruned
        trial's remaining windows as ``pruned``."""
        after = self.store.finish(doc[Trial.NUMBER], state, value, by=self.owner)
        if after.get(Trial.FINISHED_BY) == self.owner and after[Trial.STATE] == state:
            if state == TrialState.PRUNED.value:
                self._queue(after, after[Trial.RELEASED], len(after[Trial.HASHES]), status=TaskStatus.PRUNED.value)
            logger.info("search %s: trial %d %s (value %s)", self.wf.pool, doc[Trial.NUMBER], state, value)
        return after

    def _tell(self, trial: Any, doc: dict) -> None:
        import optuna

        state = doc[Trial.STATE]
        if state == TrialState.COMPLETE.value:
            self.study.tell(trial, doc[Trial.VALUE])
        else:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED if state == TrialState.PRUNED.value
                            else optuna.trial.TrialState.FAIL)
        self.told[doc[Trial.NUMBER]] = state
        self.local.pop(doc[Trial.NUMBER], None)

    def _tag_runs(self, doc: dict, states: dict) -> None:
        """Trial number, sampler and state as tags of a finished trial's MLflow runs, then ``tagged`` in
        its document (any proposer does it once the trial finished; tags are idempotent; best effort)."""
        runs = [states[h].run_id for h in doc[Trial.HASHES] if h in states and states[h].run_id]
        tags = {Tag.TRIAL: str(doc[Trial.NUMBER]), Tag.SAMPLER: doc[Trial.SAMPLER], Tag.TRIAL_STATE: doc[Trial.STATE]}
        if doc[Trial.STATE] == TrialState.PRUNED.value:
            tags[Tag.PRUNED] = "true"
        if runs and self.mlflow_uri:
            try:
                import mlflow

                client = mlflow.MlflowClient(tracking_uri=self.mlflow_uri)
                for run_id in runs:
                    for key, value in tags.items():
                        client.set_tag(run_id, key, value)
            except Exception as e:  # noqa: BLE001 - tags are for people; the search goes on without them
                logger.warning("search %s: could not tag the runs of trial %d (%s)", self.wf.pool, doc[Trial.NUMBER], e)
        self.store.coll.update_one({Trial.ID: doc[Trial.ID]}, {"$set": {Trial.TAGGED: True}})
        doc[Trial.TAGGED] = True


def _window_values(doc: dict, states: dict[str, queue.TaskState], metric: str) -> tuple[list[float], bool]:
    """Objective values of the windows done in time order (stopping at the first not done), and whether
    the trial failed: a task ended ``failed``, or a done task has no finite ``metric``."""
    values: list[float] = []
    for h in doc[Trial.HASHES]:
        state = states.get(h)
        if state is None or state.status != TaskStatus.DONE.value:
            break
        value = state.metrics.get(metric, state.metrics.get(HEADLINE_METRICS.get(metric, "")))  # IR, max_dd: short
        if value is None or not math.isfinite(value):
            logger.warning("search: trial %d: a task has no %s among its metrics %s", doc[Trial.NUMBER], metric,
                           sorted(state.metrics))
            return values, True
        values.append(float(value))
    failed = any(states.get(h) is not None and states[h].status == TaskStatus.FAILED.value
                 for h in doc[Trial.HASHES][:doc[Trial.RELEASED]])
    return values, failed


def _configs(wf: Workflow, provider_uri: str | None) -> list[list[dict]]:
    """The configurations of a grid/random workflow, each its windows oldest first (no train-once sweep)."""
    from qlib_ext.workflow.expand import expand

    plain = dataclasses.replace(wf, grid=dataclasses.replace(wf.grid, train_once=False))
    groups: dict[str, list[dict]] = {}
    for task in expand(plain, provider_uri=provider_uri):
        groups.setdefault(str(TaskMeta.of(task).config_id), []).append(task)
    return [sorted(g, key=lambda t: (TaskMeta.of(t).window or {}).get("index", 0)) for g in groups.values()]


def batch_size(grid: GridSpec, workers: int) -> int:
    """``grid.batch`` as a number: ``auto`` is the number of workers."""
    return workers if grid.batch == "auto" else int(grid.batch)
