"""Fixtures for tests that need a Qlib-format dataset (owned by the data work).

``synth_provider`` is a small synthetic dataset written once per test session (``shared_dataset_cache``
makes a test's dataset cache the session's one):

* market ``csi300`` (also ``all``): 40 stocks, SH600000.. / SZ000001.. alternating, 4 of them
  listing late; benchmark ``SH000300`` (features only);
* calendar: 400 weekdays, **2015-01-05 .. 2016-07-15**, seed 0 — planted reversal alpha, so
  LightGBM on Alpha158 finds a positive IC (measured 0.13 over 68 test days with a 60/20/20
  split; shuffled-label control 0.005).

Suggested segments (Alpha158 needs ~60 days of history, its label looks 2 days ahead, and a
backtest must end at least one trading day before the calendar does):

* train 2015-03-30 .. 2015-12-04, valid 2015-12-07 .. 2016-03-25, test 2016-03-28 .. 2016-07-13
  (use ``SYNTH_SEGMENTS``; backtest ``end_time`` 2016-07-13 or earlier).
"""

from __future__ import annotations

from pathlib import Path

import pytest

SYNTH_INSTRUMENTS = 40
"""Stocks in the session dataset."""

SYNTH_DAYS = 400
"""Trading days in the session dataset."""

SYNTH_START = "2015-01-05"
"""First calendar day of the session dataset."""

SYNTH_END = "2016-07-15"
"""Last calendar day of the session dataset."""

SYNTH_MARKET = "csi300"
"""Instrument list name of the session dataset."""

SYNTH_SEGMENTS = {
    "train": ("2015-03-30", "2015-12-04"),
    "valid": ("2015-12-07", "2016-03-25"),
    "test": ("2016-03-28", "2016-07-13"),
}
"""Train/valid/test split of the session dataset; test ends two days before the calendar."""


@pytest.fixture(scope="session")
def synth_provider(tmp_path_factory) -> Path:
    """Path of a small synthetic Qlib dataset, written once per session (see module docstring).

    Treat it as read-only: every test in the session shares it.
    """
    from qlib_ext.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth") / "qlib_data"
    write_synthetic(out, instruments=SYNTH_INSTRUMENTS, days=SYNTH_DAYS, start=SYNTH_START, seed=0,
                    market=SYNTH_MARKET)
    return out


@pytest.fixture(scope="session")
def _session_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared_cache")


@pytest.fixture
def shared_dataset_cache(_isolated_home, _session_cache_dir) -> Path:
    """Make this test's ``$QLIB_EXT_HOME/cache`` the session's one dataset cache; return its path.

    For end-to-end tests that do not assert what the cache built: the first test to need a prepared
    Alpha158 dataset, backtest exchange or LightGBM bins builds them, every later one loads them (the
    cache is made for many processes and hosts at once, so tests sharing it is its ordinary use).
    Tests that count what was built (``(2 built)``) keep their own empty cache: do not use this.
    """
    (_isolated_home / "cache").symlink_to(_session_cache_dir, target_is_directory=True)
    return _session_cache_dir


def init_qlib(provider: Path, mlflow_uri: str | None = None, **kwargs) -> None:
    """``qlib.init`` on ``provider`` for region cn, one kernel, quiet, with an sqlite MLflow store.

    Args:
        provider: dataset directory (e.g. ``synth_provider``).
        mlflow_uri: tracking URI for Qlib's recorder; default ``sqlite:///$QLIB_EXT_HOME/mlflow.db``
            (each test has its own home). MLflow 3 refuses Qlib's default ``./mlruns``.
        **kwargs: passed on to ``qlib.init``.

    ``qlib.init`` is process-global: in-process tests should all use the same provider (the
    session fixture), or run Qlib in a child process.
    """
    import logging

    import qlib

    from qlib_ext.defaults import default_mlflow_uri

    uri = mlflow_uri or default_mlflow_uri()
    kwargs.setdefault("kernels", 1)
    kwargs.setdefault("exp_manager", {
        "class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
        "kwargs": {"uri": uri, "default_exp_name": "Experiment"},
    })
    qlib.init(provider_uri=str(provider), region="cn", logging_level=logging.WARNING, **kwargs)


_READ_SCRIPT = """
import logging, sys, pickle
import qlib
from qlib.data import D
provider, market, fields, out = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
qlib.init(provider_uri=provider, region="cn", kernels=1, logging_level=logging.WARNING)
codes = []
for name in market.split("+"):  # upper case: a code; lower case: an instrument list
    codes += [name] if name.isupper() else D.list_instruments(D.instruments(name), as_list=True)
df = D.features(codes, ["$" + f for f in fields], freq="day")
with open(out, "wb") as fh:
    pickle.dump(df, fh)
"""


def qlib_features(provider: Path, instruments: str, fields: list[str], tmp: Path):
    """Read ``fields`` through Qlib's ``D.features`` in a child process (``qlib.init`` is global).

    Args:
        provider: dataset directory.
        instruments: market names (lower case) and codes (upper case) joined by ``+``,
            e.g. ``csi300+SH000300``.
        fields: field names without ``$``.
        tmp: a scratch directory for the result pickle.

    Returns:
        The DataFrame ``D.features`` returned: index (instrument, datetime), columns ``$field``.
    """
    import pickle
    import subprocess
    import sys

    out = Path(tmp) / "features.pkl"
    subprocess.run([sys.executable, "-c", _READ_SCRIPT, str(provider), instruments, ",".join(fields), str(out)],
                   check=True, capture_output=True, timeout=300)
    with open(out, "rb") as fh:
        return pickle.load(fh)
