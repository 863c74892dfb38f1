"""The same 24-trial LightGBM search run five ways, side by side (issue 24's standing peer benchmark).

One synthetic dataset (``qlib-ext data synth``: 100 stocks; Alpha158 over 800 days), one base workflow (LightGBM,
100 rounds, SignalRecord + SigAnaRecord + PortAnaRecord, made from ``workflows/quickstart.yaml`` with longer
dates), the same 24 points (3 learning rates x 2 leaf counts x 4 L2 penalties):

- ``qrun``: the loop researchers ran before, one YAML per point, one ``qrun`` after the other.
- ``optuna-train``: Optuna, 2 processes on one journal storage, ``GridSampler`` over the 24 points, the objective
  Qlib's ``task_train`` (the same records and MLflow logging as ours).
- ``optuna-lean``: Optuna as in Qlib's ``examples/hyperparameter`` (the dataset once per process, fit + IC only:
  no records, no backtest, no run artifacts), 2 processes.
- ``grid``: ``qlib-ext run -n 2`` of the 24 points (a fresh ``QLIB_EXT_HOME``: the cache cold).
- ``tpe``: ``qlib-ext run -n 2`` of ``search: tpe``, 24 trials over the same ranges.

The peers run as a user would run them (Qlib's default ``./mlruns`` store, LightGBM's default threads). Rounds are
interleaved, the order alternating; the table gives medians. The *limit* of the search is its compute stages
(fit + signal + backtest + validity, summed over the grid's tasks, from the pool) divided over the 2 workers, plus
one dataset build (timed alone in a child process).

    python benchmarks/peer_bench.py [--repeat 3] [--only grid --only qrun ...] [--write]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_line, median, table, write_section  # noqa: E402

SPACE = {"learning_rate": [0.03, 0.1, 0.3], "num_leaves": [16, 64], "lambda_l2": [0.0, 10.0, 100.0, 580.9768]}
"""The 24 points (every combination)."""

TPE_SPACE = {"task.model.kwargs.learning_rate": {"dist": "loguniform", "low": 0.03, "high": 0.3},
             "task.model.kwargs.num_leaves": {"dist": "int", "low": 16, "high": 64},
             "task.model.kwargs.lambda_l2": SPACE["lambda_l2"]}
"""The TPE search's ranges: the grid's, continuous where the grid's axis is numeric."""

DATES = {"start": "2017-07-03", "fit_end": "2019-06-28", "valid": ["2019-07-01", "2019-12-31"],
         "test": ["2020-01-02", "2020-09-25"]}
"""800 trading days of the synthetic calendar: 2 years train, half a year valid, 9 months test."""

QUICK_SPACE = {"learning_rate": [0.1], "num_leaves": [16, 64], "lambda_l2": [0.0, 10.0]}
"""``--quick``: 4 of the points (a check that every case runs, not a measurement)."""

CASES = ("qrun", "optuna-train", "optuna-lean", "grid", "tpe")
COMPUTE = ("fit", "signal", "backtest", "validity")
"""The compute stages whose sum, over the workers, bounds the search's wall time from below."""


def base_workflow(data: Path) -> dict:
    """``workflows/quickstart.yaml`` on ``data`` with this benchmark's dates and without its grid."""
    text = (ROOT / "workflows" / "quickstart.yaml").read_text()
    text = re.sub(r'provider_uri: ".*?"', f'provider_uri: "{data}"', text)
    wf = yaml.safe_load(text)
    wf.pop("grid")
    h = wf["data_handler_config"]
    h["start_time"] = h["fit_start_time"] = DATES["start"]
    h["fit_end_time"], h["end_time"] = DATES["fit_end"], DATES["test"][1]
    task = wf["task"]
    task["dataset"]["kwargs"]["handler"]["kwargs"] = h
    task["dataset"]["kwargs"]["segments"] = {"train": [DATES["start"], DATES["fit_end"]], "valid": DATES["valid"],
                                             "test": DATES["test"]}
    port = task["record"][2]["kwargs"]["config"]
    port["backtest"]["start_time"], port["backtest"]["end_time"] = DATES["test"]
    return wf


def points() -> list[dict]:
    import itertools

    return [dict(zip(SPACE, values, strict=True)) for values in itertools.product(*SPACE.values())]


