"""The prepared dataset of a task as an MLflow dataset input: which data and handler settings a run used.

Each task run gets one dataset input (``client.log_inputs``), logged when its run is opened
(:func:`qlib_ext.worker.attempt.open_run`); nothing of the data is uploaded. Its *name* is the handler and its
instruments (``Alpha158 csi300``), its *digest* a hash of the task's ``dataset`` config (handler kwargs,
segments) and of the data's identity (:func:`qlib_ext.worker.settings.data_identity`: calendar range,
instrument count), its *source* the Qlib data directory and its *profile* that identity. So the runs table's
Datasets column tells runs on other data or handler settings apart, and ``qlib-ext reproduce`` can say that
the data changed since a run (:func:`changed_since`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

CONTEXT = "training"
"""MLflow's ``mlflow.data.context`` input tag of the dataset (what the UI groups inputs by)."""

def describe(task: dict) -> str:
    """The dataset's name: handler class and instruments (``Alpha158 csi300``)."""
    handler = ((task.get("dataset") or {}).get("kwargs") or {}).get("handler") or {}
    if not isinstance(handler, dict):
        return str(handler)[:200]
    instruments = (handler.get("kwargs") or {}).get("instruments")
    name = str(handler.get("class") or "dataset")
    return f"{name} {instruments}" if isinstance(instruments, str) else name


def digest(task: dict, identity: dict) -> str:
    """12 hex digits of sha256 over the task's ``dataset`` config and the data identity."""
    payload = json.dumps({"dataset": task.get("dataset"), "data": identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def dataset_input(task: dict, provider_uri: str, identity: dict) -> Any:
    """The MLflow ``DatasetInput`` of ``task`` on the data at ``provider_uri`` whose identity is ``identity``
    (no data)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=describe(task), digest=digest(task, identity), source_type="local",
                      source=json.dumps({"uri": provider_uri}), profile=json.dumps(identity, default=str))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", CONTEXT)])


def log_dataset(client: Any, run_id: str, task: dict, provider_uri: str, identity: dict) -> None:
    """Log ``task``'s dataset input on ``run_id``; a failure is a warning (the run is still the task's run)."""
    if "dataset" not in task:
        return
    try:
        client.log_inputs(run_id, datasets=[dataset_input(task, provider_uri, identity)])
    except Exception as e:  # noqa: BLE001 - the Datasets column is worth less than the task
        logger.warning("tracking: run %s: could not log its dataset input (%s)", run_id, e)


def changed_since(run: Any, task: dict, provider_uri: str, identity: dict) -> str | None:
    """What changed in the data or handler settings since ``run`` (an MLflow run with its dataset input) for
    ``task`` on the data at ``provider_uri`` (identity ``identity``), or None if nothing did or the run logged
    no dataset."""
    logged = [d.dataset for d in (run.inputs.dataset_inputs if run.inputs else []) or []]
    if not logged:
        return None
    if logged[0].digest == digest(task, identity):
        return None
    try:
        then = json.loads(logged[0].profile or "{}")
    except ValueError:
        then = {}
    return (f"run {run.info.run_id} used dataset {logged[0].name!r} digest {logged[0].digest}; the same task on "
            f"{provider_uri} now has digest {digest(task, identity)} (data then: {_brief(then)}; now: "
            f"{_brief(identity)})")


def _brief(identity: dict) -> str:
    return (f"calendar {identity.get('calendar_start')}..{identity.get('calendar_end')}, "
            f"{identity.get('instruments')} instruments")
