"""Reusing LightGBM's binned data between fits: same model as a fresh fit, reuse only when safe."""

from __future__ import annotations

import contextlib
import pickle

import numpy as np
import pandas as pd
import pytest
from data_fixtures import init_qlib
from test_cache import dataset_config

from qlib_ext.cache import datasets as cache
from qlib_ext.cache import lgb_bins as lgb_data
from qlib_ext.cache.entry import stats

PARAMS = {"loss": "mse", "num_boost_round": 30, "early_stopping_rounds": 10, "num_leaves": 16, "max_depth": 4,
          "learning_rate": 0.1, "num_threads": 1}


@pytest.fixture(scope="module")
def cache_dir(synth_provider, tmp_path_factory):
    init_qlib(synth_provider)
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def dataset(cache_dir):
    stats.clear()
    config = dataset_config(instruments="csi300")
    return cache.prepared_dataset(config, cache_dir), cache.dataset_key(config)


def _fit(dataset, key, bins_dir, reweighter=None, **params):
    from qlib.contrib.model.gbdt import LGBModel
    from qlib.workflow import R

    model = LGBModel(**{**PARAMS, **params})
    # in a run of its own: fit logs metrics, and a recorder left active would stop later tests' qlib.init
    with R.start(experiment_name="lgb_data"), lgb_data.reused_lgb_data(model, key, bins_dir):
        model.fit(dataset, reweighter=reweighter)
    return model


def test_stored_bins_fit_the_same_model_as_fresh_data(dataset, tmp_path):
    ds, key = dataset
    first = _fit(ds, key, tmp_path, learning_rate=0.05)  # bins the data and stores it
    reused = _fit(ds, key, tmp_path, learning_rate=0.2, num_leaves=8)
    assert stats["lgb_data_built"] == 1 and stats["lgb_data_loaded"] == 1
    assert reused.model.num_trees() > 1
    for model, params in ((first, {"learning_rate": 0.05}), (reused, {"learning_rate": 0.2, "num_leaves": 8})):
        fresh = _fit(ds, None, None, **params)
        assert model.model.model_to_string() == fresh.model.model_to_string()
        pd.testing.assert_series_equal(model.predict(ds), fresh.predict(ds))


@pytest.mark.parametrize("change", [{"max_bin": 63}, {"min_data_in_leaf": 5}, {"seed": 7}, {"some_alias": 1}])
def test_settings_that_may_change_the_bins_get_their_own_data(dataset, tmp_path, change):
    ds, key = dataset
    _fit(ds, key, tmp_path)
    _fit(ds, key, tmp_path, **change)
    assert stats["lgb_data_built"] == 2 and stats["lgb_data_loaded"] == 0


def test_other_data_is_not_reused(dataset, cache_dir, tmp_path):
    ds, key = dataset
    _fit(ds, key, tmp_path)
    config = dataset_config(instruments="csi300")
    config["kwargs"]["segments"]["train"] = ("2015-04-01", "2015-11-27")
    other_key = cache.dataset_key(config)
    assert other_key != key
    _fit(cache.prepared_dataset(config, cache_dir), other_key, tmp_path)
    assert stats["lgb_data_built"] == 2 and stats["lgb_data_loaded"] == 0


def test_damaged_entry_is_rebuilt(dataset, tmp_path):
    ds, key = dataset
    _fit(ds, key, tmp_path)
    (data,) = tmp_path.glob("*.bin")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    model = _fit(ds, key, tmp_path, learning_rate=0.2)
    assert stats["lgb_data_rebuilt_corrupt"] == 1 and stats["lgb_data_built"] == 2
    assert model.model.model_to_string() == _fit(ds, None, None, learning_rate=0.2).model.model_to_string()


def test_fitted_model_pickles_as_a_plain_qlib_model(dataset, tmp_path):
    ds, key = dataset
    model = _fit(ds, key, tmp_path)
    assert "_prepare_data" not in vars(model)
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored).__module__ == "qlib.contrib.model.gbdt"
    assert np.allclose(restored.predict(ds).to_numpy(), model.predict(ds).to_numpy())


def test_a_reweighted_fit_bins_its_own_data(dataset, tmp_path):
    from qlib.data.dataset.weight import Reweighter

    class Ones(Reweighter):
        def __init__(self):  # Qlib's base class refuses to be constructed
            pass

        def reweight(self, data):
            return np.ones(len(data))

    ds, key = dataset
    _fit(ds, key, tmp_path)
    _fit(ds, key, tmp_path, reweighter=Ones())
    assert stats["lgb_data_loaded"] == 0 and stats["lgb_data_built"] == 1


def test_other_models_are_left_alone(dataset, tmp_path):
    class Plain:
        def _prepare_data(self):
            return "own"

    model = Plain()
    with lgb_data.reused_lgb_data(model, dataset[1], tmp_path):
        assert model._prepare_data() == "own"
    assert not list(tmp_path.glob("*.bin"))


def _curve(batched: bool, dataset) -> tuple[dict, dict]:
    """The training curve LightGBM's fit leaves in MLflow, and the client calls that wrote it."""
    from collections import Counter

    from qlib.contrib.model.gbdt import LGBModel
    from qlib.workflow import R

    from qlib_ext.tracking.batch import batched_metrics

    calls: Counter = Counter()
    model = LGBModel(**PARAMS)
    with R.start(experiment_name="lgb_curve"):
        recorder = R.get_recorder()
        client = recorder.client
        for name in ("log_metric", "log_batch"):  # the real client, its calls counted
            real = getattr(client, name)
            setattr(client, name, lambda *a, _real=real, _name=name, **k: (calls.update([_name]), _real(*a, **k))[1])
        with batched_metrics(recorder) if batched else contextlib.nullcontext():
            model.fit(dataset[0])
        recorder.async_log.wait()  # Qlib's background logging, before reading back
        recorder.async_log = None
        curve = {key: [(m.step, m.value) for m in client.get_metric_history(recorder.id, key)]
                 for key in client.get_run(recorder.id).data.metrics}
    return curve, dict(calls)


def test_the_training_curve_is_written_in_one_batch_with_the_same_points(dataset):
    plain, plain_calls = _curve(False, dataset)
    batched, batched_calls = _curve(True, dataset)
    assert set(plain) == {"l2.train", "l2.valid"} and len(plain["l2.train"]) > 5
    assert batched == plain  # same keys, steps and values as Qlib's own per-round logging
    assert plain_calls.get("log_metric", 0) == sum(len(v) for v in plain.values())
    assert batched_calls == {"log_batch": 1}
