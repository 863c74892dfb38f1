"""The shared dataset cache on real Qlib and the synthetic dataset: keys, locking, corruption."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from data_fixtures import SYNTH_SEGMENTS, init_qlib

from qlib_ext.cache import datasets as cache

FEW = ["SH600000", "SZ000001", "SH600001", "SZ000002"]
"""A few instruments: Alpha158 on them builds in about a second, so tests can afford rebuilds."""


def dataset_config(instruments: object = FEW, **handler_kwargs) -> dict:
    """A task's ``dataset`` block: Alpha158 over the synthetic calendar, the suggested segments."""
    kwargs = {"start_time": "2015-01-05", "end_time": "2016-07-15", "fit_start_time": "2015-03-30",
              "fit_end_time": "2015-12-04", "instruments": instruments, **handler_kwargs}
    return {"class": "DatasetH", "module_path": "qlib.data.dataset",
            "kwargs": {"handler": {"class": "Alpha158", "module_path": "qlib.contrib.data.handler", "kwargs": kwargs},
                       "segments": dict(SYNTH_SEGMENTS)}}


@pytest.fixture
def qlib_synth(synth_provider):
    init_qlib(synth_provider)
    cache.stats.clear()
    return synth_provider


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.json"))


# --------------------------------------------------------------------------- in-process
def test_same_key_loads_instead_of_rebuilding(qlib_synth, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qlib_ext.cache")
    cache.prepared_dataset(dataset_config(), tmp_path)
    cache.prepared_dataset(dataset_config(), tmp_path)
    assert cache.stats["built"] == 1 and cache.stats["loaded"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("cache: built ") for m in messages) == 1
    assert sum(m.startswith("cache: loaded ") for m in messages) == 1
    assert len(_entries(tmp_path)) == 1


def test_loaded_dataset_prepares_the_same_frames_as_uncached(qlib_synth, tmp_path):
    from qlib.data.dataset import Dataset
    from qlib.data.dataset.handler import DataHandlerLP
    from qlib.utils import init_instance_by_config

    config = dataset_config(instruments="csi300")
    uncached = init_instance_by_config(dataset_config(instruments="csi300"), accept_types=Dataset)
    cache.prepared_dataset(config, tmp_path)
    loaded = cache.prepared_dataset(config, tmp_path)
    assert cache.stats["loaded"] == 1
    assert config == dataset_config(instruments="csi300")  # the task's config is not mutated
    pd.testing.assert_frame_equal(loaded.prepare("test"), uncached.prepare("test"))
    train = {"segments": "train", "col_set": ["feature", "label"], "data_key": DataHandlerLP.DK_L}
    pd.testing.assert_frame_equal(loaded.prepare(**train), uncached.prepare(**train))
    assert not loaded.prepare("test").empty


def test_other_segments_share_the_entry(qlib_synth, tmp_path):
    cache.prepared_dataset(dataset_config(), tmp_path)
    config = dataset_config()
    config["kwargs"]["segments"]["test"] = ("2016-05-02", "2016-07-13")
    dataset = cache.prepared_dataset(config, tmp_path)
    assert cache.stats["built"] == 1 and cache.stats["loaded"] == 1
    assert dataset.prepare("test").index.get_level_values("datetime").min() == pd.Timestamp("2016-05-02")


@pytest.mark.parametrize("change", [{"fit_end_time": "2015-11-27"}, {"instruments": FEW[:3]},
                                    {"infer_processors": [{"class": "Fillna", "kwargs": {"fields_group": "feature"}}]}])
def test_changed_handler_config_rebuilds(qlib_synth, tmp_path, change):
    cache.prepared_dataset(dataset_config(), tmp_path)
    cache.prepared_dataset(dataset_config(**change), tmp_path)
    assert cache.stats["built"] == 2 and cache.stats["loaded"] == 0
    assert len(_entries(tmp_path)) == 2


def test_key_ignores_dict_order_and_date_types(qlib_synth):
    import datetime

    config = dataset_config()["kwargs"]["handler"]
    reordered = {"kwargs": dict(reversed(config["kwargs"].items())), "module_path": config["module_path"],
                 "class": config["class"]}
    assert cache.cache_key(reordered) == cache.cache_key(config)
    dated = dataset_config(start_time=datetime.date(2015, 1, 5))["kwargs"]["handler"]
    assert cache.cache_key(dated) == cache.cache_key(config)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar", "bad_sidecar"])
def test_damaged_entry_is_rebuilt_never_used(qlib_synth, tmp_path, caplog, damage):
    first = cache.prepared_dataset(dataset_config(), tmp_path).prepare("test")
    (meta,) = _entries(tmp_path)
    data = meta.with_suffix(".bin")
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "no_sidecar":
        meta.unlink()
    else:
        meta.write_text("{not json")
    caplog.set_level(logging.WARNING, logger="qlib_ext.cache")
    again = cache.prepared_dataset(dataset_config(), tmp_path)
    assert cache.stats["built"] == 2 and cache.stats["loaded"] == 0
    if damage in ("truncate", "flip"):
        assert cache.stats["rebuilt_corrupt"] == 1
        assert any("unusable" in r.getMessage() for r in caplog.records)
    pd.testing.assert_frame_equal(again.prepare("test"), first)
    cache.prepared_dataset(dataset_config(), tmp_path)  # the rebuilt entry is good again
    assert cache.stats["loaded"] == 1


def test_uncacheable_configs_pass_through(qlib_synth, tmp_path):
    from qlib.data.dataset.handler import DataHandler
    from qlib.utils import init_instance_by_config

    handler = init_instance_by_config(dataset_config()["kwargs"]["handler"], accept_types=DataHandler)
    pkl = tmp_path / "handler.pkl"
    handler.to_pickle(pkl, dump_all=True)
    config = dataset_config()
    config["kwargs"]["handler"] = f"file://{pkl}"
    cache_dir = tmp_path / "cache"
    dataset = cache.prepared_dataset(config, cache_dir)
    assert cache.stats["uncached"] == 1 and cache.stats["built"] == 0
    assert not cache_dir.exists() or not _entries(cache_dir)
    assert not dataset.prepare("test").empty


# --------------------------------------------------------------------------- across processes
def _child(provider: str, cache_dir: str, out: str, barrier=None, changes: tuple[str, ...] = ("",)) -> None:
    """Spawned child: init Qlib on ``provider``, get the dataset through the cache, record stats.

    ``changes``: one cache lookup per item, each after that change to the data ("" none, "touch" a
    newer mtime, "append" one more day); ``out`` gets the list of each lookup's stats.
    """
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from data_fixtures import init_qlib as init

    init(Path(provider), mlflow_uri=f"sqlite:///{Path(out).parent / 'mlflow.db'}")
    if barrier is not None:
        barrier.wait(timeout=120)
    results = []
    for change in changes:
        _change_data(Path(provider), change)
        cache.stats.clear()
        rows = len(cache.prepared_dataset(dataset_config(), cache_dir).prepare("test"))
        results.append({**cache.stats, "rows": rows})
    Path(out).write_text(json.dumps(results if len(changes) > 1 else results[0]))


def _change_data(provider: Path, change: str) -> None:
    feature = provider / "features" / FEW[0].lower() / "close.day.bin"
    if change == "touch":
        st = feature.stat()
        os.utime(feature, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "append":  # one more day of data: size changes too
        with open(feature, "ab") as fh:
            fh.write(b"\0\0\x80\x3f")


def _run_children(args: list[tuple], barrier=None) -> list:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(*a[:3], barrier, *a[3:])) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    return [json.loads(Path(a[2]).read_text()) for a in args]


@pytest.mark.slow
def test_concurrent_first_use_builds_once(synth_provider, tmp_path):
    # Two processes meet at a barrier and ask at once: one builds, the other waits on the lock and loads.
    barrier = mp.get_context("spawn").Barrier(2)
    cache_dir = tmp_path / "cache"
    results = _run_children([(str(synth_provider), str(cache_dir), str(tmp_path / f"out{i}.json"))
                             for i in range(2)], barrier)
    assert sum(r.get("built", 0) for r in results) == 1
    assert sum(r.get("loaded", 0) for r in results) == 1
    assert len({r["rows"] for r in results}) == 1 and results[0]["rows"] > 0
    assert len(_entries(cache_dir)) == 1


@pytest.mark.slow
def test_changed_data_rebuilds(synth_provider, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_provider, data)  # never modify the session dataset
    cache_dir = str(tmp_path / "cache")
    # A first process builds; a second one finds the same key (nothing process-bound in it), then the
    # data changes under it twice, and each change is a new key.
    (first,) = _run_children([(str(data), cache_dir, str(tmp_path / "first.json"))])
    assert first.get("built") == 1
    (later,) = _run_children([(str(data), cache_dir, str(tmp_path / "later.json"), ("", "touch", "append"))])
    same, touched, appended = later
    assert same.get("loaded") == 1 and not same.get("built")
    assert touched.get("built") == 1 and appended.get("built") == 1
    assert len(_entries(Path(cache_dir))) == 3


def test_writes_to_a_loaded_frame_stay_private(qlib_synth, tmp_path):
    cache.prepared_dataset(dataset_config(), tmp_path)
    handler = cache.prepared_dataset(dataset_config(), tmp_path).handler
    original = float(handler._learn.iloc[0, 0])
    handler._learn.iloc[0, 0] = original + 99.0  # copy-on-write mapping: the file never changes
    again = cache.prepared_dataset(dataset_config(), tmp_path).handler
    assert float(again._learn.iloc[0, 0]) == original
    assert cache.stats["loaded"] == 2 and cache.stats["rebuilt_corrupt"] == 0


def test_cli_ls_and_clear(qlib_synth, tmp_path):
    from click.testing import CliRunner

    from qlib_ext.cli import main

    cache.prepared_dataset(dataset_config(), tmp_path)
    cache.prepared_dataset(dataset_config(fit_end_time="2015-11-27"), tmp_path)
    (old,) = [r["key"] for r in cache.list_entries(tmp_path)][1:]
    os.utime(tmp_path / f"{old}.json", (0, 10 * 86400.0))  # last used long ago
    listing = CliRunner().invoke(main, ["cache", "ls", "--dir", str(tmp_path)])
    assert listing.exit_code == 0, listing.output
    assert "Alpha158" in listing.output and old[:12] in listing.output and "2 entries" in listing.output
    cleared = CliRunner().invoke(main, ["cache", "clear", "--dir", str(tmp_path), "--older-than", "1"])
    assert "deleted 1 entries" in cleared.output
    assert len(cache.list_entries(tmp_path)) == 1 and cache.list_entries(tmp_path)[0]["key"] != old
    CliRunner().invoke(main, ["cache", "clear", "--dir", str(tmp_path)])
    assert cache.list_entries(tmp_path) == [] and not list(tmp_path.glob("*.bin"))
