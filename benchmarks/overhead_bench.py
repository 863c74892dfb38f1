"""Start-up and wrap-up of a small grid (issue 24): 40 OLS tasks, ``qlib-ext run -n 2``, where the time goes.

A 40-point grid of Qlib's ``LinearModel`` (OLS; ``fit_intercept`` x 20 values of SigAnaRecord's ``ann_scaler``:
40 distinct tasks of equal work) on Alpha158 over 20 synthetic stocks x 400 days (``qlib-ext data
synth``), each task with SignalRecord + SigAnaRecord + PortAnaRecord, run by ``qlib-ext run -n 2``. On a warm machine
(the default): one QLIB_EXT_HOME per code version, kept across its runs, with a first unmeasured run, so the
embedded store is up, the MLflow database exists and the cache holds the dataset and exchange, as for a
researcher's next grid; each run submits a new pool. ``--fresh``: a new home per run (store start, MLflow
database creation and the cache build measured too). Per run:

* wall: command start to exit;
* stage seconds: the sum over tasks of the ``time.*_s`` timings each task committed (its pool document), and
  the compute part of them (everything but ``data``, which is mostly waiting for the cache warm-up);
* tasks: first task claimed (``started_at``) to last task committed (``finished_at``), store clock;
* start-up: command start to the first claim; wrap-up: the last commit to the command's exit;
* efficiency: stage seconds / workers / wall, and compute stage seconds / workers / wall (the issue's 0.6 target);
* plots: when the grid plots were in MLflow, seconds after the command exited (drawn in the background by the
  new code; the next run starts only after them, so they never overlap a measured run).

``--before PATH`` runs a second checkout's code (e.g. main before a change) interleaved with this one, so
both see the same machine; ``--repeat`` gives medians; ``--write`` puts the table into docs/performance.md.

    python benchmarks/overhead_bench.py [--repeat 3] [--before /path/to/old/checkout] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_line, median, table, write_section  # noqa: E402

WORKERS = 2
"""``qlib-ext run -n``: the issue's setting on this 2-core machine."""

POOL = "overhead"

WORKFLOW = """\
qlib_init:
    provider_uri: "{provider}"
    region: cn
market: &market csi300
benchmark: &benchmark SH000300
data_handler_config: &data_handler_config
    start_time: 2015-01-05
    end_time: 2016-07-15
    fit_start_time: 2015-03-30
    fit_end_time: 2015-12-04
    instruments: *market
    infer_processors:
        - {{class: RobustZScoreNorm, kwargs: {{fields_group: feature, clip_outlier: true}}}}
        - {{class: Fillna, kwargs: {{fields_group: feature}}}}
    learn_processors:
        - {{class: DropnaLabel}}
        - {{class: CSRankNorm, kwargs: {{fields_group: label}}}}
port_analysis_config: &port_analysis_config
    strategy:
        class: TopkDropoutStrategy
        module_path: qlib.contrib.strategy
        kwargs: {{signal: <PRED>, topk: 10, n_drop: 2}}
    backtest:
        start_time: 2016-03-28
        end_time: 2016-07-13
        account: 100000000
        benchmark: *benchmark
        exchange_kwargs: {{limit_threshold: 0.095, deal_price: close, open_cost: 0.0005, close_cost: 0.0015,
                          min_cost: 5}}
task:
    model:
        class: LinearModel
        module_path: qlib.contrib.model.linear
        kwargs: {{estimator: ols, fit_intercept: false}}
    dataset:
        class: DatasetH
        module_path: qlib.data.dataset
        kwargs:
            handler: {{class: Alpha158, module_path: qlib.contrib.data.handler, kwargs: *data_handler_config}}
            segments:
                train: [2015-03-30, 2015-12-04]
                valid: [2015-12-07, 2016-03-25]
                test: [2016-03-28, 2016-07-13]
    record:
        - {{class: SignalRecord, module_path: qlib.workflow.record_temp,
           kwargs: {{model: <MODEL>, dataset: <DATASET>}}}}
        - {{class: SigAnaRecord, module_path: qlib.workflow.record_temp, kwargs: {{ana_long_short: true,
                                                                                 ann_scaler: 252}}}}
        - {{class: PortAnaRecord, module_path: qlib.workflow.record_temp, kwargs: {{config: *port_analysis_config}}}}
grid:
    pool: {pool}
    search: grid
    params:
        task.model.kwargs.fit_intercept: [true, false]
        task.record.1.kwargs.ann_scaler: [{scalers}]
"""


