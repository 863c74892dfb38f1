"""The backtest stage as a worker meets it, against stock Qlib ``PortAnaRecord.generate``, on the same predictions.

For each size (synthetic data, 400 days; backtest 2015-08-03 .. 2016-07-13) one child process with a real MLflow
sqlite tracking store saves the same predictions into fresh runs and times, interleaved ``--repeat`` times:

* ``stock``: Qlib's ``PortAnaRecord(recorder, config).generate()`` as ``qrun`` runs it: the record builds its own
  exchange, backtests, analyses, logs and saves; then Qlib's background metric logging is waited for.
* ``qlib-ext``: the worker's backtest stage (``qlib_ext.worker.body.backtest_stage``) on a run guarded by the
  task's artifact ledger, inside ``fast_records``: the shared exchange (built beforehand into the cache directory,
  as the cache warm-up does, then loaded by the stage), the fast backtest, the same analysis, logging and saves;
  then the same wait. Each repetition starts as a fresh worker does: no exchange in the process's memory.

One strategy, then a sweep of 4 strategies on the shared predictions (one run each, one after the other in one
process, as a worker takes a sweep's backtest tasks). Every repetition checks that both logged the same metrics and
saved the same report, positions and analysis frames.

Also timed (this tree's children only): the worker's stage off the fast path (``workers.fast_backtest: false``:
the shared exchange, Qlib's own loop). ``--before DIR`` (a checkout of an earlier tree, e.g. ``git archive REV
qlib_ext | tar -x -C DIR``) times that tree's fast stage too, in children interleaved with this tree's.

    python benchmarks/backtest_stage_bench.py [--sizes 100,300] [--repeat 3] [--before DIR] [--profile N]
                                              [--no-write] [--write-from LOG[,LOG]]

Writes the backtest_stage_bench section of docs/performance.md (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_line, median, table, write_section
from backtest_bench import END, START, synth_data

SWEEP4 = [dict(topk=50, n_drop=5), dict(topk=30, n_drop=3), dict(topk=50, n_drop=5, hold_thresh=3),
          dict(topk=40, n_drop=8, method_sell="random")]
"""The 4 strategy points of the sweep (TopkDropoutStrategy kwargs)."""

EXCHANGE = {"limit_threshold": 0.095, "deal_price": "close", "open_cost": 0.0005, "close_cost": 0.0015,
            "min_cost": 5, "codes": "csi300"}
"""The backtest's exchange settings (Qlib's PortAnaRecord defaults, the synthetic market's instruments)."""

ARTIFACTS = ("report_normal_1day.pkl", "positions_normal_1day.pkl", "indicators_normal_1day.pkl",
             "port_analysis_1day.pkl", "indicator_analysis_1day.pkl")


def _config(**strategy) -> dict:
    return {"strategy": {"class": "TopkDropoutStrategy", "module_path": "qlib.contrib.strategy",
                         "kwargs": {"signal": "<PRED>", **strategy}},
            "backtest": {"start_time": START, "end_time": END, "account": 100_000_000, "benchmark": "SH000300",
                         "exchange_kwargs": dict(EXCHANGE)}}


def _init(instruments: int, home: Path):
    import logging

    import numpy as np
    import qlib

    data = synth_data(instruments)
    os.chdir(home)  # MLflow's artifacts (./mlruns with an sqlite store) go into the temporary home
    qlib.init(provider_uri=str(data), region="cn", kernels=1, logging_level=logging.ERROR,
              exp_manager={"class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
                           "kwargs": {"uri": f"sqlite:///{home}/mlflow.db", "default_exp_name": "Experiment"}})
    from qlib.data import D

    close = D.features(D.instruments("csi300"), ["$close"], "2015-06-01", END)["$close"]
    rng = np.random.default_rng(0)
    score = -close.groupby(level="instrument").pct_change(5)
    pred = (score + rng.normal(0, 0.02, len(score))).rename("score").dropna()
    pred = pred.swaplevel().sort_index().loc[START:]
    return pred.to_frame("score"), pred.rename("LABEL0").to_frame()


