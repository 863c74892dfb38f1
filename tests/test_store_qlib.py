"""Qlib's own TaskManager, unmodified, against the store (or a real MongoDB)."""

from __future__ import annotations

import pytest

qlib = pytest.importorskip("qlib")


@pytest.fixture
def task_manager(mongo_url, task_db_name, tmp_path):
    from qlib.config import C

    C["mongo"] = {"task_url": mongo_url, "task_db_name": task_db_name}
    from qlib.workflow.task.manage import TaskManager

    return TaskManager("pool")


def _tasks(n: int) -> list[dict]:
    return [{"model": {"class": "LGBModel", "kwargs": {"lr": 0.01 * i}}, "seed": i} for i in range(n)]


def test_create_task_dedups_on_resubmit(task_manager):
    ids = task_manager.create_task(_tasks(5))
    again = task_manager.create_task(_tasks(6))
    assert again[:5] == ids
    assert len(set(again)) == 6
    assert task_manager.task_stat() == {"waiting": 6}


def test_fetch_commit_stat_reset_prioritize(task_manager):
    task_manager.create_task(_tasks(4))
    first = task_manager.fetch_task()
    assert first["status"] == "running" and first["def"]["seed"] == 0
    task_manager.commit_task_res(first, {"ic": 0.1})
    assert task_manager.re_query(str(first["_id"]))["res"] == {"ic": 0.1}
    second = task_manager.fetch_task()
    assert task_manager.task_stat() == {"done": 1, "running": 1, "waiting": 2}
    task_manager.reset_waiting()
    assert task_manager.task_stat() == {"done": 1, "waiting": 3}
    last = next(t for t in task_manager.query({"status": "waiting"}) if t["def"]["seed"] == 3)
    task_manager.prioritize(last, 5)
    assert task_manager.fetch_task()["def"]["seed"] == 3  # highest priority first
    assert task_manager.fetch_task()["_id"] == second["_id"]  # then insertion order
