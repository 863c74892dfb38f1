"""Workers x threads per worker stays within the cores: the arithmetic and what reaches LightGBM."""

from __future__ import annotations

from qlib_ext.worker.settings import auto_threads, limit_threads


def test_auto_threads_never_oversubscribes():
    assert auto_threads(1, cores=8) == 8
    assert auto_threads(2, cores=8) == 4
    assert auto_threads(3, cores=8) == 2
    assert auto_threads(8, cores=2) == 1  # more workers than cores: one thread each, never 0
    for workers in range(1, 10):
        assert workers * auto_threads(workers, cores=8) <= max(8, workers)


def test_lightgbm_gets_num_threads_unless_the_workflow_chose():
    task = {"model": {"class": "LGBModel", "kwargs": {"num_leaves": 16}}}
    assert limit_threads(task, 3)["model"]["kwargs"]["num_threads"] == 3
    chosen = {"model": {"class": "LGBModel", "kwargs": {"num_threads": 7}}}
    assert limit_threads(chosen, 3)["model"]["kwargs"]["num_threads"] == 7
    other = {"model": {"class": "LinearModel", "kwargs": {}}}
    assert "num_threads" not in limit_threads(other, 3)["model"]["kwargs"]