def _one(how: str, config: dict, pred, label, cache_dir: Path, name: str) -> tuple[float, float, str]:
    """One record's generate in a fresh MLflow run, timed until its metrics are in MLflow; returns (wall s,
    CPU s of the whole process, Qlib's background logging thread included, run id)."""
    import numpy as np
    from qlib.workflow import R
    from qlib.workflow.record_temp import PortAnaRecord

    from qlib_ext.backtest.fast import fast_records
    from qlib_ext.tracking.artifacts import ArtifactLedger
    from qlib_ext.worker.body import _flush

    with R.start(experiment_name="stage", recorder_name=name):
        recorder = R.get_recorder()
        if how != "stock":
            ArtifactLedger(recorder.id).guard(recorder)
        recorder.save_objects(**{"pred.pkl": pred, "label.pkl": label})
        np.random.seed(0)
        rec = PortAnaRecord(recorder, config)
        start, cpu = time.perf_counter(), time.process_time()
        if how == "stock":
            rec.generate()
        else:
            with fast_records(how == "fast"):
                _stage_of_this_tree()(rec, str(cache_dir))
        _flush(recorder)
        return time.perf_counter() - start, time.process_time() - cpu, recorder.id


def _stage_of_this_tree():
    """The worker's backtest stage in the checkout this child runs (trees before ``backtest_stage`` existed ran
    ``share_exchange`` then ``generate``, inline in the worker body)."""
    from qlib_ext.worker import body

    if hasattr(body, "backtest_stage"):
        return body.backtest_stage

    def stage(record, cache_dir):
        from qlib_ext.cache.exchange import share_exchange

        share_exchange(record, cache_dir)
        record.generate()
    return stage


def _forget_exchanges() -> None:
    """A fresh worker's memory: no exchange, no fast exchange, no benchmark series kept."""
    from qlib_ext.backtest import fast, patches
    from qlib_ext.cache import exchange

    exchange._memo.clear()
    fast._memo.clear()
    patches._bench_memo.clear()


def _outputs(run_id: str) -> tuple[dict, dict]:
    from qlib.workflow import R

    recorder = R.get_recorder(recorder_id=run_id, experiment_name="stage")
    metrics = recorder.client.get_run(run_id).data.metrics
    return metrics, {n: recorder.load_object(f"portfolio_analysis/{n}") for n in ARTIFACTS}


def _same(run_a: str, run_b: str) -> bool:
    import pandas as pd

    (ma, aa), (mb, ab) = _outputs(run_a), _outputs(run_b)
    if ma != mb:
        return False
    for name in ARTIFACTS:
        a, b = aa[name], ab[name]
        if name.startswith("positions"):
            if list(a) != list(b) or any(a[d].position != b[d].position for d in a):
                return False
        else:
            try:
                pd.testing.assert_frame_equal(a, b, check_exact=True)
            except AssertionError:
                return False
    return True


