"""Each task run's prepared dataset as an MLflow dataset input (issue 22 §3), on a real sqlite MLflow store."""

from __future__ import annotations

import copy

import mlflow

from qlib_ext.tracking.datasets import changed_since, log_dataset

TASK = {"dataset": {"class": "DatasetH", "module_path": "qlib.data.dataset",
                    "kwargs": {"handler": {"class": "Alpha158", "module_path": "qlib.contrib.data.handler",
                                           "kwargs": {"instruments": "csi300", "start_time": "2020-01-01"}},
                               "segments": {"train": ["2020-01-01", "2020-06-30"]}}}}
DATA = {"calendar_start": "2020-01-02", "calendar_end": "2020-12-31", "days": 243, "instruments": 30}


def _run(client, experiment_id: str, task: dict, data: dict) -> str:
    run_id = client.create_run(experiment_id).info.run_id
    log_dataset(client, run_id, task, "/data/qlib", data)
    return run_id


def test_runs_on_other_data_or_handler_settings_have_other_datasets_and_reproduce_can_tell(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("datasets", artifact_location=str(tmp_path / "art"))
    other_handler = copy.deepcopy(TASK)
    other_handler["dataset"]["kwargs"]["handler"]["kwargs"]["start_time"] = "2019-01-01"
    runs = [_run(client, exp, TASK, DATA), _run(client, exp, TASK, DATA), _run(client, exp, other_handler, DATA),
            _run(client, exp, TASK, {**DATA, "calendar_end": "2021-01-29", "days": 263})]
    seen = {r.info.run_id: r for r in client.search_runs([exp])}
    digests = [seen[r].inputs.dataset_inputs[0].dataset.digest for r in runs]
    assert digests[0] == digests[1] and len({digests[0], digests[2], digests[3]}) == 3
    (first,) = seen[runs[0]].inputs.dataset_inputs
    assert first.dataset.name == "Alpha158 csi300" and first.dataset.source_type == "local"
    assert [t.value for t in first.tags if t.key == "mlflow.data.context"] == ["training"]

    assert changed_since(seen[runs[0]], TASK, "/data/qlib", DATA) is None
    later = {**DATA, "calendar_end": "2021-01-29", "days": 263}
    message = changed_since(seen[runs[0]], TASK, "/data/qlib", later)
    assert message and runs[0] in message and "2020-12-31" in message and "2021-01-29" in message
    assert changed_since(seen[runs[0]], other_handler, "/data/qlib", DATA)  # the handler settings changed
    bare = client.create_run(exp).info.run_id  # a run from before dataset inputs: nothing to compare
    assert changed_since(client.get_run(bare), TASK, "/data/qlib", DATA) is None
