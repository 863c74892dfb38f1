"""Module-level task parts for reliability tests and the chaos benchmark (importable, so they pickle).

A workflow uses them as ``module_path: fixtures`` (``tests/`` on ``PYTHONPATH`` of the workers):
``TinyDataset`` reads nothing, ``ChaosModel`` sleeps, raises or hangs on chosen grid points. Each
``fit`` logs an ``IC`` metric and, when ``$QLIB_EXT_TEST_MARKS`` names a directory, touches
``started-<i>-<pid>`` there so a test can wait until a task is really running.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from qlib.data.dataset import Dataset
from qlib.model.base import Model

MARKS_ENV = "QLIB_EXT_TEST_MARKS"
"""Environment variable naming the directory where ``ChaosModel.fit`` leaves its start marks."""


class TinyDataset(Dataset):
    """A dataset with no data: the grid tasks of these tests are about the queue, not about Qlib."""

    def __init__(self, **kwargs):  # noqa: D107 - Qlib's Dataset calls setup_data with the kwargs
        super().__init__(**kwargs)

    def setup_data(self, **kwargs) -> None:
        pass

    def prepare(self, *args, **kwargs):
        return None


class ChaosModel(Model):
    """Sleeps ``seconds`` in ``fit``; raises on ``fail_on`` points, sleeps forever on ``hang_on`` ones
    (with SIGTERM blocked when ``stubborn``, so only SIGKILL ends it)."""

    def __init__(self, i: int = 0, seconds: float = 0.5, fail_on: list | None = None, hang_on: list | None = None,
                 stubborn: bool = False):
        self.i, self.seconds = i, seconds
        self.fail_on, self.hang_on, self.stubborn = fail_on or [], hang_on or [], stubborn

    def fit(self, dataset: Dataset, reweighter=None) -> None:
        from qlib.workflow import R

        marks = os.environ.get(MARKS_ENV)
        if marks:
            Path(marks, f"started-{self.i}-{os.getpid()}").touch()
        if self.i in self.fail_on:
            raise ValueError(f"poison grid point i={self.i}")
        if self.i in self.hang_on:
            if self.stubborn:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            while True:
                time.sleep(1)
        time.sleep(self.seconds)
        R.log_metrics(IC=self.i / 1000.0)

    def predict(self, dataset: Dataset, segment="test"):
        raise NotImplementedError("ChaosModel has no predictions")


CHAOS_WORKFLOW = """\
qlib_init:
    provider_uri: {provider}
    region: cn
experiment_name: {pool}
task:
    model:
        class: ChaosModel
        module_path: fixtures
        kwargs: {kwargs}
    dataset:
        class: TinyDataset
        module_path: fixtures
        kwargs: {{}}
    record: []
grid:
    pool: {pool}
    params:
        task.model.kwargs.i: {points}
workers:
    max_attempts: {max_attempts}
"""


def write_chaos_workflow(path: Path, provider: Path, n: int, pool: str, max_attempts: int = 3,
                         **model_kwargs) -> Path:
    """Write an ``n``-task grid of ``ChaosModel`` tasks (``i`` = 0..n-1) into ``path``."""
    import json

    kwargs = {"i": 0, "seconds": 0.5, **model_kwargs}
    path.write_text(CHAOS_WORKFLOW.format(provider=provider, pool=pool, kwargs=json.dumps(kwargs),
                                          points=json.dumps(list(range(n))), max_attempts=max_attempts))
    return path


class NaNModel(Model):
    """Fits nothing and predicts NaN for every row of the segment: a result that must never count as done."""

    def fit(self, dataset: Dataset, reweighter=None) -> None:
        pass

    def predict(self, dataset: Dataset, segment="test"):
        import numpy as np
        import pandas as pd

        features = dataset.prepare(segment, col_set="feature")
        return pd.Series(np.nan, index=features.index, dtype=float)


class ProbeModel(Model):
    """Records, as tags of its MLflow run, how the task's own child processes start (the start method a
    ``DataLoader(num_workers=n)`` or a joblib pool gets) and which devices it was given."""

    def fit(self, dataset: Dataset, reweighter=None) -> None:
        import multiprocessing as mp

        from qlib.workflow import R

        ctx = mp.get_context()  # what torch's DataLoader and joblib's multiprocessing backend use
        child = ctx.Process(target=_exit_quietly)
        child.start()
        child.join()
        R.set_tags(**{"probe.start_method": ctx.get_start_method(), "probe.child_exit": str(child.exitcode),
                      "probe.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
                      "probe.omp_num_threads": os.environ.get("OMP_NUM_THREADS", "<unset>"),
                      "probe.pid": str(os.getpid())})

    def predict(self, dataset: Dataset, segment="test"):
        raise NotImplementedError("ProbeModel has no predictions")


def _exit_quietly() -> None:
    pass