def measure(instruments: int, repeat: int, stock: bool = True) -> dict:
    """Child-process body: the stage timings of one size (qlib.init is process-global); ``stock``: also Qlib's
    own generate and the worker's stage off the fast path (``shared``), else the fast stage only."""
    from qlib_ext.cache.exchange import exchange_kwargs, shared_exchange

    home = Path(tempfile.mkdtemp(prefix="bench-bt-stage-"))
    cache_dir = home / "cache"
    pred, label = _init(instruments, home)
    shared_exchange(exchange_kwargs(_config()["backtest"]), cache_dir)  # the cache warm-up's build
    times: dict[str, list[float]] = {}
    same = True
    for rep in range(repeat):
        for points, key in (([SWEEP4[0]], "1"), (SWEEP4, "4")):
            runs = {}
            hows = ("fast",) if not stock else ("stock", "shared", "fast") if key == "1" else ("stock", "fast")
            for how in hows:
                _forget_exchanges()
                total, cpu, runs[how] = 0.0, 0.0, []
                for i, point in enumerate(points):
                    seconds, cpu_s, run_id = _one(how, _config(**point), pred, label, cache_dir,
                                                  f"{how}{key}-{rep}-{i}")
                    total, cpu = total + seconds, cpu + cpu_s
                    runs[how].append(run_id)
                times.setdefault(how + key, []).append(total)
                times.setdefault("cpu_" + how + key, []).append(cpu)
            for how in hows[1:]:
                same = same and all(_same(a, b) for a, b in zip(runs["stock"], runs[how], strict=True))
        print({k: round(v[-1], 2) for k, v in times.items()}, file=sys.stderr, flush=True)
    shutil.rmtree(home, ignore_errors=True)  # the runs' store, artifacts and exchange cache
    return {"instruments": instruments, "same": same if stock else None, "load": os.getloadavg()[0], "each": times}


def profile(instruments: int, how: str, points: int) -> None:
    """cProfile of ``points`` strategies' stages (``how``: stock or fast) after one warm-up; top 45 cumulative."""
    import cProfile
    import pstats

    home = Path(tempfile.mkdtemp(prefix="bench-bt-stage-"))
    pred, label = _init(instruments, home)
    from qlib_ext.cache.exchange import exchange_kwargs, shared_exchange

    shared_exchange(exchange_kwargs(_config()["backtest"]), home / "cache")
    _one(how, _config(**SWEEP4[0]), pred, label, home / "cache", "warm")
    _forget_exchanges()
    prof = cProfile.Profile()
    prof.enable()
    for i, point in enumerate(SWEEP4[:points]):
        _one(how, _config(**point), pred, label, home / "cache", f"p{i}")
    prof.disable()
    prof.dump_stats(f"/tmp/stage-{how}-{instruments}.prof")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)


def _children(sizes: list[int], repeat: int, before: str | None) -> list[dict]:
    """Run the children, this tree's and the ``before`` tree's interleaved (the order alternating by
    repetition); print and return each child's result."""
    trees = [("after", str(Path(__file__).resolve().parent.parent))] + ([("before", before)] if before else [])
    results = []
    for n in sizes:
        for rep in range(repeat):
            for label, tree in trees if rep % 2 == 0 else trees[::-1]:
                child = json.dumps([n, 1, label == "after"])
                env = {**os.environ, "PYTHONPATH": tree}
                proc = subprocess.run([sys.executable, __file__, "--child", child], stdout=subprocess.PIPE,
                                      text=True, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"size {n} ({label}) failed (exit {proc.returncode})")
                results.append({**json.loads(line[7:]), "tree": label})
                print(results[-1], flush=True)
    return results


def summarise(results: list[dict]) -> list[dict]:
    """Per size: medians of each measure over the children (stock and shared: this tree's children)."""
    out = []
    for n in sorted({r["instruments"] for r in results}):
        mine = [r for r in results if r["instruments"] == n]
        row: dict = {"instruments": n, "load": max(r["load"] for r in mine),
                     "same": all(r["same"] for r in mine if r["same"] is not None)}
        for r in mine:
            for key, values in r["each"].items():
                name = key if "fast" not in key else f"{key}_{r['tree']}"
                row.setdefault(name, []).extend(values)
        row["repeat"] = len(row.get("stock1", []))
        out.append({k: median(v) if isinstance(v, list) else v for k, v in row.items()})
    return out


def _row(r: dict, key: str, cpu: str = "") -> list:
    stock, after = r[cpu + "stock" + key], r[f"{cpu}fast{key}_after"]
    before = r.get(f"{cpu}fast{key}_before")
    shared = r.get(cpu + "shared" + key)
    return [f"{r['instruments']:,}", 1 if key == "1" else len(SWEEP4), f"{stock:.2f}",
            f"{shared:.2f}" if shared else "-", f"{before:.2f}" if before else "-", f"{after:.2f}",
            f"{stock / before:.2f}x" if before else "-", f"**{stock / after:.2f}x**",
            f"{shared / after:.2f}x" if shared else "-", "yes" if r["same"] else "NO", r["repeat"], f"{r['load']:.1f}"]


