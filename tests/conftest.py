"""Shared fixtures: every test gets its own qlib-ext home so nothing leaks between tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "qlib-ext-home"
    home.mkdir()
    monkeypatch.setenv("QLIB_EXT_HOME", str(home))
    # mlflow.set_tracking_uri (called by Qlib's recorder in in-process tests) also sets this variable,
    # which `qlib-ext --mlflow-uri` reads: without the reset, a later test's workers log to a dead DB.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # `qlib-ext run` draws the grid plots in a background process that would outlive the test (and its store):
    # tests wait for them; tests/test_grid_plots_later.py checks the background process
    monkeypatch.setenv("QLIB_EXT_GRID_PLOTS", "wait")
    return home


# Fixture modules live beside this file; tests/ is on sys.path (pytest's rootdir conftest import mode).
pytest_plugins = ["store_fixtures", "data_fixtures"]


SLOW_FILE_SECONDS = {
    "test_workflows_run.py": 450, "test_grid_e2e.py": 190, "test_reliability.py": 190,
    # three hosts: 182 s quiet before MLflow logins, 505-532 s with them checking scrypt per request (CI, load 3-5),
    # after the login cache 90 s at load 2-3 (509 s at load 15-16)
    "test_multihost.py": 95,
    "test_launch_slurm.py": 120, "test_worker_processes.py": 120, "test_warm.py": 100, "test_validity_e2e.py": 90,
    "test_train_once.py": 80, "test_api.py": 75, "test_ui_browser.py": 70, "test_search_e2e.py": 70,
    "test_leaderboard_rolling.py": 65, "test_qlib_tools.py": 60, "test_dashboard_browser.py": 60,
    # benchmarks: 227 s at load 1-3 (shared cache); qlib_pools at load 12-16 with its two slow tests (TrainerRM's,
    # DelayTrainerRM's), estimated quiet
    "test_qlib_benchmarks.py": 230, "test_qlib_pools.py": 200,
    "test_artifact_trust.py": 120, "test_mlflow_server_auth.py": 41,  # trust: estimate; server auth: 41 s at load 3
}
"""Seconds each long test file took in ``make test`` (2026-12-03, quiet 2-core machine); a slow file not listed
counts 30 s per slow test. Only the order of the files depends on it, never a result."""


def pytest_collection_modifyitems(config, items) -> None:
    """Slow end-to-end files first, the longest first (stable otherwise): ``make test`` spreads test files over
    worker processes (pytest-xdist ``--dist loadfile``, a whole file to one process), and starting the longest
    files first (longest-processing-time order) keeps one process from finishing early while another still has
    a long file ahead of it."""
    from collections import Counter

    slow = Counter(item.path for item in items if item.get_closest_marker("slow") is not None)

    def cost(item: pytest.Item) -> float:
        return SLOW_FILE_SECONDS.get(item.path.name, 30.0 * slow[item.path])

    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, -cost(item)))
