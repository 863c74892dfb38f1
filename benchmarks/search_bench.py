"""Search benchmark: grid vs random vs TPE vs CMA-ES on one LightGBM space, and walk-forward pruning.

Everything of qlib-ext's search is real: the embedded store, the pool, the proposer, Optuna's samplers
and pruners, the dedup hash. What runs a task is a stand-in for a worker in this process: it claims a
task, trains LightGBM (``lightgbm.train``, 1 thread, deterministic) with the task's
``model.kwargs`` on the task's train/valid segments of features computed with numpy from one seeded
synthetic Qlib dataset (past returns over 1-20 days, volume and range ratios, cross-sectionally
standardised; label: the next 2-day return), and commits the mean daily IC on the test segment. That
keeps a 48-point grid, 3 seeds x 3 searches x 16 trials and the rolling grids within minutes on 2
busy cores; the wall times are of one evaluator (a batch of 2 trials is proposed at a time, as for
2 workers), and "task-seconds" add the LightGBM CPU time of every task that ran (CPU, not wall
time: one thread per fit, so it does not depend on what else the machine is doing).

    python benchmarks/search_bench.py            # full: 3 seeds, 40 stocks
    python benchmarks/search_bench.py --quick    # 1 seed, 24 stocks
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, median, store_process, table, write_section  # noqa: E402

GRID_AXES = """\
        task.model.kwargs.learning_rate: [0.01, 0.03, 0.1, 0.3]
        task.model.kwargs.num_leaves: [4, 16, 64, 256]
        task.model.kwargs.lambda_l2: [0.0, 10.0, 100.0]
"""
"""The 48-point grid (4 x 4 x 3)."""

SPACE_AXES = """\
        task.model.kwargs.learning_rate: {dist: loguniform, low: 0.01, high: 0.3}
        task.model.kwargs.num_leaves: {dist: int, low: 4, high: 256}
        task.model.kwargs.lambda_l2: [0.0, 10.0, 100.0]
"""
"""The same ranges as distributions, for random search and the samplers."""

ROLL_AXES = """\
        task.model.kwargs.learning_rate: [0.01, 0.1]
        task.model.kwargs.num_leaves: [4, 16, 64, 256]
"""
"""8 configurations for the rolling comparison."""

WORKFLOW = """\
qlib_init: {{provider_uri: {provider}, region: cn}}
experiment_name: bench
task:
    model:
        class: LGBModel
        module_path: qlib.contrib.model.gbdt
        kwargs: {{learning_rate: 0.1, num_leaves: 16, lambda_l2: 0.0, num_boost_round: 200}}
    dataset:
        class: TinyDataset
        module_path: fixtures
        kwargs:
            segments: {segments}
    record: []
