"""Whole-grid wall time, side by side on one machine:

* a loop of plain ``qrun`` over the grid's points (what users do today),
* ``qlib-ext run`` with 1 worker and with ``cores`` workers, cache off and on,
* ``cores`` workers with oversubscribed threads (every worker uses all cores) vs controlled,

each in a fresh QLIB_EXT_HOME (fresh store, MLflow DB and cache), repeated and reported as medians.
Also per-stage time and peak RSS per worker, read back from the runs' MLflow metrics.

    python benchmarks/scaling_bench.py [--quick] [--repeat N]

--quick: 60 stocks, workflows/quickstart.yaml (4 tasks). Default: 300 stocks, workflows/lgb_grid.yaml (8 tasks).
Writes its section of docs/performance.md and docs/performance_scaling.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import ROOT, machine_line, median, table, write_section

CORES = os.cpu_count() or 1


def make_data(root: Path, instruments: int) -> Path:
    from qlib_ext.data.synth import write_synthetic

    out = root / "data"
    write_synthetic(out, instruments=instruments, days=1500, start="2015-01-05", seed=0, market="csi300")
    return out


def qrun_yamls(workflow: Path, provider: Path, outdir: Path, mlflow_uri: str) -> list[Path]:
    """One plain qrun YAML per grid point: the same tasks qlib-ext runs, as a user would write them."""
    from qlib_ext.workflow.expand import expand
    from qlib_ext.workflow.load import load_workflow

    wf = load_workflow(workflow)
    paths = []
    for i, task in enumerate(expand(wf, provider_uri=str(provider))):
        task = {k: v for k, v in task.items() if k != "qlib_ext"}
        config = {"qlib_init": {"provider_uri": str(provider), "region": "cn", "exp_manager": {
            "class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
            "kwargs": {"uri": mlflow_uri, "default_exp_name": "Experiment"}}},
            "experiment_name": "qrun_loop", "task": task}
        path = outdir / f"point{i}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        paths.append(path)
    return paths


def run_qrun_loop(workflow: Path, provider: Path) -> float:
    qrun = Path(sys.executable).parent / "qrun"
    with tempfile.TemporaryDirectory(prefix="bench-qrun-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        paths = qrun_yamls(workflow, provider, Path(tmp), uri)
        start = time.perf_counter()
        for path in paths:
            subprocess.run([str(qrun), str(path)], cwd=tmp, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def run_qlib_ext(workflow: Path, provider: Path, workers: int, *flags: str,
                 cache: Path | None = None) -> tuple[float, list[dict]]:
    """Wall time of ``qlib-ext run`` in a fresh home, and the runs' metrics.

    ``cache``: a directory that receives the run's cache when it is empty (a cold run) and is used as
    the run's cache when it is not (a warm run: a later grid over the same data).
    """
    import mlflow

    with tempfile.TemporaryDirectory(prefix="bench-run-") as home:
        env = {**os.environ, "QLIB_EXT_HOME": home}
        warm = cache is not None and cache.is_dir() and any(cache.iterdir())
        if warm:
            shutil.copytree(cache, Path(home) / "cache")
        cmd = [sys.executable, "-m", "qlib_ext", "run", str(workflow), "-n", str(workers),
               "--provider-uri", str(provider), *flags]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        subprocess.run([sys.executable, "-m", "qlib_ext", "store", "stop"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        if cache is not None and not warm:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.move(Path(home) / "cache", cache)
        client = mlflow.MlflowClient(f"sqlite:///{home}/mlflow.db")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        metrics = [{**r.data.metrics, "worker": r.data.tags.get("qlib_ext.worker")} for r in runs]
        return elapsed, metrics


def stage_summary(metrics: list[dict], runs: int = 1) -> dict[str, float]:
    """Median stage times per task; peak RSS per worker (median) and of all workers of one run (mean over ``runs``)."""
    keys = ["time.data_s", "time.fit_s", "time.signal_s", "time.backtest_s"]
    out = {k: median([m[k] for m in metrics if k in m]) for k in keys}
    by_worker: dict[str, float] = {}
    for m in metrics:
        by_worker[m["worker"]] = max(by_worker.get(m["worker"], 0.0), m.get("peak_rss_mb", 0.0))
    out["rss_per_worker"] = median(list(by_worker.values()))
    out["rss_total"] = sum(by_worker.values()) / runs
    return out


def plot(rows: dict[str, float], stages: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    base = rows["qlib-ext 1 worker, no cache"]
    workers = [1, CORES]
    ax1.plot(workers, [1, base / rows[f"qlib-ext {CORES} workers, no cache"]], "o-", label="no cache")
    ax1.plot(workers, [base / rows["qlib-ext 1 worker, cache"], base / rows[f"qlib-ext {CORES} workers, cache (cold)"]],
             "s-", label="cache")
    ax1.plot(workers, workers, "k--", lw=0.8, label="linear")
    ax1.set(xlabel="workers", ylabel="speed-up vs 1 worker, no cache", title="Grid speed-up")
    ax1.legend()
    names = list(stages)
    bottom = [0.0] * len(names)
    for key in ["time.data_s", "time.fit_s", "time.signal_s", "time.backtest_s"]:
        vals = [stages[n][key] for n in names]
        ax2.bar(names, vals, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set(ylabel="median seconds per task", title="Stage time per task")
    ax2.tick_params(axis="x", labelrotation=15)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 stocks, 4-task quickstart grid")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 1 quick, 3 full)")
    parser.add_argument("--cases", nargs="+", default=None, choices=["qrun", "1nc", "1c", "nc", "c", "warm", "over"],
                        help="only these cases, in this order (default: all; warm needs c before it)")
    parser.add_argument("--once", nargs="+", default=[], metavar="CASE",
                        help="cases run in the first repetition only (e.g. qrun: the slowest)")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    workflow = ROOT / "workflows" / ("quickstart.yaml" if args.quick else "lgb_grid.yaml")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        provider = make_data(Path(tmp), 60 if args.quick else 300)
        kept = Path(tmp) / "kept-cache"  # the cold run's cache, reused by the warm run of the same repetition
        cases = {  # short key: (row name, how to run it)
            "qrun": ("qrun loop", lambda: (run_qrun_loop(workflow, provider), [])),
            "1nc": ("qlib-ext 1 worker, no cache", lambda: run_qlib_ext(workflow, provider, 1, "--no-cache")),
            "1c": ("qlib-ext 1 worker, cache", lambda: run_qlib_ext(workflow, provider, 1)),
            "nc": (f"qlib-ext {CORES} workers, no cache",
                   lambda: run_qlib_ext(workflow, provider, CORES, "--no-cache")),
            "c": (f"qlib-ext {CORES} workers, cache (cold)",
                  lambda: run_qlib_ext(workflow, provider, CORES, cache=kept)),
            "warm": (f"qlib-ext {CORES} workers, cache (warm)",
                     lambda: run_qlib_ext(workflow, provider, CORES, cache=kept)),
            "over": (f"qlib-ext {CORES} workers, cache, {CORES} threads each (oversubscribed)",
                     lambda: run_qlib_ext(workflow, provider, CORES, "--threads", str(CORES))),
        }
        keys = args.cases or list(cases)
        once = {cases[k][0] for k in args.once}
        cases = dict(cases[k] for k in keys)
        times: dict[str, list[float]] = {name: [] for name in cases}
        metrics: dict[str, list[dict]] = {name: [] for name in cases}
        for rep in range(repeat):  # interleaved, so drift in machine speed hits every case alike
            shutil.rmtree(kept, ignore_errors=True)
            for name, case in cases.items():
                if rep and name in once:
                    continue
                elapsed, ms = case()
                times[name].append(elapsed)
                metrics[name].extend(ms)
                print(f"rep {rep + 1}/{repeat}  {name}: {elapsed:.1f}s", flush=True)
    med = {name: median(ts) for name, ts in times.items()}
    loop, one, many = (med.get(n) for n in ("qrun loop", "qlib-ext 1 worker, no cache",
                                             f"qlib-ext {CORES} workers, no cache"))
    rows = []
    for name, t in med.items():
        workers = CORES if f"{CORES} workers" in name else 1
        rows.append([name, f"{t:.1f}", *(f"{base / t:.2f}x" if base else "-" for base in (loop, one, many)),
                     f"{one / t / workers * 100:.0f} %" if one and "qrun" not in name else "-"])
    stages = {n: stage_summary(m, len(times[n])) for n, m in metrics.items() if m}
    stage_rows = [[n, *(f"{s[k]:.1f}" for k in ["time.data_s", "time.fit_s", "time.signal_s", "time.backtest_s"]),
                   f"{s['rss_per_worker']:.0f}", f"{s['rss_total']:.0f}"] for n, s in stages.items()]
    png = ROOT / "docs" / "performance_scaling.png"
    size = "quick: 60 stocks, quickstart.yaml, 4 tasks" if args.quick else "300 stocks, lgb_grid.yaml, 8 tasks"
    if {"qlib-ext 1 worker, no cache", "qlib-ext 1 worker, cache"} <= set(med):
        plot(med, stages, png)
    text = "\n\n".join([
        f"## Grid wall time ({size})",
        machine_line() + f"; median of {repeat} interleaved repetition(s)"
        + (f" ({', '.join(sorted(once))}: 1)" if once and repeat > 1 else "") + ", each in a fresh home (fresh store, "
        "MLflow DB and cache; the warm case gets a copy of the cache its repetition's cold run built)",
        table(["how", "wall s", "vs qrun loop", "vs 1 worker", f"vs {CORES} workers no cache", "parallel efficiency"],
              rows),
        "Parallel efficiency = speed-up over 1 worker (no cache) / workers: above 100 % means the cache "
        "removed repeated work on top of the parallelism.",
        "### Per task: stage medians (s) and peak RSS per worker (MB)",
        table(["how", "data", "fit", "signal", "backtest", "RSS/worker", "RSS total"], stage_rows),
        f"![speed-up and stage times]({png.name})",
    ])
    print(text)
    write_section("scaling_bench_quick" if args.quick else "scaling_bench", text)


if __name__ == "__main__":
    main()
