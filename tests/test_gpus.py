"""What each worker is given when a pool runs on GPUs (qlib_ext/worker/gpus.py): the device of each slot, the
flag's parsing, and status naming a running task's device (a real store)."""

from __future__ import annotations

import pytest

from qlib_ext.errors import ConfigError
from qlib_ext.worker import gpus


def test_one_device_per_worker_by_default_and_several_when_asked():
    assert gpus.slots(("0", "1", "2", "3"), 1, 4) == ["0", "1", "2", "3"]
    assert gpus.slots(("0", "1"), 2, 4) == ["0", "0", "1", "1"]
    assert gpus.slots(("2", "3"), 1, 1) == ["2"]
    assert gpus.slots((), 1, 3) == [None, None, None]  # no GPUs: nothing changes
    with pytest.raises(ConfigError, match=r"3 workers but gpus 0,1 x workers_per_gpu 1 give 2 places; pass -n 2 or "
                                          r"fewer, or --workers-per-gpu 2"):
        gpus.slots(("0", "1"), 1, 3)
    assert gpus.default_workers(("0", "1"), 3) == 6 and gpus.default_workers((), 1) is None


def test_gpus_flag_and_yaml_values(monkeypatch):
    assert gpus.parse("0,1,2,3") == ("0", "1", "2", "3") and gpus.parse([0, 2]) == ("0", "2")
    assert gpus.parse(None) == () and gpus.parse("") == ()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert gpus.parse("all") == ("1", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="--gpus: 'all' but no GPU found"):
        gpus.parse("all")
    for bad in ("0,x", "0,0", "-1", [1.5]):
        with pytest.raises(ConfigError, match="expected distinct device ids such as 0,1,2,3, or 'all'"):
            gpus.parse(bad, "workers.gpus")


def test_a_worker_sees_only_its_device(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    gpus.isolate("2", ("0", "2"))
    assert (gpus.os.environ["CUDA_VISIBLE_DEVICES"], gpus.os.environ["CUDA_DEVICE_ORDER"]) == ("2", "PCI_BUS_ID")
    gpus.isolate(None, ("0", "2"))  # a worker without a device in a GPU group sees none
    assert gpus.os.environ["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    gpus.isolate(None, ())  # no GPUs configured: as today
    assert gpus.os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert (gpus.label("2", ("2",)), gpus.label(None, ("2",)), gpus.label(None, ())) == ("cuda:2", "cpu", None)


def test_status_shows_each_running_tasks_device(mongo_url):
    import uuid

    import pymongo

    from qlib_ext.defaults import TASK_DB_NAME
    from qlib_ext.pool.manager import GridTaskManager
    from qlib_ext.pool.progress import status_report

    pool = f"devices_{uuid.uuid4().hex[:8]}"
    client = pymongo.MongoClient(mongo_url)
    try:
        tm = GridTaskManager(pool, client[TASK_DB_NAME])
        tm.create_tasks([{"model": {"class": "M", "module_path": "m", "kwargs": {"i": i}},
                          "qlib_ext": {"pool": pool, "run_name": f"t{i}"}} for i in range(2)])
        tm.claim(worker="gpuhost:11", device="cuda:3")
        tm.claim(worker="gpuhost:12")
        report = status_report(pool, mongo_url)
    finally:
        client[TASK_DB_NAME].drop_collection(pool)
        client.close()
    assert "gpuhost:11  cuda:3  attempt 1" in report and "gpuhost:12  attempt 1" in report, report
