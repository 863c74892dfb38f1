"""The task record (qlib_ext/pool/record.py): the qlib_ext block's round trip leaves tasks unchanged,
and no document field of ours is one Qlib would unpickle."""

from __future__ import annotations

import bson
import pytest
from test_config import write_yaml

from qlib_ext.pool.database import load_pool_meta, open_db, save_pool_meta, update_pool_meta
from qlib_ext.pool.manager import task_hash
from qlib_ext.pool.record import META, Doc, PoolMeta, TaskMeta, check_field_names, doc_fields
from qlib_ext.worker.follow_up import backtest_tasks
from qlib_ext.workflow.expand import expand
from qlib_ext.workflow.load import load_workflow

GRID = """
grid:
    params: {task.model.kwargs.learning_rate: [0.05, 0.1]}
    strategies: {topk: [20, 50]}
    train_once: %s
"""


@pytest.mark.parametrize("train_once", ["true", "false"])
def test_every_expanded_block_round_trips_unchanged(tmp_path, train_once):
    tasks = expand(load_workflow(write_yaml(tmp_path, GRID % train_once)))
    follow = [bt for t in tasks for bt in backtest_tasks(t, "run1", "task1")]
    assert len(follow) == (4 if train_once == "true" else 0)
    for task in tasks + follow:
        meta = TaskMeta.of(task)
        again = {**task, META: meta.to_dict()}
        assert again == task and list(again[META]) == list(task[META]) and task_hash(again) == task_hash(task)
        bson.encode(again)
    assert all(TaskMeta.of(bt).is_backtest and TaskMeta.of(bt).parent_run_id == "run1" for bt in follow)


def test_a_partial_block_keeps_its_keys_and_unknown_ones():
    block = {"run_name": "r", "coords": {"a": 1}, "trial": 7}
    meta = TaskMeta.from_dict(block)
    assert meta.run_name == "r" and meta.extra == {"trial": 7} and meta.to_dict() == block
    assert TaskMeta.of({}).to_dict() == {}
    new = TaskMeta(pool="p", kind="backtest").to_dict()  # a new block: the always-present keys, then those set
    assert list(new)[:2] == ["pool", "experiment"] and new["coords"] == {} and new["kind"] == "backtest"
    assert "parent_run_id" not in new


def test_no_field_of_ours_starts_with_def_or_res():
    fields = doc_fields()
    assert Doc.OUTCOME in fields and Doc.LEGACY_RESULT in fields
    check_field_names([f for f in fields if f != Doc.LEGACY_RESULT])
    with pytest.raises(ValueError, match="result"):
        check_field_names([Doc.LEGACY_RESULT])


def test_pool_meta_round_trips_the_stored_document():
    stored = {"_id": "p", "workflow": "/w.yaml", "experiment": "e", "search_until": None, "doc_format": 2,
              "from_a_later_version": 1}
    meta = PoolMeta.from_dict(stored)
    assert meta.pool == "p" and meta.region == "cn" and meta.doc_format == 2 and meta.qlib_init == {}
    assert meta.to_dict() == {k: v for k, v in stored.items() if k != "_id"}
    new = PoolMeta(workflow="/w.yaml", experiment="e").to_dict()  # a submit's record: every submit field
    assert list(new) == list(PoolMeta._ALWAYS) and "search" not in new and "doc_format" not in new
    assert PoolMeta(search=PoolMeta.search_block("tpe", 9)).search_trials == 9


@pytest.mark.parametrize("record", [PoolMeta, TaskMeta])
def test_field_constants_name_every_stored_field(record):
    constants = {v for k, v in vars(record.Field).items() if k.isupper()}
    assert constants == set(record.stored_fields())


def test_pool_meta_is_saved_loaded_and_updated_by_field(mongo_url, task_db_name):
    db = open_db(mongo_url, task_db_name)
    save_pool_meta(db, "p", PoolMeta(workflow="/w.yaml", experiment="e", mlflow_uri="sqlite:///x.db"))
    update_pool_meta(db, "p", search_until=None, search_owner="h:1")
    meta = load_pool_meta(db, "p")
    assert (meta.pool, meta.experiment, meta.search_owner, meta.doc_format) == ("p", "e", "h:1", 1)
    with pytest.raises(ValueError, match="search_untill"):
        update_pool_meta(db, "p", search_untill=None)