grid:
    pool: {pool}
{grid}"""


# --------------------------------------------------------------------------- the stand-in task
class Evaluator:
    """Features and labels of a synthetic dataset in memory; ``__call__`` trains and scores one task."""

    def __init__(self, provider: Path, market: str = "csi300"):
        from qlib_ext.data.qlib_format import read_calendar, read_feature, read_instruments

        self.dates = read_calendar(provider)
        codes = sorted(read_instruments(provider, market))
        t = len(self.dates)
        fields = {}
        for name in ("close", "volume", "high", "low"):
            arr = np.full((t, len(codes)), np.nan)
            for j, code in enumerate(codes):
                start, values = read_feature(provider, code, name)
                arr[start:start + len(values), j] = values
            fields[name] = arr
        self.x, self.y = _features(fields)
        self.seconds = 0.0

    def __call__(self, task: dict) -> float:
        import lightgbm as lgb

        seg, kw = task["dataset"]["kwargs"]["segments"], task["model"]["kwargs"]
        (xtr, ytr), (xva, yva), (xte, yte) = (self._rows(seg[k]) for k in ("train", "valid", "test"))
        params = {"objective": "regression", "learning_rate": kw["learning_rate"], "num_leaves": kw["num_leaves"],
                  "lambda_l2": kw["lambda_l2"], "num_threads": 1, "deterministic": True, "seed": 0,
                  "verbose": -1, "min_data_in_leaf": 50, "feature_fraction": 0.8, "bagging_fraction": 0.8,
                  "bagging_freq": 1}
        start = time.process_time()  # CPU time of the 1-thread fit: steady on a shared machine
        booster = lgb.train(params, lgb.Dataset(_flat(xtr), _flat(ytr)), num_boost_round=kw["num_boost_round"],
                            valid_sets=[lgb.Dataset(_flat(xva), _flat(yva))],
                            callbacks=[lgb.early_stopping(20, verbose=False)])
        pred = booster.predict(xte.reshape(-1, xte.shape[-1])).reshape(yte.shape)
        self.seconds += time.process_time() - start
        return _daily_ic(pred, yte)

    def _rows(self, segment: list[str]) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.searchsorted(self.dates, segment[0]), np.searchsorted(self.dates, segment[1], side="right")
        return self.x[lo:hi], self.y[lo:hi]


def _features(f: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    logc = np.log(f["close"])
    feats = [logc - _shift(logc, k) for k in (1, 2, 3, 5, 10, 20)]
    vol = np.log1p(f["volume"])
    feats.append(vol - _rolling_mean(vol, 20))
    feats.append((f["high"] - f["low"]) / f["close"])
    x = np.stack([_zscore(a) for a in feats], axis=-1)
    y = _zscore(_shift(logc, -2) - logc)
    return x, y


def _shift(a: np.ndarray, k: int) -> np.ndarray:
    out = np.full_like(a, np.nan)
    if k > 0:
        out[k:] = a[:-k]
    else:
        out[:k] = a[-k:]
    return out


def _rolling_mean(a: np.ndarray, k: int) -> np.ndarray:
    c = np.nancumsum(np.nan_to_num(a), axis=0)
    out = np.full_like(a, np.nan)
    out[k:] = (c[k:] - c[:-k]) / k
    return out


def _zscore(a: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a - np.nanmean(a, axis=1, keepdims=True)) / np.nanstd(a, axis=1, keepdims=True)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a.reshape(-1)


def _daily_ic(pred: np.ndarray, label: np.ndarray) -> float:
    ics = []
    for p, y in zip(pred, label, strict=True):
        ok = np.isfinite(p) & np.isfinite(y)
        if ok.sum() > 5:
            ics.append(float(np.corrcoef(p[ok], y[ok])[0, 1]))
    return float(np.mean(ics))


# --------------------------------------------------------------------------- driving the pool
def drain(tm, evaluate: Evaluator) -> int:
    """Claim and run every waiting task (the worker stand-in); return how many ran."""
    n = 0
    while (claim := tm.claim(600, worker="bench:1")) is not None:
        tm.commit(claim, {"run_id": None, "metrics": {"IC": evaluate(claim.task["def"])}})
        n += 1
    return n


def load(tmp: Path, provider: Path, pool: str, grid: str, segments: dict):
    from qlib_ext.workflow.load import load_workflow

    path = tmp / f"{pool}.yaml"
    path.write_text(WORKFLOW.format(provider=provider, pool=pool, grid=grid, segments=segments))
    return load_workflow(path)


def run_expanded(db, wf, evaluate: Evaluator) -> dict:
    """grid / random (and rolling without pruning): submit every task, run them all."""
    from qlib_ext.pool.manager import GridTaskManager
    from qlib_ext.workflow.expand import expand

    tm = GridTaskManager(wf.pool, db)
    before, start = evaluate.seconds, time.perf_counter()
    tasks = expand(wf)
    tm.create_tasks(tasks)
    ran = drain(tm, evaluate)
    by_config: dict[str, list[float]] = {}
    for res in tm.results():
        by_config.setdefault(res["meta"]["config_id"], []).append(res["metrics"]["IC"])
    values = {c: float(np.mean(v)) for c, v in by_config.items()}
    return {"values": values, "best": max(values.values()), "trials": len(values), "tasks": ran,
            "wall": time.perf_counter() - start, "task_s": evaluate.seconds - before, "curve": None}


def run_proposed(db, wf, evaluate: Evaluator, batch: int = 2) -> dict:
    """A sampler search, or a grid with pruning: the proposer and the stand-in worker take turns."""
    from qlib_ext.pool.manager import GridTaskManager
    from qlib_ext.search.proposer import Proposer
    from qlib_ext.search.summary import best_so_far
    from qlib_ext.search.trials import TrialStore

    tm = GridTaskManager(wf.pool, db)
    before, start = evaluate.seconds, time.perf_counter()
    proposer, ran = Proposer(wf, db, batch=batch), 0
    while not proposer.step():
        ran += drain(tm, evaluate)
    docs = TrialStore(db, wf.pool).all()
    done = {d["config_id"]: d["value"] for d in docs if d["state"] == "complete"}
    curve = best_so_far(docs)
    return {"values": done, "best": max(done.values()), "trials": len(docs), "tasks": ran,
            "wall": time.perf_counter() - start, "task_s": evaluate.seconds - before, "curve": curve,
            "pruned": sum(d["state"] == "pruned" for d in docs)}


def best_at(curve: list[tuple[int, float]], k: int) -> float:
    """Best value among the first ``k`` trials of a best-so-far curve."""
    vals = [v for n, v in curve if n < k]
    return vals[-1] if vals else float("nan")


# --------------------------------------------------------------------------- the two comparisons
def samplers(db, tmp: Path, provider: Path, evaluate: Evaluator, seeds: list[int], n_trials: int) -> str:
    segs = {"train": ["2015-02-02", "2018-06-29"], "valid": ["2018-07-02", "2019-03-29"],
            "test": ["2019-04-01", "2020-09-25"]}
    grid = run_expanded(db, load(tmp, provider, "grid48", "    params:\n" + GRID_AXES, segs), evaluate)
    print(f"grid: best {grid['best']:.4f} of {grid['trials']} in {grid['wall']:.1f}s", flush=True)
    rows, results = [], {"grid": [grid]}
    for search in ("random", "tpe", "cmaes"):
        results[search] = []
        for seed in seeds:
            head = f"    search: {search}\n    n_trials: {n_trials}\n    seed: {seed}\n"
            if search != "random":
                head += "    batch: 2\n    objective: {metric: IC, direction: maximize}\n"
            wf = load(tmp, provider, f"{search}-{seed}", head + "    params:\n" + SPACE_AXES, segs)
            res = (run_expanded if search == "random" else run_proposed)(db, wf, evaluate)
            if search == "random":  # expansion order is the draw order
                order = [t["qlib_ext"]["config_id"] for t in _expand(wf)]
                res["curve"] = _curve([res["values"][c] for c in order])
            results[search].append(res)
            print(f"{search} seed {seed}: best {res['best']:.4f} ({res['best'] / grid['best']:.1%} of grid) "
                  f"in {res['wall']:.1f}s", flush=True)
    g = grid["best"]
    rows.append(["grid (all 48)", grid["trials"], "-", "-", f"{g:.4f}", "100 %", f"{grid['wall']:.1f}",
                 f"{grid['task_s']:.1f}"])
    for search in ("random", "tpe", "cmaes"):
        rs = results[search]
        rows.append([f"{search} ({n_trials})", n_trials,
                     f"{median([best_at(r['curve'], 4) for r in rs]):.4f}",
                     f"{median([best_at(r['curve'], 8) for r in rs]):.4f}",
                     f"{median([r['best'] for r in rs]):.4f}", f"{median([r['best'] / g for r in rs]):.1%}",
                     f"{median([r['wall'] for r in rs]):.1f}", f"{median([r['task_s'] for r in rs]):.1f}"])
    ratios = [r["best"] / g for r in results["tpe"]]
    verdict = "met" if median(ratios) >= 0.98 and n_trials <= 48 / 3 else "missed"
    return "\n\n".join([
        table(["search", "trials", "best @4", "best @8", "best", "of grid best", "wall s", "task-s"], rows),
        f"Medians over seeds {seeds}. TPE reaches {median(ratios):.1%} of the full grid's best IC with "
        f"{n_trials} trials (per seed: {', '.join(f'{r:.1%}' for r in ratios)}); target >= 98 % with <= 16 "
        f"trials: **{verdict}**.",
    ])


PRUNERS = [("successive_halving", 2), ("successive_halving", 3), ("median", 2), ("median", 3),
           ("wilcoxon", 2), ("wilcoxon", 3)]
"""(method, min_windows) pairs of the rolling comparison."""


def pruning(db, tmp: Path, provider: Path, evaluate: Evaluator) -> str:
    segs = {"train": ["2015-02-02", "2017-06-30"], "valid": ["2017-07-03", "2017-12-29"],
            "test": ["2018-01-02", "2019-05-20"]}
    roll = "    rolling: {step: 60}\n"
    full = run_expanded(db, load(tmp, provider, "roll-full", "    params:\n" + ROLL_AXES + roll, segs), evaluate)
    top = sorted(full["values"], key=full["values"].get, reverse=True)
    names = {t["qlib_ext"]["config_id"]: t["qlib_ext"]["run_name"].rsplit(" w", 1)[0]
             for t in _expand(load(tmp, provider, "roll-names", "    params:\n" + ROLL_AXES + roll, segs))}
    print(f"rolling without pruning: {full['tasks']} tasks, {full['task_s']:.1f} task-s", flush=True)
    rows = [["none", "-", full["tasks"], 0, f"{full['task_s']:.1f}", "-", names[top[0]], "-"]]
    verdicts = []
    for method, min_windows in PRUNERS:
        grid = (f"    objective: {{metric: IC, direction: maximize}}\n    params:\n{ROLL_AXES}{roll}"
                f"    prune: {{method: {method}, min_windows: {min_windows}}}\n")
        res = run_proposed(db, load(tmp, provider, f"roll-{method}-{min_windows}", grid, segs), evaluate)
        kept = sorted(res["values"], key=res["values"].get, reverse=True)
        saved = 1 - res["task_s"] / full["task_s"]
        same = bool(kept) and kept[0] == top[0]
        top3 = len(set(kept[:3]) & set(top[:3]))
        verdicts.append(f"{method}/{min_windows} **{'met' if saved >= 0.4 and same and top3 >= 2 else 'missed'}**")
        rows.append([method, min_windows, f"{res['tasks']} ({1 - res['tasks'] / full['tasks']:.0%} fewer)",
                     res["pruned"], f"{res['task_s']:.1f}", f"{saved:.0%}",
                     names[kept[0]] + (" (same)" if same else " (not the same)"), f"{top3} of 3"])
        print(f"{method}/{min_windows}: {res['tasks']} tasks, pruned {res['pruned']}, saved {saved:.0%}, "
              f"top-1 same {same}, top-3 kept {top3}", flush=True)
    windows = full["tasks"] // max(full["trials"], 1)
    ranking = ", ".join(f"{names[c]} {full['values'][c]:.4f}" for c in top)
    return "\n\n".join([
        f"Rolling: {full['trials']} configurations x {windows} windows (60 trading days each, expanding); a "
        "configuration's objective is its mean IC over windows.",
        table(["pruning", "min_windows", "tasks run", "configs pruned", "task-s", "task-s saved", "top-1",
               "top-3 kept"], rows),
        f"Without pruning, best first: {ranking}.",
        "Target: >= 40 % task-seconds saved with the same top-1 and >= 2 of the top 3: " + ", ".join(verdicts) + ".",
    ])


def _expand(wf):
    from qlib_ext.workflow.expand import expand

    return expand(wf)


def _curve(values: list[float]) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    for i, v in enumerate(values):
        if not out or v > out[-1][1]:
            out.append((i, v))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 24 stocks (a smoke run)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per search (default 3)")
    parser.add_argument("--stocks", type=int, default=40, help="synthetic instruments (default 40)")
    parser.add_argument("--trials", type=int, default=16, help="trials of random/TPE/CMA-ES (default 16)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = parser.parse_args()
    seeds = list(range(1 if args.quick else args.seeds))
    stocks = 24 if args.quick else args.stocks
    from qlib_ext.data.synth import write_synthetic
    from qlib_ext.pool.manager import open_db

    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp, store_process() as url:
        os.environ["QLIB_EXT_HOME"] = tmp
        provider = Path(tmp) / "synth"
        write_synthetic(provider, instruments=stocks, days=1500, start="2015-01-05", seed=0)
        evaluate = Evaluator(provider)
        db = open_db(url, "search_bench")
        start = time.perf_counter()
        part1 = samplers(db, Path(tmp), provider, evaluate, seeds, args.trials)
        part2 = pruning(db, Path(tmp), provider, evaluate)
        total = time.perf_counter() - start
    text = "\n\n".join([
        "## Search",
        machine_line() + f"; {stocks} synthetic stocks x 1,500 days, {total:.0f} s in all"
        + (" (--quick: one seed)" if args.quick else ""),
        "`python benchmarks/search_bench.py` (`--quick`: one seed, 24 stocks): the store, pool, proposer, Optuna "
        "samplers and pruners are qlib-ext's; "
        "each task is a LightGBM fit (1 thread) on numpy features of the synthetic data run by an in-process "
        "stand-in for a worker, scored by its mean daily IC on the test segment. Wall times are of that one "
        "evaluator; task-s adds the LightGBM CPU seconds of every task that ran (1 thread each).",
        "### Grid vs random vs TPE vs CMA-ES (one space, 48-point grid)",
        part1,
        "### Walk-forward pruning",
        part2,
    ])
    print(text)
    if not args.no_write:
        write_section("search_bench", text)


if __name__ == "__main__":
    main()
