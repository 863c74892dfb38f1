"""Search: the space as Optuna sees it, and the proposer over a real store with real Optuna.

The proposer tests drain the pool with an in-process stand-in for a worker (claim, then commit a
cheap objective computed from the task's coordinates, or fail it) so they stay fast; the real
worker processes run in ``test_search_e2e.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from qlib_ext.errors import ConfigError
from qlib_ext.pool.manager import GridTaskManager, open_db
from qlib_ext.pool.status import TaskStatus
from qlib_ext.search.proposer import Proposer
from qlib_ext.search.trials import TrialState, TrialStore
from qlib_ext.workflow.load import load_workflow
from qlib_ext.workflow.space import distribution, suggest

TINY = """\
qlib_init:
    provider_uri: {provider}
    region: cn
experiment_name: {pool}
task:
    model:
        class: ChaosModel
        module_path: fixtures
        kwargs: {{i: 0, seconds: 0.0}}
    dataset:
        class: TinyDataset
        module_path: fixtures
        kwargs:
            segments:
                train: [2015-03-30, 2015-12-04]
                valid: [2015-12-07, 2016-03-25]
                test: [2016-03-28, 2016-07-13]
    record: []
grid:
    pool: {pool}
{grid}
"""


def write_tiny(path: Path, provider: Path | str, grid: str, pool: str = "s") -> Path:
    """A workflow of ``fixtures.ChaosModel`` tasks with the given grid lines (indented 4 spaces)."""
    path.write_text(TINY.format(provider=provider, pool=pool, grid=grid))
    return path


def objective(coords: dict) -> float:
    """A smooth cheap objective of the tiny space, best (0) at i = 7, x = 0.3."""
    i, x = coords.get("task.model.kwargs.i", 0), coords.get("task.model.kwargs.x", 0.5)
    return -((i - 7) ** 2) / 100 - (x - 0.3) ** 2


def drain(tm: GridTaskManager, fail_if=lambda coords: False, window_value=None) -> int:
    """Claim and finish every waiting task (the worker stand-in); return how many ran."""
    n = 0
    while (claim := tm.claim(60, worker="test:1")) is not None:
        meta = claim.task["def"]["qlib_ext"]
        n += 1
        if fail_if(meta["coords"]):
            tm.fail(claim, "poison point", max_attempts=1)
            continue
        value = objective(meta["coords"]) if window_value is None else window_value(meta)
        tm.commit(claim, {"run_id": None, "metrics": {"IC": value}})
    return n


def run_search(proposer: Proposer, tm: GridTaskManager, rounds: int = 200, **drain_kwargs) -> int:
    """Alternate proposer rounds and draining until the search is done; return tasks run."""
    ran = 0
    for _ in range(rounds):
        if proposer.step():
            return ran
        ran += drain(tm, **drain_kwargs)
    raise AssertionError("search did not finish")


SPACE = """\
    search: tpe
    n_trials: {n}
    batch: 2
    seed: 0
    objective: {{metric: IC, direction: maximize}}
    params:
        task.model.kwargs.i: {{dist: int, low: 0, high: 12}}
        +task.model.kwargs.x: {{dist: uniform, low: 0.0, high: 1.0}}
"""


@pytest.fixture
def db(mongo_url, task_db_name):
    return open_db(mongo_url, task_db_name)


# --------------------------------------------------------------------------- the space
def test_space_parses_samplers_objective_batch_and_prune(tmp_path):
    wf = load_workflow(write_tiny(tmp_path / "a.yaml", tmp_path, SPACE.format(n=5)))
    assert (wf.grid.search, wf.grid.n_trials, wf.grid.batch) == ("tpe", 5, 2)
    assert (wf.grid.objective.metric, wf.grid.objective.direction) == ("IC", "maximize")
    dists = {k: distribution(v) for k, v in wf.grid.params.items()}
    assert dists["task.model.kwargs.i"] == optuna.distributions.IntDistribution(0, 12)
    assert distribution([{"a": 1}, {"b": 2}]).choices == (0, 1)  # non-scalar choices go by index


@pytest.mark.parametrize(("grid", "message"), [
    ("    search: tpee\n", "unknown search 'tpee' in grid.search of .*; expected one of: grid, random, tpe, cmaes"),
    ("    search: tpe\n", "missing n_trials for search: tpe"),
    ("    search: tpe\n    n_trials: 3\n    batch: many\n", "unknown batch 'many' in grid.batch"),
    ("    search: cmaes\n    n_trials: 3\n    objective: {metric: IC, direction: up}\n",
     "unknown direction 'up' in grid.objective.direction .*; expected one of: maximize, minimize"),
    ("    search: tpe\n    n_trials: 3\n    objective: {metrc: IC}\n",
     "unknown key 'metrc' in grid.objective .*; expected one of: metric, direction"),
    ("    prune: {method: median}\n", "prune without rolling in grid.prune"),
    ("    rolling: {step: 20}\n    prune: {method: hyperband}\n",
     "unknown method 'hyperband' in grid.prune.method .*; expected one of: successive_halving, median, wilcoxon"),
    ("    params:\n        task.model.kwargs.i: {dist: int, low: 0, high: 3}\n",
     "distribution 'int' with search: grid .*expected a list of values, or grid.search: random | tpe"),
])
def test_space_errors_name_the_key_and_the_choices(tmp_path, grid, message):
    with pytest.raises(ConfigError, match=message):
        load_workflow(write_tiny(tmp_path / "bad.yaml", tmp_path, grid))


def test_models_are_a_conditional_categorical(tmp_path):
    grid = """\
    search: tpe
    n_trials: 4
    params:
        +task.extra: [1, 2]
    models:
        a: {class: ChaosModel, module_path: fixtures, kwargs: {i: 0, seconds: 0.0},
            params: {kwargs.seconds: [0.0, 0.1]}}
        b: {class: ChaosModel, module_path: fixtures, kwargs: {x: 0.5},
            params: {kwargs.x: {dist: uniform, low: 0, high: 1}}}
