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
    return home


# Fixture modules live beside this file; tests/ is on sys.path (pytest's rootdir conftest import mode).
pytest_plugins = ["store_fixtures", "data_fixtures"]


def pytest_collection_modifyitems(config, items) -> None:
    """Slow end-to-end tests first, the files with the most of them first (stable otherwise): ``make test``
    spreads test files over two processes (pytest-xdist ``--dist loadfile``, a whole file to one process),
    and starting the longest files first keeps one process from finishing early while the other still has
    a long file ahead of it (test_workflows_run, eight end-to-end runs, used to start last and set the tail)."""
    from collections import Counter

    slow = Counter(item.path for item in items if item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, -slow[item.path]))
