"""Qlib's own rolling set-up through Qlib's own ``RollingGen`` on a real calendar: the label
``Ref($close, -(h+1)) / Ref($close, -1) - 1`` with ``trunc_days = h + 1`` (``qlib.contrib.rolling``) is
not a leak; one trading day less is."""

from __future__ import annotations

import copy

import pytest
from data_fixtures import SYNTH_SEGMENTS, init_qlib

from qlib_ext.analysis import flags as fl
from qlib_ext.analysis.series import label_gap


def _task(h: int) -> dict:
    handler = {"class": "Alpha158", "module_path": "qlib.contrib.data.handler",
               "kwargs": {"label": [f"Ref($close, -{h + 1}) / Ref($close, -1) - 1"]}}
    return {"model": {}, "dataset": {"class": "DatasetH", "module_path": "qlib.data.dataset",
                                     "kwargs": {"handler": handler, "segments": _segments()}}}


def _segments() -> dict:
    # the test ends well before the calendar: Qlib's RollingGen compares a None start one step past its end
    return {**copy.deepcopy(SYNTH_SEGMENTS), "test": ("2016-03-28", "2016-06-01")}


@pytest.mark.parametrize("h", [1, 20])
def test_qlib_rolling_gen_with_trunc_days_h_plus_1_does_not_flag(synth_provider, h):
    init_qlib(synth_provider)
    from qlib.workflow.task.gen import RollingGen, task_generator

    def flags(trunc_days: int) -> list[list[str]]:
        tasks = task_generator(_task(h), RollingGen(step=20, trunc_days=trunc_days))
        assert len(tasks) >= 2
        return [fl.run_flags(label_gap(t), {}, rolling=True) for t in tasks]

    assert all(fl.LABEL_LEAK not in f for f in flags(h + 1)), "Qlib's own set-up reads at most the first test close"
    assert all(fl.LABEL_LEAK in f for f in flags(h)), "one day less reads the close after the first test day"
    gaps = {label_gap(t)["label_gap_days"] for t in task_generator(_task(h), RollingGen(step=20, trunc_days=h + 1))}
    assert gaps == {h + 1}
