"""``qlib-ext search export``: a pool's trials in a real Optuna RDB storage (sqlite), brought up to date
incrementally, for optuna-dashboard (issue 22 section 4)."""

from __future__ import annotations

import optuna
import pytest
from test_multi_objective import MULTI, _two_metrics
from test_search import write_tiny

from qlib_ext.pool.database import save_pool_meta
from qlib_ext.pool.manager import GridTaskManager, open_db
from qlib_ext.pool.record import Metric, PoolMeta
from qlib_ext.search.export import RUNS_ATTR, TRIAL_ATTR, export
from qlib_ext.search.proposer import Proposer
from qlib_ext.search.trials import TrialStore
from qlib_ext.workflow.load import load_workflow
from qlib_ext.workflow.space import distributions


@pytest.fixture
def db(mongo_url, task_db_name):
    return open_db(mongo_url, task_db_name)


def _commit_one(tm: GridTaskManager, k: int) -> bool:
    claim = tm.claim(60, worker="test:1")
    if claim is None:
        return False
    tm.commit(claim, {"run_id": f"run{k}", "metrics": _two_metrics(claim.task["def"]["qlib_ext"])})
    return True


def test_search_exports_every_trial_and_catches_up(tmp_path, db):
    path = write_tiny(tmp_path / "m.yaml", tmp_path, MULTI.format(search="tpe", n=6))
    wf = load_workflow(path)
    save_pool_meta(db, "s", PoolMeta(workflow=str(path), mlflow_uri="sqlite:///m.db",
                                     objective={"metric": "IC", "direction": "maximize"},
                                     objectives=[{"metric": "IC", "direction": "maximize"},
                                                 {"metric": "IR", "direction": "maximize"}]))
    tm = GridTaskManager("s", db)
    proposer = Proposer(wf, db, batch=2)
    proposer.step()
    _commit_one(tm, 0)
    proposer.step()  # trial 0 complete, two running
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = export("s", url, db=db)
    study = optuna.load_study(study_name="s", storage=url)
    assert first.added == len(study.trials) == 3 and study.metric_names == ["IC", "IR"]
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "RUNNING", "RUNNING"]
    ids = {t.number: t._trial_id for t in study.trials}
    k = 1
    while not proposer.step():
        while _commit_one(tm, k):
            k += 1
    again = export("s", url, db=db)
    assert (again.added, again.updated, again.trials) == (3, 2, 6)
    assert export("s", url, db=db).added == 0, "an export of an unchanged pool adds nothing"
    study = optuna.load_study(study_name="s", storage=url)
    assert {t.number: t._trial_id for t in study.trials if t.number in ids} == ids, "trial ids stay"
    for doc, trial in zip(TrialStore(db, "s").all(), study.trials, strict=True):
        assert trial.user_attrs[TRIAL_ATTR] == str(doc["number"]) and trial.number == doc["number"]
        assert trial.state.name == "COMPLETE" and trial.values == pytest.approx(doc["value"])
        metrics = _two_metrics(doc["tasks"][0]["qlib_ext"])
        assert trial.values == pytest.approx([metrics["IC"], metrics[Metric.IR]])
        assert trial.params == doc["params"] and trial.distributions == distributions(wf.grid, doc["params"])
        assert len(trial.user_attrs[RUNS_ATTR]) == 1 and trial.user_attrs[RUNS_ATTR][0].startswith("run")
    assert len(study.best_trials) >= 1


def test_grid_pool_exports_one_trial_per_configuration(tmp_path, db):
    from qlib_ext.workflow.expand import expand

    grid = "    params:\n        task.model.kwargs.i: [0, 3, 6]\n        +task.model.kwargs.x: [0.1, 0.9]\n"
    path = write_tiny(tmp_path / "g.yaml", tmp_path, grid, pool="g")
    save_pool_meta(db, "g", PoolMeta(workflow=str(path)))
    tm = GridTaskManager("g", db)
    tm.create_tasks(expand(load_workflow(path)))
    while (claim := tm.claim(60, worker="test:1")) is not None:
        coords = claim.task["def"]["qlib_ext"]["coords"]
        tm.commit(claim, {"run_id": "r", "metrics": {"IC": coords["task.model.kwargs.i"] / 100}})
    url = f"sqlite:///{tmp_path / 'g.db'}"
    assert export("g", url, db=db).trials == 6
    study = optuna.load_study(study_name="g", storage=url)
    assert sorted((t.params["task.model.kwargs.i"], round(t.value, 6)) for t in study.trials) == sorted(
        (i, i / 100) for i in (0, 3, 6) for _ in range(2))
    assert study.direction.name == "MAXIMIZE"