"""
    wf = load_workflow(write_tiny(tmp_path / "m.yaml", tmp_path, grid))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        point = suggest(trial, wf.grid)
        seen.add(point.model)
        assert set(trial.params) == {"model", "task.extra", f"{point.model}:task.model.kwargs."
                                     + ("seconds" if point.model == "a" else "x")}
        study.tell(trial, 0.0)
    assert seen == {"a", "b"}


# --------------------------------------------------------------------------- the proposer
@pytest.mark.parametrize("search", ["tpe", "gp"])
def test_search_runs_exactly_n_trials_and_improves(tmp_path, db, search):
    if search == "gp":  # Optuna's GPSampler is written in PyTorch
        pytest.importorskip("torch", reason="search: gp needs PyTorch: pip install -e '.[torch]' (.ci/run does)")
    space = SPACE.format(n=12).replace("search: tpe", f"search: {search}")
    wf = load_workflow(write_tiny(tmp_path / "t.yaml", tmp_path, space))
    tm = GridTaskManager("s", db)
    proposer = Proposer(wf, db, batch=2)
    sampler = {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler}[search]
    assert isinstance(proposer.study.sampler, sampler)
    run_search(proposer, tm)
    docs = TrialStore(db, "s").all()
    assert [d["number"] for d in docs] == list(range(12))
    assert all(d["state"] == TrialState.COMPLETE.value for d in docs)
    assert len(proposer.study.trials) == 12 and proposer.told == {n: "complete" for n in range(12)}
    for d in docs:  # the value told is the committed metric of the trial's task
        assert d["value"] == pytest.approx(objective(d["tasks"][0]["qlib_ext"]["coords"]))
    assert max(d["value"] for d in docs) > -0.1


def test_killed_proposer_restarts_without_losing_or_double_counting(tmp_path, db):
    """A proposer object thrown away mid-search (its memory gone, as after kill -9) and a new one
    started on the same pool: exactly n_trials, each finished once, the study rebuilt from the pool."""
    wf = load_workflow(write_tiny(tmp_path / "t.yaml", tmp_path, SPACE.format(n=10)))
    tm = GridTaskManager("s", db)
    first = Proposer(wf, db, batch=3)
    for _ in range(2):
        first.step()
        drain(tm)
    first.step()  # proposed more, results of some not yet told
    before = TrialStore(db, "s").all()
    assert 0 < len(before) < 10 and any(d["state"] == "running" for d in before)
    drain(tm)  # results come in while no proposer runs
    second = Proposer(wf, db, batch=3)
    run_search(second, tm)
    docs = TrialStore(db, "s").all()
    assert [d["number"] for d in docs] == list(range(10))
    assert all(d["state"] == "complete" for d in docs)
    assert len(second.study.trials) == 10  # rebuilt: the earlier trials replayed, none twice
    replayed = [t.params for t in second.study.trials[:len(before)]]
    assert replayed == [d["params"] for d in before]
    assert tm.task_pool.count_documents({}) == len({d["hashes"][0] for d in docs})


def test_two_proposers_stay_within_n_trials(tmp_path, db):
    wf = load_workflow(write_tiny(tmp_path / "t.yaml", tmp_path, SPACE.format(n=7)))
    tm = GridTaskManager("s", db)
    a, b = Proposer(wf, db, batch=4), Proposer(wf, db, batch=4)
    for _ in range(100):
        done = [a.step(), b.step()]
        drain(tm)
        if all(done):
            break
    docs = TrialStore(db, "s").all()
    assert [d["number"] for d in docs] == list(range(7))
    assert all(d["state"] == "complete" for d in docs)
    assert set(a.told) == set(b.told) == set(range(7))


def test_repeated_point_reuses_the_result_and_failures_are_told_fail(tmp_path, db):
    """A categorical space of 3 points and 6 trials: repeats reuse the finished task (3 tasks ran
    for 6 trials); the poison point fails and is told FAIL, and the search goes on."""
    grid = SPACE.format(n=6).replace("{dist: int, low: 0, high: 12}", "[3, 7, 9]").replace(
        "        +task.model.kwargs.x: {dist: uniform, low: 0.0, high: 1.0}\n", "")
    wf = load_workflow(write_tiny(tmp_path / "c.yaml", tmp_path, grid))
    tm = GridTaskManager("s", db)
    proposer = Proposer(wf, db, batch=1)
    ran = run_search(proposer, tm, fail_if=lambda c: c["task.model.kwargs.i"] == 9)
    docs = TrialStore(db, "s").all()
    assert len(docs) == 6 and ran == tm.task_pool.count_documents({}) <= 3
    by_point = {}
    for d in docs:
        by_point.setdefault(d["params"]["task.model.kwargs.i"], set()).add(d["state"])
    assert all(states == ({"fail"} if i == 9 else {"complete"}) for i, states in by_point.items())
    assert len(by_point) >= 2
    states = {t.number: t.state for t in proposer.study.trials}
    assert sorted(s.name for s in states.values()).count("FAIL") == sum(d["state"] == "fail" for d in docs)


ROLLING = """\
    search: {search}
    {trials}
    objective: {{metric: IC, direction: maximize}}
    params:
        task.model.kwargs.i: {values}
    rolling: {{step: 15}}
    prune: {{method: {method}, min_windows: 2}}
