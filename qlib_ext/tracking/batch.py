"""A model's per-round metrics written to MLflow in one batch instead of one transaction each.

Qlib's models log their training curve from inside ``fit``: ``LGBModel`` calls ``R.log_metrics`` once per boosting
round and loss (about 120 calls for 100 rounds with early stopping), the PyTorch models once per epoch and metric.
Each call is one ``MlflowClient.log_metric``: one HTTP request or one sqlite transaction. Measured on a 24-trial
LightGBM search, those calls cost more CPU than the fits themselves (``docs/performance.md``).

:func:`batched_metrics` collects those calls while ``fit`` runs (same keys, values, steps and timestamps) and writes
them with ``MlflowClient.log_batch``, so the curve in MLflow is the one Qlib logs, in a handful of requests.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000
"""Metrics per ``log_batch`` request: MLflow's own limit for one request, count."""


class MetricBuffer:
    """Stands in for a Qlib recorder's ``log_metrics`` while a model fits: remembers every call."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, int, int]] = []

    def __call__(self, step: int | None = None, **kwargs: Any) -> None:
        stamp = int(time.time() * 1000)
        for key, value in kwargs.items():
            self.rows.append((key, float(value), stamp, int(step or 0)))


@contextlib.contextmanager
def batched_metrics(recorder: Any) -> Iterator[MetricBuffer]:
    """Buffer every ``log_metrics`` call made on ``recorder`` (Qlib's active ``MLflowRecorder``) inside the block,
    then write them in batches of :data:`BATCH_SIZE`, also when the block raises (a failed fit keeps its curve).

    ``R.log_metrics`` and ``R.get_recorder().log_metrics`` both reach this recorder object, so every model that logs
    through Qlib's recorder is covered. A value that is not a number makes the buffer hand that call to the
    recorder's own method, as without this block.
    """
    buffer = MetricBuffer()
    own = recorder.log_metrics

    def log_metrics(step: int | None = None, **kwargs: Any) -> None:
        try:
            buffer(step, **kwargs)
        except (TypeError, ValueError):  # not a number: the recorder's own call says what MLflow makes of it
            own(step=step, **kwargs)

    recorder.log_metrics = log_metrics  # an instance attribute shadows the class's (async) method
    try:
        yield buffer
    finally:
        del recorder.log_metrics
        write_batches(recorder.client, recorder.id, buffer.rows)


def write_batches(client: Any, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
    """Write ``(key, value, timestamp_ms, step)`` rows to the run ``run_id`` with ``client.log_batch``."""
    from mlflow.entities import Metric

    for start in range(0, len(rows), BATCH_SIZE):
        chunk = rows[start:start + BATCH_SIZE]
        client.log_batch(run_id, metrics=[Metric(key, value, stamp, step) for key, value, stamp, step in chunk],
                         synchronous=True)
    if rows:
        logger.debug("tracking: run %s: %d training-curve metrics in %d batch(es)", run_id, len(rows),
                     -(-len(rows) // BATCH_SIZE))