@dataclass
class Measured:
    """One ``qlib-ext run`` of the grid."""

    wall: float
    stages: dict[str, float]  # stage name -> seconds summed over tasks
    tasks_span: float  # first claim -> last commit, s
    start_up: float  # command start -> first claim, s
    wrap_up: float  # last commit -> command exit, s
    done: int
    load: float  # 1-minute load average at the start
    plots_after: float = 0.0  # the grid plots in MLflow this long after the command's exit, s

    @property
    def stage_s(self) -> float:
        return sum(self.stages.values())

    @property
    def compute_s(self) -> float:
        return sum(v for k, v in self.stages.items() if k != "data")


def workflow_text(provider: Path, pool: str = POOL) -> str:
    scalers = ", ".join(str(233 + i) for i in range(20))
    return WORKFLOW.format(provider=provider, pool=pool, scalers=scalers)


def _epoch(t: dt.datetime) -> float:
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


def _pool_docs(home: Path, pool: str) -> list[dict]:
    """The pool's task documents, read from the home's embedded store."""
    from qlib_ext.pool.database import open_db
    from qlib_ext.store import running_url

    url = running_url(home / "store")
    return [] if url is None else list(open_db(url)[pool].find({}, {"def": 0, "res": 0}))


def stop_store(home: Path) -> None:
    from qlib_ext.store import stop

    if (home / "store").exists():
        stop(home / "store")


