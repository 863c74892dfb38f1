"""``qlib-ext run`` prints its summary before the grid plots are drawn: a background process draws them into the
grid run (issue 24); with ``QLIB_EXT_GRID_PLOTS=wait`` they are drawn before the summary returns. And the summary
does not wait for idle workers' back-off once the pool is finished."""

from __future__ import annotations

import time

from test_cli_messages import _failed_pool


def _wait_for(condition, seconds: float = 180.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_the_summary_comes_first_and_a_background_process_finishes_the_grid(mongo_url, tmp_path, monkeypatch):
    from qlib_ext.summary import after_workers

    monkeypatch.delenv("QLIB_EXT_GRID_PLOTS")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pool = _failed_pool(mongo_url, uri, "ValueError: boom")
    log = tmp_path / "logs" / "grid_plots.log"
    summary = after_workers(pool, mongo_url=mongo_url, mlflow_uri=uri, metric=None, code=0, plots_log=log)
    assert f"error: all 2 tasks of pool {pool} failed" in summary.text  # the summary itself is unchanged
    assert f"being drawn in the background into the grid run's plots/ (log: {log})" in summary.text
    assert f"qlib-ext report {pool} draws them too" in summary.text
    # the detached process reaches the store from its environment (no URL on its command line) and ends
    assert _wait_for(lambda: log.exists() and f"grid plots: pool {pool}: drawn" in log.read_text()), (
        log.read_text() if log.exists() else "no log")
    assert "summary not updated" not in log.read_text()


def test_waiting_draws_them_before_the_summary_returns(mongo_url, tmp_path):
    from qlib_ext.session.grid_plots import in_background
    from qlib_ext.summary import after_workers

    assert not in_background()  # tests/conftest.py sets QLIB_EXT_GRID_PLOTS=wait
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pool = _failed_pool(mongo_url, uri, "ValueError: boom")
    summary = after_workers(pool, mongo_url=mongo_url, mlflow_uri=uri, metric=None, code=0)
    assert "in the background" not in summary.text and f"qlib-ext report {pool}" in summary.text


def _idle_worker() -> None:
    """Stands in for a worker in its idle back-off: sleeps until a signal ends it."""
    time.sleep(600)


def test_a_finished_pool_ends_the_workers_still_polling_it(mongo_url):
    import multiprocessing as mp
    import uuid

    from qlib_ext.worker.group import WorkerGroup, _finish_when_done
    from qlib_ext.worker.settings import WorkerSettings

    settings = WorkerSettings(pool=f"done_{uuid.uuid4().hex[:8]}", mongo_url=mongo_url, mlflow_uri="sqlite://",
                              provider_uri="/x")  # a pool with nothing waiting or running
    ctx = mp.get_context("spawn")
    done, idle = ctx.Process(target=time.sleep, args=(0,)), ctx.Process(target=_idle_worker)
    group = WorkerGroup(settings, 2)
    group.procs = [done, idle]
    for p in group.procs:
        p.start()
    try:
        done.join(120)
        _finish_when_done(group)  # one worker ended cleanly and the pool is finished: the other is told to end
        idle.join(120)
        assert not idle.is_alive() and group.finishing and group.exit_code() == 0
    finally:
        for p in group.procs:
            if p.is_alive():
                p.kill()
