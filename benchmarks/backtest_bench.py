"""One Qlib backtest, stock vs fast path (``qlib_ext.backtest``), side by side on one machine.

For each size (synthetic data, 400 days; backtest 2015-08-03 .. 2016-07-13, 240 days) the same
predictions (5-day reversal plus noise) go through Qlib's ``backtest`` and through
``qlib_ext.backtest.fast.fast_backtest`` with ``TopkDropoutStrategy``, a daily
``SimulatorExecutor`` and one shared exchange (built once, as qlib-ext's exchange cache does),
interleaved, ``--repeat`` times; medians. Every repetition checks that both give equal frames.
Then a strategy sweep: 8 ``TopkDropoutStrategy`` settings on one prediction, all stock vs all fast.

    python benchmarks/backtest_bench.py [--sizes 20,300,1000] [--repeat 5] [--sweep-size 300] [--e2e WORKERS]
                                        [--profile N]

Writes the backtest_bench section of docs/performance.md (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_line, median, table, write_section

START, END = "2015-08-03", "2016-07-13"
SWEEP = [dict(topk=50, n_drop=5), dict(topk=30, n_drop=3), dict(topk=50, n_drop=10), dict(topk=20, n_drop=2),
         dict(topk=50, n_drop=5, hold_thresh=3), dict(topk=50, n_drop=5, only_tradable=True),
         dict(topk=50, n_drop=5, forbid_all_trade_at_limit=False), dict(topk=40, n_drop=8, method_sell="random")]
"""The 8 strategy points of the sweep (TopkDropoutStrategy kwargs)."""


def synth_data(instruments: int) -> Path:
    from qlib_ext.data.synth import write_synthetic

    out = Path(tempfile.gettempdir()) / f"qlib-ext-bt-{instruments}x400"
    if not (out / "calendars" / "day.txt").exists():
        print(write_synthetic(out, instruments=instruments, days=400, start="2015-01-05", seed=0, market="csi300"))
    return out


def _setup(instruments: int):
    import logging

    import numpy as np
    import qlib

    qlib.init(provider_uri=str(synth_data(instruments)), region="cn", kernels=1, logging_level=logging.ERROR)
    from qlib.backtest import get_exchange
    from qlib.data import D

    close = D.features(D.instruments("csi300"), ["$close"], "2015-06-01", END)["$close"]
    rng = np.random.default_rng(0)
    score = -close.groupby(level="instrument").pct_change(5)
    pred = (score + rng.normal(0, 0.02, len(score))).rename("score").dropna()
    pred = pred.swaplevel().sort_index().loc[START:]
    exchange = get_exchange(freq="day", limit_threshold=0.095, deal_price="close", open_cost=0.0005,
                            close_cost=0.0015, min_cost=5, codes="csi300", start_time=START, end_time=END)
    return pred, exchange


def _run(fn, pred, exchange, **strategy):
    import numpy as np

    np.random.seed(0)
    kwargs = {"signal": pred, "topk": 50, "n_drop": 5, **strategy}
    return fn(start_time=START, end_time=END, benchmark="SH000300", account=100_000_000,
              strategy={"class": "TopkDropoutStrategy", "module_path": "qlib.contrib.strategy.signal_strategy",
                        "kwargs": kwargs},
              executor={"class": "SimulatorExecutor", "module_path": "qlib.backtest.executor",
                        "kwargs": {"time_per_step": "day", "generate_portfolio_metrics": True, "verbose": False}},
              exchange_kwargs={"exchange": exchange})


def _same(a, b) -> bool:
    import pandas as pd

    (report_a, pos_a), (report_b, pos_b) = a[0]["1day"], b[0]["1day"]
    pd.testing.assert_frame_equal(report_a, report_b, check_exact=True)
    pd.testing.assert_frame_equal(a[1]["1day"][0], b[1]["1day"][0], check_exact=True)
    return list(pos_a) == list(pos_b) and all(pos_a[d].position == pos_b[d].position for d in pos_a)


def measure(instruments: int, repeat: int, sweep: bool) -> dict:
    """Child-process body: timings for one size (qlib.init is process-global)."""
    from qlib.backtest import backtest

    from qlib_ext.backtest.exchange import fast_exchange
    from qlib_ext.backtest.fast import _memo, fast_backtest

    pred, exchange = _setup(instruments)
    t0 = time.perf_counter()
    _memo[id(exchange)] = (exchange, fast_exchange(exchange))  # what the first fast backtest of a worker builds
    build = time.perf_counter() - t0
    stock, fast, same = [], [], True
    for _ in range(repeat):
        for fn, times in ((backtest, stock), (fast_backtest, fast)):
            t = time.perf_counter()
            result = _run(fn, pred, exchange)
            times.append(time.perf_counter() - t)
            if fn is backtest:
                reference = result
        same = same and _same(reference, result)
    out = {"instruments": instruments, "stock": median(stock), "fast": median(fast), "build": build,
           "same": same, "days": len(reference[0]["1day"][0]), "load": os.getloadavg()[0]}
    if sweep:
        sweep_times = {"stock": [], "fast": []}
        for fn, key in ((backtest, "stock"), (fast_backtest, "fast")):
            t = time.perf_counter()
            results = [_run(fn, pred, exchange, **point) for point in SWEEP]
            sweep_times[key] = time.perf_counter() - t
            if fn is backtest:
                references = results
        out["sweep"] = sweep_times
        out["sweep_same"] = all(_same(a, b) for a, b in zip(references, results, strict=True))
    return out


def profile(instruments: int) -> None:
    import cProfile
    import pstats

    from qlib_ext.backtest.fast import fast_backtest

    pred, exchange = _setup(instruments)
    _run(fast_backtest, pred, exchange)
    cProfile.runctx("_run(fast_backtest, pred, exchange)", globals(), locals(), "/tmp/backtest_bench.prof")
    pstats.Stats("/tmp/backtest_bench.prof").sort_stats("cumulative").print_stats(40)


E2E_GRID = """BASE_CONFIG_PATH: {base}
qlib_init:
    provider_uri: {data}
    region: cn
