"""Does a dataset carry learnable cross-sectional signal? LightGBM on Alpha158, IC vs a control.

Trains on the first 60 % of the calendar, early-stops on the next 20 %, and reports the mean
daily Pearson IC of its predictions on the last 20 % against Alpha158's label (the return from
t+1 to t+2). The control trains the same model on labels shuffled across the training and
validation rows, which destroys any signal: its test IC must sit near 0.

``qlib.init`` is process-global, so call this in its own process
(``python -m qlib_ext.data.alpha_check DIR``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qlib_ext.data.qlib_format import read_calendar

LGB_PARAMS = {
    "objective": "regression", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 200,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 10.0,
    "verbosity": -1, "num_threads": 1, "seed": 0,
}
"""LightGBM parameters: Qlib's benchmark config, made smaller and single-threaded for a check."""


@dataclass(frozen=True)
class AlphaCheck:
    """Result of :func:`check_alpha`: test ICs of the real model and of the shuffled control."""

    test_ic: float
    test_ic_std: float
    test_days: int
    shuffled_ic: float
    rounds: int
    segments: dict
    seconds: float


def segments(calendar: pd.DatetimeIndex) -> dict[str, tuple[str, str]]:
    """Split ``calendar`` 60/20/20 into train/valid/test, leaving the last day out of test.

    Alpha158 needs 60 days of history and its label looks 2 days ahead, so the first 60 and the
    last 2 days yield no usable rows; they are skipped here.
    """
    days = calendar[60:-2]
    a, b = int(len(days) * 0.6), int(len(days) * 0.8)
    fmt = "%Y-%m-%d"
    return {
        "train": (f"{days[0]:{fmt}}", f"{days[a - 1]:{fmt}}"),
        "valid": (f"{days[a]:{fmt}}", f"{days[b - 1]:{fmt}}"),
        "test": (f"{days[b]:{fmt}}", f"{days[-1]:{fmt}}"),
    }


def daily_ic(pred: pd.Series, label: pd.Series) -> pd.Series:
    """Pearson correlation of ``pred`` and ``label`` per datetime (MultiIndex datetime, instrument)."""
    df = pd.DataFrame({"p": pred, "l": label}).dropna()
    return df.groupby(level="datetime").apply(lambda g: g["p"].corr(g["l"]))


def check_alpha(provider: Path, market: str = "csi300", seed: int = 0) -> AlphaCheck:
    """Train LightGBM on Alpha158 features of ``provider`` and measure the test IC (see module doc).

    Args:
        provider: Qlib dataset directory.
        market: instrument list to use.
        seed: seed of the label shuffle of the control.
    """
    import lightgbm as lgb
    import qlib
    from qlib.contrib.data.handler import Alpha158
    from qlib.data.dataset import DatasetH
    from qlib.data.dataset.handler import DataHandlerLP

    t0 = time.perf_counter()
    qlib.init(provider_uri=str(provider), region="cn", kernels=1)
    seg = segments(read_calendar(provider))
    handler = Alpha158(
        instruments=market, start_time=seg["train"][0], end_time=seg["test"][1],
        fit_start_time=seg["train"][0], fit_end_time=seg["train"][1],
    )
    ds = DatasetH(handler, segments=seg)
    train, valid = ds.prepare(["train", "valid"], col_set=["feature", "label"], data_key=DataHandlerLP.DK_L)
    test = ds.prepare("test", col_set=["feature", "label"], data_key=DataHandlerLP.DK_R)
    pred, rounds = _fit_predict(lgb, train, valid, test)
    ic = daily_ic(pred, test["label"].iloc[:, 0])
    rng = np.random.default_rng(seed)
    shuffled, _ = _fit_predict(lgb, _shuffle(train, rng), _shuffle(valid, rng), test)
    return AlphaCheck(
        float(ic.mean()), float(ic.std()), int(ic.count()),
        float(daily_ic(shuffled, test["label"].iloc[:, 0]).mean()), rounds, seg, time.perf_counter() - t0,
    )


def _shuffle(df: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    out = df.copy()
    out["label"] = df["label"].to_numpy()[rng.permutation(len(df))]
    return out


def _fit_predict(lgb, train: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame) -> tuple[pd.Series, int]:
    def dset(df: pd.DataFrame):
        df = df.dropna(subset=[("label", df["label"].columns[0])])
        return lgb.Dataset(df["feature"].to_numpy(), label=df["label"].to_numpy()[:, 0])

    dtrain, dvalid = dset(train), dset(valid)
    model = lgb.train(
        LGB_PARAMS, dtrain, num_boost_round=500, valid_sets=[dvalid],
        callbacks=[lgb.early_stopping(50, verbose=False)],
    )
    pred = model.predict(test["feature"].to_numpy(), num_iteration=model.best_iteration)
    return pd.Series(pred, index=test.index), int(model.best_iteration)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: print the :class:`AlphaCheck` of a dataset as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("provider", type=Path)
    parser.add_argument("--market", default="csi300")
    args = parser.parse_args(argv)
    print(json.dumps(asdict(check_alpha(args.provider, args.market)), indent=2))


if __name__ == "__main__":
    main()
