"""A model's training curve to MLflow: one ``log_metric`` per round (Qlib as is) against one ``log_batch``.

Fits Qlib's ``LGBModel`` (100 rounds, early stopping 20) on the same prepared Alpha158 dataset inside a real MLflow
run (sqlite store), alternating the two ways, and reports the median wall time of ``fit`` plus Qlib's background
logging until it is flushed, and the CPU seconds of the process over the same span.

    python benchmarks/fit_metrics_bench.py [--repeats 5] [--write]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from _common import machine_line, median, write_section

DATASET = {"class": "DatasetH", "module_path": "qlib.data.dataset", "kwargs": {
    "handler": {"class": "Alpha158", "module_path": "qlib.contrib.data.handler", "kwargs": {
        "start_time": "2016-01-04", "end_time": "2018-12-31", "fit_start_time": "2016-01-04",
        "fit_end_time": "2017-12-29", "instruments": "all"}},
    "segments": {"train": ["2016-01-04", "2017-12-29"], "valid": ["2018-01-02", "2018-06-29"],
                 "test": ["2018-07-02", "2018-12-31"]}}}
MODEL = {"class": "LGBModel", "module_path": "qlib.contrib.model.gbdt", "kwargs": {
    "loss": "mse", "learning_rate": 0.05, "num_leaves": 31, "num_boost_round": 100, "early_stopping_rounds": 20,
    "num_threads": 1, "verbose": -1}}


def one_fit(dataset, batched: bool) -> tuple[float, float, int]:
    """Wall and CPU seconds of one fit with its metrics flushed, and the number of metric rows written."""
    from qlib.utils import init_instance_by_config
    from qlib.workflow import R

    from qlib_ext.tracking.batch import batched_metrics

    model = init_instance_by_config(MODEL)
    with R.start(experiment_name="fit_metrics_bench"):
        recorder = R.get_recorder()
        wall, cpu = time.perf_counter(), time.process_time()
        if batched:
            with batched_metrics(recorder):
                model.fit(dataset)
        else:
            model.fit(dataset)
        if getattr(recorder, "async_log", None) is not None:
            recorder.async_log.wait()
            recorder.async_log = None
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows = sum(len(recorder.client.get_metric_history(recorder.id, k))
                   for k in recorder.client.get_run(recorder.id).data.metrics)
    return wall, cpu, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--instruments", type=int, default=100)
    parser.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args()

    import qlib

    from qlib_ext.cache.datasets import prepared_dataset
    from qlib_ext.data.synth import write_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="fit-metrics-bench-"))
    write_synthetic(tmp / "data", instruments=args.instruments, days=800, start="2016-01-04", seed=0)
    qlib.init(provider_uri=str(tmp / "data"), region="cn", kernels=1, logging_level=logging.WARNING,
              exp_manager={"class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
                           "kwargs": {"uri": f"sqlite:///{tmp}/mlflow.db", "default_exp_name": "Experiment"}})
    dataset = prepared_dataset(DATASET, tmp / "cache")
    one_fit(dataset, True)  # MLflow's schema, LightGBM's first import: outside the timings
    runs: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for batched in (False, True):
            runs[batched].append(one_fit(dataset, batched))
    table = ["| training curve written | fit + logging wall (median) | CPU s (median) | metric rows |",
             "|---|---|---|---|"]
    for batched, label in ((False, "one `log_metric` per round (Qlib as is)"), (True, "one `log_batch` (qlib-ext)")):
        walls, cpus, rows = zip(*runs[batched], strict=True)
        table.append(f"| {label} | {median(list(walls)):.2f} s | {median(list(cpus)):.2f} | {rows[0]} |")
    text = "\n".join(table) + f"\n\n{args.instruments} stocks x 800 days, LightGBM 100 rounds, {args.repeats} " \
        f"interleaved repeats. {machine_line()}.\n"
    print(text)
    if args.write:
        write_section("fit-metrics", text)


if __name__ == "__main__":
    main()
