"""Several objectives: the YAML's ``objective:`` list, the proposer on Optuna's multi-objective samplers over
a real store, the Pareto fronts and the leaderboard's table (issue 21 section 3)."""

from __future__ import annotations

import pytest
from test_search import drain, write_tiny

from qlib_ext.analysis.leaderboard import format_table
from qlib_ext.analysis.pareto import choose_objectives, front_ranks, mark_fronts
from qlib_ext.errors import ConfigError
from qlib_ext.pool.manager import GridTaskManager, open_db
from qlib_ext.pool.record import Metric
from qlib_ext.search.proposer import Proposer
from qlib_ext.search.summary import summary_lines
from qlib_ext.search.trials import TrialState, TrialStore
from qlib_ext.workflow.load import load_workflow

MULTI = """\
    search: {search}
    n_trials: {n}
    batch: 2
    seed: 0
    objective: [{{metric: IC, direction: maximize}}, {{metric: IR, direction: maximize}}]
    params:
        task.model.kwargs.i: {{dist: int, low: 0, high: 20}}
"""


@pytest.fixture
def db(mongo_url, task_db_name):
    return open_db(mongo_url, task_db_name)


def _two_metrics(meta: dict) -> dict:
    """IC rises with i, IR falls with it: every point is on the Pareto front of this trade-off."""
    i = meta["coords"]["task.model.kwargs.i"]
    return {"IC": i / 100, Metric.IR: (20 - i) / 10}


def _drain_two(tm: GridTaskManager) -> int:
    n = 0
    while (claim := tm.claim(60, worker="test:1")) is not None:
        tm.commit(claim, {"run_id": None, "metrics": _two_metrics(claim.task["def"]["qlib_ext"])})
        n += 1
    return n


def test_objective_list_parses_and_a_single_objective_is_unchanged(tmp_path):
    wf = load_workflow(write_tiny(tmp_path / "m.yaml", tmp_path, MULTI.format(search="nsga2", n=4)))
    assert [(o.metric, o.direction) for o in wf.grid.objectives] == [("IC", "maximize"), ("IR", "maximize")]
    assert wf.grid.objective == wf.grid.objectives[0]
    one = load_workflow(write_tiny(tmp_path / "s.yaml", tmp_path, "    search: tpe\n    n_trials: 3\n"))
    assert one.grid.objectives == ()


@pytest.mark.parametrize(("grid", "message"), [
    (MULTI.format(search="cmaes", n=3), r"search: cmaes with several objectives in grid.search of .*m.yaml; "
                                        r"expected one of: grid, random, tpe, nsga2, qmc"),
    ("    search: tpe\n    n_trials: 3\n    objective: [{metric: IC}]\n",
     r"a list of 1 objective\(s\) in grid.objective of .*; expected a mapping \{metric, direction\}, or a list"),
    ("    search: tpe\n    n_trials: 3\n    objective: [{metric: IC}, {metric: IR, direction: up}]\n",
     r"unknown direction 'up' in grid.objective.1.direction of .*; expected one of: maximize, minimize"),
    ("    search: tpe\n    n_trials: 3\n    objective: [{metric: IC}, {metric: ic}]\n",
     "a metric listed twice"),
    ("    search: tpe\n    n_trials: 3\n    rolling: {step: 20}\n    prune: {method: median}\n"
     "    objective: [{metric: IC}, {metric: IR}]\n",
     r"pruning with several objectives \(Optuna prunes one .* in grid.prune"),
])
def test_objective_list_errors_name_file_key_and_choices(tmp_path, grid, message):
    with pytest.raises(ConfigError, match=message):
        load_workflow(write_tiny(tmp_path / "m.yaml", tmp_path, grid))


