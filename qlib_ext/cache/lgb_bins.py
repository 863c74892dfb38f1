"""LightGBM's binned training data, made by the first fit and loaded by every later fit on the same data.

Qlib's ``LGBModel.fit`` turns the train and valid segments into ``lgb.Dataset`` objects, which
LightGBM bins (quantiles per feature) before the first tree: on 300 stocks that costs ~10 s of a
40 s fit, identical for every grid point that only changes boosting settings (learning rate,
leaves, depth, regularisation). Under :func:`reused_lgb_data` the first such fit stores the binned
pair in the cache directory (LightGBM's own binary format) and later fits — in any worker, any
forked task child, any host sharing the directory — load it instead of binning again.

The key is the dataset's cache key plus every LightGBM parameter not known to be boosting-only
(:data:`BOOSTING_ONLY`) plus the LightGBM version, so any setting that could change the bins
(``max_bin``, ``min_data_in_leaf`` through ``feature_pre_filter``, ``seed``, an alias we do not
know, ...) gets its own entry. Only Qlib's ``LGBModel`` (or a subclass keeping its
``_prepare_data``) fitting without a reweighter takes part; the model is a plain ``LGBModel``
again after the fit, so ``params.pkl`` unpickles without qlib-ext.

Two first fits running at once both bin and both store (the same bytes, atomically replaced):
waiting on a lock would cost as long as binning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlib_ext.cache.datasets import key_digest
from qlib_ext.cache.entry import PickleEntry, stats, unusable

logger = logging.getLogger("qlib_ext.cache")

BOOSTING_ONLY = frozenset({
    "objective", "application", "app", "loss", "boosting", "boosting_type", "boost",
    "learning_rate", "shrinkage_rate", "eta", "num_leaves", "num_leaf", "max_leaves", "max_leaf", "max_depth",
    "lambda_l1", "reg_alpha", "l1_regularization", "lambda_l2", "reg_lambda", "lambda", "l2_regularization",
    "feature_fraction", "sub_feature", "colsample_bytree", "feature_fraction_bynode", "sub_feature_bynode",
    "colsample_bynode", "feature_fraction_seed", "bagging_fraction", "sub_row", "subsample", "bagging",
    "bagging_freq", "subsample_freq", "bagging_seed", "bagging_fraction_seed", "min_gain_to_split",
    "min_split_gain", "max_delta_step", "max_tree_output", "max_leaf_output", "extra_trees", "extra_tree",
    "extra_seed", "path_smooth", "verbosity", "verbose", "num_threads", "num_thread", "nthread", "nthreads",
    "n_jobs", "metric", "metrics", "metric_types", "first_metric_only", "early_stopping_round",
    "early_stopping_rounds", "early_stopping", "n_iter_no_change", "num_iterations", "num_iteration", "n_iter",
    "num_tree", "num_trees", "num_round", "num_rounds", "nrounds", "num_boost_round", "n_estimators",
    "drop_rate", "rate_drop", "max_drop", "skip_drop", "xgboost_dart_mode", "uniform_drop", "drop_seed",
    "top_rate", "other_rate",
})
"""LightGBM parameters (and their aliases) that only steer boosting, never how a Dataset is binned."""


class BinnedEntry(PickleEntry):
    """``{segment name: LightGBM binary file bytes}``, in segment order (train first)."""

    kind = "lgb_data_"


def entry_key(dataset_key: str, params: dict) -> str:
    """sha256 of the data's identity, the parameters that may affect binning, and the LightGBM version."""
    import lightgbm

    binning = {k: v for k, v in params.items() if k not in BOOSTING_ONLY}
    return key_digest([dataset_key, binning, lightgbm.__version__])


@contextlib.contextmanager
def reused_lgb_data(model: Any, dataset_key: str | None, cache_dir: str | os.PathLike | None) -> Iterator[None]:
    """While the block fits ``model``, take its binned train/valid data from ``cache_dir``, or store
    it there once the fit has binned it.

    Args:
        model: the task's model; anything but Qlib's ``LGBModel`` fits as usual.
        dataset_key: identity of the dataset's data (``qlib_ext.cache.datasets.dataset_key``); None: no reuse.
        cache_dir: the cache directory; None: no reuse.
    """
    from qlib.contrib.model.gbdt import LGBModel

    if dataset_key is None or cache_dir is None or not isinstance(model, LGBModel) \
            or type(model)._prepare_data is not LGBModel._prepare_data:
        yield
        return
    entry = BinnedEntry(Path(cache_dir), entry_key(dataset_key, model.params))
    original = model._prepare_data
    built: list[Any] = []

    def prepare(dataset: Any, reweighter: Any = None) -> Any:
        if reweighter is not None:  # weights are part of the binned data: nothing to share
            return original(dataset, reweighter)
        stored = entry.try_load(report=True)
        if stored is not None:
            logger.info("cache: loaded LightGBM's binned data %s", entry.key[:12])
            return _datasets(stored, model.params)
        built[:] = original(dataset, reweighter)
        return built

    model._prepare_data = prepare
    try:
        yield
        if built:  # lgb.train has constructed (binned) them by now
            _store_or_skip(entry, built)
    finally:
        del model._prepare_data  # back to the class's method: the pickled model stays a plain LGBModel


def _store_or_skip(entry: BinnedEntry, datasets: list[tuple[Any, str]]) -> None:
    """:func:`_store`, or log once and go on when the cache cannot be written (the fit is done anyway)."""
    from lightgbm.basic import LightGBMError

    try:
        _store(entry, datasets)
    except OSError as e:
        unusable(entry.dir, e)
    except LightGBMError as e:  # save_binary reports a full disk as its own error
        unusable(entry.dir, OSError(str(e)))


def _store(entry: BinnedEntry, datasets: list[tuple[Any, str]]) -> None:
    entry.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    blobs = {}
    with tempfile.TemporaryDirectory(dir=entry.dir, prefix=".lgb-") as tmp:
        for ds, name in datasets:
            path = Path(tmp) / name
            ds.save_binary(path)
            blobs[name] = path.read_bytes()
    entry.write(blobs, {"handler": "lightgbm.Dataset (binned)", "instruments": None, "start_time": None,
                             "end_time": None, "build_seconds": None}, read_back=False)
    stats["lgb_data_built"] += 1
    logger.info("cache: stored LightGBM's binned data %s (%.0f MB)", entry.key[:12],
                sum(map(len, blobs.values())) / 2**20)


def _datasets(blobs: dict[str, bytes], params: dict) -> list[tuple[Any, str]]:
    """The stored pair as constructed ``lgb.Dataset`` objects (valid referencing train, as Qlib makes them)."""
    import lightgbm as lgb

    out: list[tuple[Any, str]] = []
    with tempfile.TemporaryDirectory(prefix="qlib-ext-lgb-") as tmp:
        for name, blob in blobs.items():
            path = Path(tmp) / name
            path.write_bytes(blob)
            reference = out[0][0] if out else None
            out.append((lgb.Dataset(str(path), reference=reference, params=dict(params)).construct(), name))
    return out