def _plots_in_mlflow(home: Path, pool: str, timeout: float = 600.0) -> float:
    """Wait until the grid run of ``pool`` holds its plots; the time of that moment (epoch s)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name(pool)
    grid = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("qlib_ext.row") == "grid"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(a.path == "plots" for a in client.list_artifacts(grid[0].info.run_id)):
            return time.time()
        time.sleep(0.2)
    raise RuntimeError(f"no grid plots for pool {pool} in {home} after {timeout:.0f}s")


def measure(code: Path, home: Path, pool: str, provider: Path, log: Path) -> Measured:
    """One ``qlib-ext -v run -n 2`` of ``code`` (a checkout) in ``home``, a new pool ``pool``."""
    home.mkdir(parents=True, exist_ok=True)
    yaml_path = log.with_suffix(".yaml")
    yaml_path.write_text(workflow_text(provider, pool))
    env = {**os.environ, "PYTHONPATH": str(code), "QLIB_EXT_HOME": str(home)}
    env.pop("QLIB_EXT_GRID_PLOTS", None)
    cmd = [sys.executable, "-m", "qlib_ext", "-v", "run", str(yaml_path), "-n", str(WORKERS),
           "--provider-uri", str(provider)]
    load = os.getloadavg()[0]
    t0 = time.time()
    with open(log, "wb") as out:
        code_ = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=home).returncode
    t1 = time.time()
    if code_:
        raise RuntimeError(f"qlib-ext run exited {code_}; see {log}")
    plots = _plots_in_mlflow(home, pool)
    docs = [d for d in _pool_docs(home, pool) if d.get("status") == "done"]
    stages: dict[str, float] = {}
    for d in docs:
        for key, value in ((d.get("outcome") or {}).get("timings") or {}).items():
            if key.startswith("time.") and key.endswith("_s"):
                stages[key[5:-2]] = stages.get(key[5:-2], 0.0) + float(value)
    first = min(_epoch(d["started_at"]) for d in docs)
    last = max(_epoch(d["finished_at"]) for d in docs)
    return Measured(t1 - t0, stages, last - first, first - t0, t1 - last, len(docs), load, plots - t1)


def summarise(runs: list[Measured]) -> dict[str, float]:
    """Medians over repeats of every figure of the table."""
    keys = sorted({k for m in runs for k in m.stages})
    out = {k: median([m.stages.get(k, 0.0) for m in runs]) for k in keys}
    out.update(wall=median([m.wall for m in runs]), stage_s=median([m.stage_s for m in runs]),
               compute_s=median([m.compute_s for m in runs]), span=median([m.tasks_span for m in runs]),
               start_up=median([m.start_up for m in runs]), wrap_up=median([m.wrap_up for m in runs]),
               eff=median([m.stage_s / WORKERS / m.wall for m in runs]),
               eff_compute=median([m.compute_s / WORKERS / m.wall for m in runs]),
               load=median([m.load for m in runs]), done=median([float(m.done) for m in runs]),
               plots_after=median([m.plots_after for m in runs]))
    return out


def render(results: dict[str, dict[str, float]], repeat: int, fresh: bool) -> str:
    header = ["code", "wall s", "start-up s", "tasks (first start to last end) s", "wrap-up s", "stage s",
              "compute stage s", "stages / workers / wall", "compute / workers / wall",
              "plots in MLflow, s after exit", "load (1-min, start)"]
    rows = [[name, f"{r['wall']:.1f}", f"{r['start_up']:.1f}", f"{r['span']:.1f}", f"{r['wrap_up']:.1f}",
             f"{r['stage_s']:.1f}", f"{r['compute_s']:.1f}", f"{r['eff']:.2f}", f"{r['eff_compute']:.2f}",
             f"{r['plots_after']:.1f}", f"{r['load']:.1f}"] for name, r in results.items()]
    stage_keys = sorted({k for r in results.values() for k in r if k in ("data", "fit", "signal", "backtest",
                                                                          "validity")})
    stage_rows = [[name, *(f"{r.get(k, 0.0):.1f}" for k in stage_keys)] for name, r in results.items()]
    return "\n\n".join([
        f"{machine_line()}; 40 OLS tasks (LinearModel, Alpha158, 20 synthetic stocks x 400 days, SignalRecord + "
        f"SigAnaRecord + PortAnaRecord), `qlib-ext run -n {WORKERS}`, "
        + ("a fresh home per run (store start, MLflow database creation, cache build included)" if fresh else
           "warm machine (store up, MLflow database made, dataset and exchange cached by an unmeasured first run)")
        + f"; medians of {repeat} interleaved repetition(s)",
        table(header, rows),
        "Stage seconds summed over the 40 tasks (medians):",
        table(["code", *stage_keys], stage_rows),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="repetitions (medians), interleaved with --before")
    ap.add_argument("--before", type=Path, help="a checkout whose code runs as 'before', interleaved")
    ap.add_argument("--fresh", action="store_true", help="a new QLIB_EXT_HOME per run (nothing warm)")
    ap.add_argument("--work", type=Path, help="working directory, kept (default: a new temp dir, removed)")
    ap.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qlib-ext-overhead-"))
    provider = work / "data"
    if not (provider / "calendars").exists():
        subprocess.run([sys.executable, "-m", "qlib_ext", "data", "synth", "--out", str(provider), "--instruments",
                        "20", "--days", "400"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    codes = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    homes = {name: work / f"home-{name}" for name in codes}
    runs: dict[str, list[Measured]] = {name: [] for name in codes}
    try:
        if not args.fresh:
            for name, code in codes.items():
                measure(code, homes[name], "overhead_warm_up", provider, work / f"{name}-warm-up.log")
        for rep in range(args.repeat):
            for name, code in (list(codes.items()) if rep % 2 == 0 else list(codes.items())[::-1]):
                home = work / f"home-{name}-{rep}" if args.fresh else homes[name]
                try:
                    m = measure(code, home, f"{POOL}_{rep}", provider, work / f"{name}-{rep}.log")
                finally:
                    if args.fresh:
                        stop_store(home)
                runs[name].append(m)
                print(f"rep {rep + 1}/{args.repeat} {name}: wall {m.wall:.1f}s start-up {m.start_up:.1f}s tasks "
                      f"{m.tasks_span:.1f}s wrap-up {m.wrap_up:.1f}s stages {m.stage_s:.1f}s (compute "
                      f"{m.compute_s:.1f}s) plots +{m.plots_after:.1f}s done {m.done} load {m.load:.1f}",
                      flush=True)
    finally:
        for home in work.glob("home-*"):
            stop_store(home)
    order = [n for n in ("before", "after") if n in runs]
    text = render({n: summarise(runs[n]) for n in order}, args.repeat, args.fresh)
    print(f"\nwork dir {work}\n\n{text}")
    if args.write:
        write_section("overhead_bench", text)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