@pytest.mark.parametrize("search", ["nsga2", "tpe"])
def test_multi_objective_search_tells_optuna_both_values(tmp_path, db, search):
    """Real store, real Optuna: each trial's value is [IC, IR] of its committed result (IR found under its
    short name), the study has two directions, and the summary prints the Pareto front."""
    wf = load_workflow(write_tiny(tmp_path / "m.yaml", tmp_path, MULTI.format(search=search, n=8)))
    tm = GridTaskManager("s", db)
    proposer = Proposer(wf, db, batch=2)
    for _ in range(100):
        if proposer.step():
            break
        _drain_two(tm)
    docs = TrialStore(db, "s").all()
    assert len(docs) == 8 and all(d["state"] == TrialState.COMPLETE.value for d in docs)
    for d in docs:
        metrics = _two_metrics(d["tasks"][0]["qlib_ext"])
        assert d["value"] == pytest.approx([metrics["IC"], metrics[Metric.IR]])
        assert d["objectives"] == [{"metric": "IC", "direction": "maximize"}, {"metric": "IR", "direction": "maximize"}]
    assert len(proposer.study.directions) == 2 and len(proposer.study.best_trials) >= 1
    lines = summary_lines(db, "s")
    assert lines[1].startswith("Pareto front over IC (maximize), IR (maximize): ")
    # a proposer started afresh replays the two-valued trials into its study (the pool is the study)
    again = Proposer(wf, db, batch=2)
    assert again.step() and len(again.study.trials) == 8
    assert [t.values for t in again.study.trials] == [d["value"] for d in docs]


def test_single_objective_trial_documents_have_no_objectives_list(tmp_path, db):
    wf = load_workflow(write_tiny(tmp_path / "s.yaml", tmp_path,
                                  "    search: tpe\n    n_trials: 2\n    batch: 2\n"
                                  "    params:\n        task.model.kwargs.i: {dist: int, low: 0, high: 5}\n"))
    tm = GridTaskManager("s", db)
    proposer = Proposer(wf, db, batch=2)
    while not proposer.step():
        drain(tm)
    docs = TrialStore(db, "s").all()
    assert all("objectives" not in d and isinstance(d["value"], float) for d in docs)


def test_front_ranks_sort_by_non_domination():
    points = [(1, 5), (2, 4), (3, 3), (1, 1), (2, 3), (None, 9)]
    assert front_ranks(points, ["max", "max"]) == [1, 1, 1, 3, 2, 4]
    assert front_ranks([(1, 5), (2, 6)], ["max", "minimize"]) == [1, 1]
    assert front_ranks([(1, 5), (2, 6)], ["max", "max"]) == [2, 1]


def test_leaderboard_table_puts_the_front_first_and_marks_dominated_rows():
    rows = [{"run_name": f"r{i}", "run_id": str(i), "flags": [], "pruned": False,
             "metrics": {"IC": ic, "IR": ir}, "stats": {"sharpe": 1.0, "psr": 0.9, "dsr": 0.5, "T": 60}}
            for i, (ic, ir) in enumerate([(0.01, 0.5), (0.05, 2.0), (0.03, 1.0), (0.04, 3.0)])]
    objectives = choose_objectives(rows, ["ic", "IR:max"], [], "p")
    assert objectives == [("IC", "max"), ("IR", "max")]
    mark_fronts(rows, objectives, lambda r, m: r["metrics"].get(m))
    rows.sort(key=lambda r: (r["front"], -r["metrics"]["IC"]))
    assert [(r["run_name"], r["front"]) for r in rows] == [("r1", 1), ("r3", 1), ("r2", 2), ("r0", 3)]
    grid = {"metric": "IC", "direction": "max", "pareto_over": [{"metric": m, "direction": d} for m, d in objectives]}
    text = format_table(rows, grid)
    assert text.splitlines()[1].startswith("Pareto front over IC (max), IR (max): 2 of 4 configurations, listed first")
    assert "front" in text.splitlines()[2] and "dominated (2)" in text and text.count("pareto") == 2
    with pytest.raises(ConfigError, match=r"unknown metric 'sharp' in --objective; the runs logged: IC, IR"):
        choose_objectives(rows, ["sharp", "IC"], [], "p")
    with pytest.raises(ConfigError, match="unknown direction 'up' in --objective IC:up; expected one of: max"):
        choose_objectives(rows, ["IC:up", "IR"], [], "p")
