"""What drove the result: Optuna's fANOVA and PED-ANOVA over a pool's configurations, checked on a planted
case (one axis that matters, one that does not), built directly (fast) and through a real store."""

from __future__ import annotations

import random

import pytest
from test_search import write_tiny

from qlib_ext.analysis.importance import (
    FANOVA,
    PED_ANOVA,
    Point,
    format_importance,
    importance,
    metrics_of,
    pool_importance,
)
from qlib_ext.pool.manager import GridTaskManager, open_db
from qlib_ext.workflow.load import load_workflow


def _planted(n: int = 24, seed: int = 0, window: int | None = None, swap: bool = False) -> list[Point]:
    """``lr`` drives the objective, ``leaves`` is noise (swapped when ``swap``)."""
    rng = random.Random(seed)
    points = []
    for k in range(n):
        lr, leaves = rng.choice([0.01, 0.03, 0.1, 0.3]), rng.choice([8, 16, 32, 64, 128])
        driver = leaves / 128 if swap else lr
        points.append(Point({"lr": lr, "leaves": leaves}, [driver + rng.gauss(0, 0.002)], f"c{k}", window))
    return points


def test_planted_axis_dominates_both_evaluators():
    imp = importance(_planted(), [("IC", "max")])
    fan, ped = imp.shares["IC"][FANOVA], imp.shares["IC"][PED_ANOVA]
    assert fan["lr"] > 0.8 and fan["leaves"] < 0.2, fan
    assert ped["lr"] > ped["leaves"], ped
    # the direction does not change which axis matters (PED-ANOVA looks at the other end of the range)
    assert importance(_planted(), [("IC", "min")]).shares["IC"][PED_ANOVA]["lr"] > 0.5
    text = format_importance(imp, {"lr": "learning_rate"})
    assert "learning_rate" in text and "IC fanova" in text and "over 24 configurations" in text
    assert metrics_of(imp)["importance.fanova.IC.lr"] == pytest.approx(fan["lr"])


def test_too_few_configurations_say_so():
    imp = importance(_planted(n=5), [("IC", "max")])
    assert not imp.shares and "needs 8 finished configurations" in imp.note
    assert format_importance(imp).startswith("importances: not computed (needs 8")


def test_walk_forward_windows_that_disagree_are_shown_per_window():
    points = _planted(window=0) + [Point(p.params, p.values, p.config, 1) for p in _planted(window=1, swap=True)]
    for p in points[24:]:  # the same configurations in window 1, driven there by leaves
        p.values = [p.params["leaves"] / 128]
    imp = importance(points, [("IC", "max")])
    assert imp.disagree and imp.windows[0]["lr"] > 0.8 and imp.windows[1]["leaves"] > 0.8
    assert "windows disagree on what drove IC" in format_importance(imp)
    agree = importance(_planted(window=0) + _planted(window=1), [("IC", "max")])
    assert not agree.disagree and "windows disagree" not in format_importance(agree)


def test_several_objectives_get_one_column_each_and_the_front():
    points = _planted()
    for p in points:
        p.values = [p.values[0], -p.params["leaves"] / 128]
    imp = importance(points, [("IC", "max"), ("max_dd", "max")])
    assert imp.shares["IC"][FANOVA]["lr"] > 0.8 and imp.shares["max_dd"][FANOVA]["leaves"] > 0.8
    assert set(imp.front) == {"lr", "leaves"}


GRID = """\
    params:
        task.model.kwargs.i: [0, 3, 6, 9]
        +task.model.kwargs.x: [0.1, 0.5, 0.9]
"""


def test_pool_importance_reads_a_real_store(tmp_path, mongo_url, task_db_name):
    """A grid pool in the real store (expanded and submitted as `qlib-ext submit` does; an in-process stand-in
    commits IC = i / 100, x adding only noise): the importances name i, not x."""
    from qlib_ext.workflow.expand import expand

    wf = load_workflow(write_tiny(tmp_path / "g.yaml", tmp_path, GRID, pool="imp"))
    tm = GridTaskManager("imp", open_db(mongo_url, task_db_name))
    assert tm.create_tasks(expand(wf)) == (12, 12)
    while (claim := tm.claim(60, worker="test:1")) is not None:
        coords = claim.task["def"]["qlib_ext"]["coords"]
        value = coords["task.model.kwargs.i"] / 100 + 0.001 * coords["task.model.kwargs.x"]
        tm.commit(claim, {"run_id": None, "metrics": {"IC": value}})
    imp = pool_importance("imp", [("IC", "max")], mongo_url=mongo_url, db_name=task_db_name)
    assert imp.configurations == 12
    fan = imp.shares["IC"][FANOVA]
    assert fan["task.model.kwargs.i"] > 0.8 > fan["task.model.kwargs.x"], fan