def run_qrun(work: Path, wf: dict) -> dict:
    qrun = Path(sys.executable).with_name("qrun")
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
    for i, p in enumerate(points()):
        w = copy.deepcopy(wf)
        w["task"]["model"]["kwargs"].update(p)
        (work / f"point{i}.yaml").write_text(yaml.safe_dump(w))
        with open(work / f"point{i}.log", "wb") as log:
            subprocess.run([str(qrun), f"point{i}.yaml"], cwd=work, env=env, check=True, stdout=log,
                           stderr=subprocess.STDOUT)
    ics = [float(f.read_text().split()[1]) for f in work.glob("mlruns/*/*/metrics/IC")]
    return {"trials": len(ics), "best_ic": max(ics)}


def run_optuna(work: Path, wf: dict, mode: str) -> dict:
    import optuna

    storage = _journal(work / "journal.log")
    optuna.create_study(study_name="peer", storage=storage, direction="maximize")
    (work / "wf.json").write_text(json.dumps(wf))
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}  # Qlib's default ./mlruns, as under qrun
    quick = ["--quick"] if SPACE == QUICK_SPACE else []
    children = [subprocess.Popen([sys.executable, __file__, "--child", mode, "--work", str(work), *quick], cwd=work,
                                 env=env,
                                 stdout=subprocess.DEVNULL, stderr=open(work / f"child{i}.log", "wb"))
                for i in range(2)]
    if any(c.wait() for c in children):
        raise RuntimeError(f"{mode}: a child failed; see {work}/child*.log")
    study = optuna.load_study(study_name="peer", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {"trials": len(done), "best_ic": study.best_value}


def _journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def child(mode: str, work: Path, quick: bool) -> None:
    """One Optuna process: ``task_train`` per trial, or the lean objective on a dataset built once."""
    import optuna
    import qlib
    from qlib.utils import init_instance_by_config

    wf = json.loads((work / "wf.json").read_text())
    if quick:
        SPACE.clear()
        SPACE.update(QUICK_SPACE)
    qlib.init(**wf["qlib_init"])
    objective = _train_objective(wf) if mode == "optuna-train" else _lean_objective(wf, init_instance_by_config)
    study = optuna.load_study(study_name="peer", storage=_journal(work / "journal.log"),
                              sampler=optuna.samplers.GridSampler(SPACE))
    study.optimize(objective)  # GridSampler stops the study when every point has run


def _train_objective(wf: dict):
    from qlib.model.trainer import task_train

    def objective(trial) -> float:
        task = copy.deepcopy(wf["task"])
        task["model"]["kwargs"].update({k: trial.suggest_categorical(k, v) for k, v in SPACE.items()})
        return float(task_train(task, experiment_name="optuna_task_train").list_metrics()["IC"])

    return objective


def _lean_objective(wf: dict, build):
    from qlib.contrib.eva.alpha import calc_ic
    from qlib.data.dataset.handler import DataHandlerLP

    dataset = build(wf["task"]["dataset"])
    label = dataset.prepare("test", col_set="label", data_key=DataHandlerLP.DK_L).iloc[:, 0]

    def objective(trial) -> float:
        model_cfg = copy.deepcopy(wf["task"]["model"])
        model_cfg["kwargs"].update({k: trial.suggest_categorical(k, v) for k, v in SPACE.items()})
        model = build(model_cfg)
        model.fit(dataset)
        ic, _ = calc_ic(model.predict(dataset), label)
        return float(ic.mean())

    return objective


def run_qlib_ext(work: Path, wf: dict, search: str) -> dict:
    grid = ({"search": "grid", "params": {f"task.model.kwargs.{k}": v for k, v in SPACE.items()}} if search == "grid"
            else {"search": "tpe", "n_trials": len(points()), "batch": "auto", "seed": 0,
                  "objective": {"metric": "IC", "direction": "maximize"}, "params": TPE_SPACE})
    pool = f"peer-{search}"
    (work / "wf.yaml").write_text(yaml.safe_dump({**wf, "grid": {"pool": pool, **grid}}))
    home = work / "home"
    env = {**os.environ, "QLIB_EXT_HOME": str(home), "PYTHONPATH": str(ROOT)}
    try:
        subprocess.run([sys.executable, "-m", "qlib_ext", "run", "-n", "2", "wf.yaml"], cwd=work, env=env,
                       check=True, stdout=open(work / "run.log", "wb"), stderr=subprocess.STDOUT)
        return _pool_figures(home, pool)
    finally:
        from qlib_ext.store import stop

        stop(home / "store")


def _pool_figures(home: Path, pool: str) -> dict:
    import pymongo

    from qlib_ext.defaults import TASK_DB_NAME
    from qlib_ext.store import running_url

    with pymongo.MongoClient(running_url(home / "store")) as client:
        docs = [d for d in client[TASK_DB_NAME][pool].find({"status": "done"})]
    timings = [d["outcome"]["timings"] for d in docs]
    stages = {s: sum(t.get(f"time.{s}_s", 0.0) for t in timings) for s in ("data", *COMPUTE)}
    return {"trials": len(docs), "best_ic": max(d["outcome"]["metrics"]["IC"] for d in docs), "stages": stages}


def dataset_build_seconds(work: Path, wf: dict) -> float:
    """One Alpha158 dataset build (handler + the three segments), in a fresh process."""
    (work / "wf.json").write_text(json.dumps(wf))
    code = ("import json, time, qlib; from qlib.utils import init_instance_by_config as b; "
            f"wf = json.load(open('{work}/wf.json')); qlib.init(**wf['qlib_init']); t = time.perf_counter(); "
            "d = b(wf['task']['dataset']); [d.prepare(s) for s in ('train', 'valid', 'test')]; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def measure(case: str, work: Path, wf: dict) -> dict:
    work.mkdir(parents=True)
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    if case == "qrun":
        out = run_qrun(work, wf)
    elif case.startswith("optuna"):
        out = run_optuna(work, wf, case)
    else:
        out = run_qlib_ext(work, wf, case)
    return {**out, "wall": time.monotonic() - t0, "load": (load, os.getloadavg()[0])}


def report(results: dict[str, list[dict]], build: float, repeat: int) -> str:
    rows, grid = [], results.get("grid")
    limit = None
    if grid:
        compute = median([sum(r["stages"][s] for s in COMPUTE) for r in grid])
        limit = compute / 2 + build
    base = median([r["wall"] for r in results["qrun"]]) if "qrun" in results else None
    for case, rs in results.items():
        wall = median([r["wall"] for r in rs])
        best = max(r["best_ic"] for r in rs)
        rows.append([case, f"{wall:.0f}", f"{wall / rs[0]['trials']:.1f}", rs[0]["trials"], f"{best:.4f}",
                     f"{base / wall:.1f}x" if base else "-", f"{wall / limit:.2f}" if limit else "-",
                     ", ".join(f"{r['wall']:.0f}" for r in rs),
                     ", ".join(f"{r['load'][0]:.1f}-{r['load'][1]:.1f}" for r in rs)])
    text = table(["how", "wall s (median)", "s per trial", "trials", "best IC", "vs qrun loop", "wall / limit",
                  "walls", "load 1-min (start-end)"], rows)
    if grid:
        stages = {s: median([r["stages"][s] for r in grid]) for s in ("data", *COMPUTE)}
        text += ("\n\nThe grid's stage seconds summed over its 24 tasks (median of rounds): "
                 + ", ".join(f"{s} {v:.1f}" for s, v in stages.items())
                 + f"; one dataset build alone {build:.1f} s; limit = compute / 2 workers + build = {limit:.1f} s.")
    return text + f"\n\n{repeat} interleaved round(s), the order alternating."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", choices=["optuna-train", "optuna-lean"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", choices=CASES, action="append")
    ap.add_argument("--quick", action="store_true", help="4 points, not 24: checks that every case runs")
    ap.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    args = ap.parse_args()
    if args.quick:
        SPACE.clear()
        SPACE.update(QUICK_SPACE)
    if args.child:
        return child(args.child, args.work, args.quick)
    work = args.work or Path(tempfile.mkdtemp(prefix="qlib-ext-peer-"))
    data = work / "data"
    if not (data / "calendars").exists():
        subprocess.run([sys.executable, "-m", "qlib_ext", "data", "synth", "--out", str(data), "--instruments", "100"],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    wf = base_workflow(data)
    build = dataset_build_seconds(work, wf)
    cases = [c for c in CASES if not args.only or c in args.only]
    results: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(args.repeat):
        for case in cases if r % 2 == 0 else cases[::-1]:
            results[case].append(m := measure(case, work / f"{case}-{r}", wf))
            print(r, case, {k: v for k, v in m.items() if k != "stages"}, flush=True)
    text = f"{machine_line()}\n\n{report(results, build, args.repeat)}"
    print(text)
    if args.write:
        write_section("peer_bench", text)


if __name__ == "__main__":
    main()