"""


def _window_value(meta: dict) -> float:
    """Configuration i scores i/10 in every window, with a window-dependent offset shared by all."""
    return meta["coords"]["task.model.kwargs.i"] / 10 + math.sin(meta["window"]["index"])


@pytest.mark.parametrize("method", ["successive_halving", "median", "wilcoxon"])
def test_grid_pruning_never_queues_pruned_windows(tmp_path, db, synth_provider, method):
    grid = ROLLING.format(search="grid", trials="", values="[7, 1, 0, 2, 6, 3]", method=method)
    wf = load_workflow(write_tiny(tmp_path / "r.yaml", synth_provider, grid))
    tm = GridTaskManager("s", db)
    proposer = Proposer(wf, db, batch=2)  # configurations in flight: later ones are judged against earlier ones
    windows = len(proposer.configs[0])
    assert windows >= 4
    ran = run_search(proposer, tm, window_value=_window_value)
    docs = {d["params"].get("i", d["tasks"][0]["qlib_ext"]["coords"]["task.model.kwargs.i"]): d
            for d in TrialStore(db, "s").all()}
    pruned = [i for i, d in docs.items() if d["state"] == "pruned"]
    assert pruned and docs[7]["state"] == "complete"  # the best configuration runs every window
    counts = tm.counts()
    assert counts[TaskStatus.PRUNED.value] == windows * len(pruned) - sum(docs[i]["released"] for i in pruned)
    assert ran == counts[TaskStatus.DONE.value] < windows * 6
    for i in pruned:  # pruned windows exist only as 'pruned' and were never claimed
        hashes = docs[i]["hashes"][docs[i]["released"]:]
        assert all(d["attempt"] == 0 and d["status"] == "pruned" for d in tm.task_pool.find({"hash": {"$in": hashes}}))


def test_leaderboard_ranks_pruned_configurations_apart(db):
    from qlib_ext.analysis.leaderboard import _mark_pruned
    from qlib_ext.search import queue

    tm = GridTaskManager("s", db)
    task = {"model": {}, "qlib_ext": {"config_id": "bad", "coords": {}, "window": {"index": 3}}}
    queue.insert(tm, [task], number=0, first_window=3, status=TaskStatus.PRUNED.value)
    rows = [{"config_id": "bad", "flags": []}, {"config_id": "good"}]
    _mark_pruned(rows, tm)
    assert rows[0]["pruned"] and not rows[1]["pruned"] and rows[0]["flags"] == ["pruned"]
    assert tm.claim(60) is None  # a pruned window is never claimed