def section(summary: list[dict], note: str = "") -> str:
    rows = [_row(r, key) for r in summary for key in ("1", "4")]
    cpu_rows = [_row(r, key, "cpu_") for r in summary for key in ("1", "4") if "cpu_stock" + key in r]
    parts = ["## Backtest stage: worker vs stock `PortAnaRecord.generate`", "",
             "Measured by `benchmarks/backtest_stage_bench.py`: the same predictions (synthetic market, 400 days; "
             f"backtest {START} .. {END}, `TopkDropoutStrategy`) saved into fresh runs of a real MLflow sqlite "
             "store, each record timed from `generate` until its metrics are in MLflow. `stock`: Qlib's "
             "`PortAnaRecord(recorder, config).generate()` as `qrun` runs it (it builds its own exchange). "
             "`stage`: the worker's backtest stage (`qlib_ext.worker.body.backtest_stage`) on a run guarded by the "
             "task's artifact ledger: the shared exchange (built into the cache directory beforehand, as the cache "
             "warm-up does; loaded by the stage, each repetition starting with none in memory, as a fresh worker), "
             "the fast backtest, Qlib's own analysis, logging and artifact saves. One strategy, and a sweep of 4 "
             "on the shared predictions (one run each, one after the other in one process, as a worker takes a "
             "sweep's backtest tasks).", "",
             f"{machine_line()}; medians of the interleaved repetitions. `stock`: Qlib's own generate (its own "
             "exchange); `stock, shared exchange`: the worker's stage with `workers.fast_backtest: false`; "
             "`before` / `after`: the worker's stage (fast path) in the tree before this round's changes and now, "
             "interleaved child by child; `identical`: every metric and every saved frame of the stage equal to "
             "stock's in every repetition. `load`: the highest 1-minute load average seen (2 cores, shared with "
             "other sessions' tests).", "",
             table(["instruments", "strategies", "stock s", "stock, shared exchange s", "before s", "after s",
                    "before: stock / stage", "after: stock / stage", "shared / after", "identical", "repetitions",
                    "load"], rows)]
    if cpu_rows:
        parts += ["", "The same runs in CPU seconds of the process (Qlib's background metric thread included; steadier "
                  "than wall time on a shared machine, blind to waits on the disk):", "",
                  table(["instruments", "strategies", "stock CPU s", "stock, shared exchange CPU s", "before CPU s",
                         "after CPU s", "before: stock / stage", "after: stock / stage", "shared / after",
                         "identical", "repetitions", "load"], cpu_rows)]
    if note:
        parts += ["", note]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", metavar="DIR", help="a checkout of an earlier tree: its stage interleaved")
    parser.add_argument("--profile", type=int, default=0, help="profile N instruments and exit")
    parser.add_argument("--profile-how", default="fast", choices=("stock", "shared", "fast"))
    parser.add_argument("--profile-points", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--write-from", metavar="LOG", help="render the section from the result lines of logs "
                                                             "(comma-separated)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        return profile(args.profile, args.profile_how, args.profile_points)
    if args.child:
        n, repeat, stock = json.loads(args.child)
        print("RESULT " + json.dumps(measure(n, repeat, stock)))
        return
    if args.write_from:
        results = [ast.literal_eval(x) for log in args.write_from.split(",") for x in Path(log).read_text().splitlines()
                   if x.startswith("{'instruments'")]
    else:
        results = _children([int(s) for s in args.sizes.split(",") if s], args.repeat, args.before)
    text = section(summarise(results))
    print(text)
    if not args.no_write:
        write_section("backtest_stage_bench", text)


if __name__ == "__main__":
    main()