grid:
    strategies:
        topk: [20, 50]
        n_drop: [2, 5]
        hold_thresh: [1, 3]
workers:
    fast_backtest: {fast}
"""
"""1 LightGBM model x 8 TopkDropoutStrategy points on workflows/plain_qrun.yaml (300 stocks, 2020 backtest)."""


def e2e(workers: int, repeat: int = 3) -> dict:
    """``qlib-ext run`` of the 1 x 8 sweep, fast_backtest false vs true interleaved ``repeat`` times, each run in
    a fresh home; medians of the wall time and of the runs' stages, and whether every backtest run of every
    repetition logged the same metrics."""
    import statistics

    from qlib_ext.data.synth import write_synthetic

    data = Path(tempfile.gettempdir()) / "qlib-ext-bt-300x1500"
    if not (data / "calendars" / "day.txt").exists():
        write_synthetic(data, instruments=300, days=1500, start="2015-01-05", seed=0, market="csi300")
    runs = {"false": [], "true": []}
    for _ in range(repeat):
        for fast in runs:
            runs[fast].append(_e2e_once(workers, data, fast))
            print({fast: {k: v for k, v in runs[fast][-1].items() if k != "backtests"}}, flush=True)
    reference = runs["false"][0]["backtests"]
    same = len(reference) == len(SWEEP) and all(r["backtests"] == reference for rs in runs.values() for r in rs)
    out = {"same": same, "n": len(reference), "repeat": repeat, "load": os.getloadavg()[0]}
    for fast, key in (("false", "stock"), ("true", "fast")):
        for measure in ("wall", "backtest_s", "train_run_s", "backtest_runs_s"):
            value = statistics.median(r[measure] for r in runs[fast])
            out[key if measure == "wall" else f"{key}_{measure}"] = value
    return out


def _e2e_once(workers: int, data: Path, fast: str) -> dict:
    """One ``qlib-ext run`` of the sweep in a fresh home: wall time, the backtest runs' metrics, stage sums."""
    import shutil

    import mlflow

    base = Path(__file__).resolve().parent.parent / "workflows" / "plain_qrun.yaml"
    home = Path(tempfile.mkdtemp(prefix="bench-bt-e2e-"))
    wf = home / "sweep.yaml"
    wf.write_text(E2E_GRID.format(base=base, data=data, fast=fast))
    env = {**os.environ, "QLIB_EXT_HOME": str(home)}
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "qlib_ext", "run", str(wf), "-n", str(workers), "--provider-uri", str(data)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"qlib-ext run failed ({fast=}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    subprocess.run([sys.executable, "-m", "qlib_ext", "store", "stop"], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    client = mlflow.MlflowClient(f"sqlite:///{home}/mlflow.db")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    bt_runs = [r for r in found if r.data.tags.get("qlib_ext.kind") == "backtest"]
    train = [r for r in found if r.data.tags.get("qlib_ext.kind") == "train"]
    shutil.rmtree(home, ignore_errors=True)
    return {"wall": wall,
            "backtests": {tuple(sorted((k, v) for k, v in r.data.params.items() if k.startswith("strategy."))):
                          {k: v for k, v in r.data.metrics.items() if k.startswith("1day.")} for r in bt_runs},
            "backtest_s": sum(r.data.metrics.get("time.backtest_s", 0.0) for r in bt_runs),
            # whole MLflow runs: the training run, and the backtest runs summed
            "train_run_s": sum((r.info.end_time - r.info.start_time) / 1000 for r in train),
            "backtest_runs_s": sum((r.info.end_time - r.info.start_time) / 1000 for r in bt_runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20,300,1000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sweep-size", type=int, default=300, help="instruments of the sweep (0: no sweep)")
    parser.add_argument("--profile", type=int, default=0, help="profile the fast path at N instruments and exit")
    parser.add_argument("--e2e", type=int, default=0, metavar="WORKERS",
                        help="also run the 1 x 8 sweep end to end with qlib-ext run and WORKERS workers")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--write-from", metavar="LOG", help="render the section from the result lines of a log")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        return profile(args.profile)
    if args.child:
        n, repeat, sweep = json.loads(args.child)
        print("RESULT " + json.dumps(measure(n, repeat, sweep)))
        return
    results = []
    if args.write_from:  # render lines printed by earlier runs ({'instruments': ...} / {'n': ...} dicts)
        results = [ast.literal_eval(x) for x in Path(args.write_from).read_text().splitlines() if x.startswith("{")]
    for n in [int(s) for s in args.sizes.split(",") if s] if not args.write_from else []:
        child = json.dumps([n, args.repeat, n == args.sweep_size])
        proc = subprocess.run([sys.executable, __file__, "--child", child], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"size {n} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[7:]))
        print(results[-1], flush=True)
    if args.e2e and not args.write_from:
        results.append({**e2e(args.e2e, args.repeat), "workers": args.e2e})
        print(results[-1], flush=True)
    rows, sweep_row, e2e_row, e2e_result = [], None, None, None
    for r in results:
        if "instruments" in r:
            rows.append([f"{r['instruments']:,}", r["days"], f"{r['stock']:.2f}", f"{r['fast']:.2f}",
                         f"{r['stock'] / r['fast']:.2f}x", f"{r['build']:.2f}", "yes" if r["same"] else "NO",
                         f"{r['load']:.1f}"])
        if "sweep" in r:
            sw = r["sweep"]
            sweep_row = [f"{r['instruments']:,}", len(SWEEP), f"{sw['stock']:.1f}", f"{sw['fast']:.1f}",
                         f"{sw['stock'] / sw['fast']:.2f}x", f"{1 - sw['fast'] / sw['stock']:.0%}",
                         "yes" if r["sweep_same"] else "NO"]
        if "workers" in r:
            e2e_row = [r["n"], r["workers"], f"{r['stock']:.0f}", f"{r['fast']:.0f}",
                       f"{1 - r['fast'] / r['stock']:.0%}",
                       f"{r['stock_backtest_s']:.0f} / {r['fast_backtest_s']:.0f}",
                       _pair(r, "backtest_runs_s"), _pair(r, "train_run_s"), "yes" if r["same"] else "NO",
                       f"{r['load']:.1f}" if "load" in r else "-"]
            e2e_result = r
    text = _section(rows, sweep_row, args.repeat, e2e_row, e2e_result)
    print(text)
    if not args.no_write:
        write_section("backtest_bench", text)


def _e2e_bound(e2e: dict) -> str:
    """What bounds the end-to-end saving: the share of the stock run's wall time its backtest tasks take."""
    if "stock_backtest_runs_s" not in e2e:
        return "The fast path shortens only the backtest stage; the training task bounds the end-to-end saving."
    share = e2e["stock_backtest_runs_s"] / e2e["workers"] / e2e["stock"]
    return (f"The fast path shortens only the backtest tasks, and in the stock run they are {share:.0%} of the wall "
            f"time ({e2e['stock_backtest_runs_s']:.0f} s of backtest runs over {e2e['workers']} workers, of "
            f"{e2e['stock']:.0f} s): backtests that took no time at all could save no more than that. The rest is "
            "the training task (Alpha158 from the cache, LightGBM with one thread per worker while the other "
            "worker waits for its predictions, signal analysis), the cache build, and worker start-up. A sweep "
            "saves a third only when its backtests are more than a third of its wall time: many more strategy "
            "points per trained model, or a cheaper model.")


def _pair(r: dict, key: str) -> str:
    """``stock / fast`` seconds of one e2e measure (``-`` for results recorded before it was measured)."""
    return f"{r['stock_' + key]:.0f} / {r['fast_' + key]:.0f}" if "stock_" + key in r else "-"


def _section(rows: list, sweep_row: list | None, repeat: int, e2e_row: list | None = None,
             e2e: dict | None = None) -> str:
    parts = [
        "## Single backtest",
        "",
        "`qlib_ext/backtest/` runs a `PortAnaRecord` backtest through Qlib's own loop, executor, account and "
        "order logic with parts swapped for exact, faster ones (on by default; `workers.fast_backtest: false` "
        "turns it off): an `Exchange` whose quote answers each per-stock question (suspended, limit, close, "
        "factor, volume, deal price) from `(day, stock)` arrays instead of `NumpyQuote`'s `IndexData` lookups "
        "(`exchange.py`); a `Signal` that groups the predictions once instead of once a day (`signal.py`); "
        "`TopkDropoutStrategy`'s daily pandas bookkeeping done on arrays with pandas' own sort, `nargsort` "
        "(`strategy.py`); Qlib's scalar `np.isclose` in the order and position arithmetic computed by the same "
        "float64 formula; and, for the duration of the backtest only, `Position.__deepcopy__`, "
        "`Position._sell_stock` and the benchmark sampling replaced (`patches.py`). `fast.py` decides up front: "
        "Qlib 0.9.7, `TopkDropoutStrategy` config with a float Series/DataFrame signal, daily `SimulatorExecutor` "
        "without inner executor, default `Position`, a daily `NumpyQuote` exchange without `extra_quote`; "
        "anything else (another Qlib version, `WeightStrategyBase` strategies, nested executors, ...) runs "
        "Qlib's own backtest and logs why. `method_buy=\"random\"` keeps Qlib's strategy class (Qlib 0.9.7 "
        "itself raises there with numpy 2). `tests/test_fast_backtest.py` compares every frame and logged "
        "metric of both paths across topk/n_drop, random sell, hold_thresh, only_tradable, "
        "forbid_all_trade_at_limit, limit thresholds (none, float, expressions), deal prices, costs and "
        "min cost, impact cost, trade unit, benchmarks (code, list, none) on data with suspensions, late "
        "listings, a delisting and missing open prices, ending one day before the calendar. The arrays are a "
        "second float64 copy of the quote (NumpyQuote holds one already): ~16 MB at 1,000 stocks x 248 days.",
        "",
        "Measured by `benchmarks/backtest_bench.py`:",
        "",
        f"{machine_line()}. `TopkDropoutStrategy(topk=50, n_drop=5)`, daily `SimulatorExecutor`, synthetic data, "
        f"backtest {START} .. {END}, one shared exchange; stock and fast interleaved, median of {repeat}. "
        "`fast build`: the per-day arrays a worker builds once per shared exchange (not in `fast`). "
        "`identical`: report_normal, positions and indicators equal (exact) in every repetition. "
        "`load`: 1-minute load average when the size finished (2 cores, shared with other work).",
        "",
        table(["instruments", "days", "stock s", "fast s", "speed-up", "fast build s", "identical", "load"], rows),
    ]
    if sweep_row:
        parts += ["", "Strategy sweep: the 8 `TopkDropoutStrategy` settings of `SWEEP` (topk, n_drop, hold_thresh, "
                  "only_tradable, forbid_all_trade_at_limit, random sell) on one prediction, one after the other "
                  "(backtests only; training is the same for both):", "",
                  table(["instruments", "backtests", "stock s", "fast s", "speed-up", "wall time saved",
                         "identical"], [sweep_row])]
    if e2e_row:
        parts += ["", "The same sweep end to end: `qlib-ext run` of 1 LightGBM model x 8 strategy points "
                  "(`workflows/plain_qrun.yaml`, 300 stocks x 1,500 days, 2020 backtest; one training task, then 8 "
                  "backtest tasks), `workers.fast_backtest: false` vs `true` interleaved, each run in a fresh home "
                  f"(store, MLflow, cache), medians of {e2e.get('repeat', 1)} runs each. "
                  "`backtest stage`: the backtest runs' summed `time.backtest_s`; `backtest runs`: "
                  "the same runs' whole MLflow durations, summed (loading the predictions and the exchange, the "
                  "analysis, artifacts, plots); `training run`: the one training task's MLflow run (fit, predict, "
                  "signal analysis). `identical`: every backtest run logged the same metrics.", "",
                  table(["backtests", "workers", "stock wall s", "fast wall s", "wall time saved",
                         "backtest stage s (stock / fast)", "backtest runs s", "training run s", "identical",
                         "load"], [e2e_row]), "",
                  _e2e_bound(e2e)]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
