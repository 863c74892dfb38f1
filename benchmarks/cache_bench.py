"""The shared dataset cache, measured side by side on one machine:

1. build vs load of one Alpha158 handler: build time, then load time and memory of ``cores``
   concurrent worker-like processes for the cache's memory-mapped format vs a plain pickle
   (``handler.to_pickle(dump_all=True)`` loaded through ``DatasetH(handler="file://...")``);
   memory after loading and after ``prepare`` of train+valid (learn) and test (infer) as USS
   (private to the process), RSS and PSS (shared pages split between the processes);
(the whole 8-config grid with the cache on and off is ``benchmarks/scaling_bench.py``).

    python benchmarks/cache_bench.py [--quick] [--repeat N]

--quick: 60 stocks x 600 days; default: 300 stocks x 1500 days (the issue's size).
Writes the cache_bench section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import machine_line, median, table, write_section

CORES = os.cpu_count() or 1
HANDLER = {"class": "Alpha158", "module_path": "qlib.contrib.data.handler",
           "kwargs": {"start_time": "2015-04-01", "end_time": "2017-03-31", "fit_start_time": "2015-06-01",
                      "fit_end_time": "2016-06-30", "instruments": "csi300"}}
"""Two years of Alpha158, inside both data sizes (600 days from 2015-01-05 end in April 2017)."""
SEGMENTS = {"train": ("2015-06-01", "2016-06-30"), "valid": ("2016-07-01", "2016-10-31"),
            "test": ("2016-11-01", "2017-03-31")}


def dataset_config() -> dict:
    return {"class": "DatasetH", "module_path": "qlib.data.dataset",
            "kwargs": {"handler": HANDLER, "segments": SEGMENTS}}


def synth_data(instruments: int, days: int) -> Path:
    from qlib_ext.data.synth import write_synthetic

    out = Path(tempfile.gettempdir()) / f"qlib-ext-cache-bench-{instruments}x{days}"
    if not (out / "calendars" / "day.txt").exists():
        print(write_synthetic(out, instruments=instruments, days=days, start="2015-01-05", seed=0, market="csi300"))
    return out


def _init(provider: str) -> None:
    import qlib

    qlib.init(provider_uri=provider, region="cn", kernels=1, logging_level=logging.WARNING)


def _mem() -> dict:
    import psutil

    m = psutil.Process().memory_full_info()
    return {"uss": m.uss / 2**20, "rss": m.rss / 2**20, "pss": m.pss / 2**20}


# --------------------------------------------------------------------------- 1. build vs load
def build_child(provider: str, cache_dir: str, pickle_path: str, out: mp.Queue) -> None:
    """Build the entry through the cache, then write the same handler as one plain pickle."""
    from qlib_ext.cache import datasets as cache

    _init(provider)
    start = time.perf_counter()
    handler = cache.prepared_dataset(dataset_config(), cache_dir).handler
    total = time.perf_counter() - start
    (meta,) = [e for e in cache.list_entries(cache_dir)]
    start = time.perf_counter()
    handler.to_pickle(pickle_path, dump_all=True)
    out.put({"build": meta["build_seconds"], "write_mapped": total - meta["build_seconds"],
             "write_pickle": time.perf_counter() - start, "size_mapped": meta["size"] / 2**20,
             "size_pickle": os.path.getsize(pickle_path) / 2**20})


def load_child(fmt: str, provider: str, cache_dir: str, pickle_path: str, barrier, out: mp.Queue) -> None:
    """One worker-like process: load the dataset in ``fmt``, prepare its segments, report memory."""
    from qlib.data.dataset import DatasetH
    from qlib.data.dataset.handler import DataHandlerLP

    from qlib_ext.cache import datasets as cache

    _init(provider)
    base = _mem()
    barrier.wait()
    start = time.perf_counter()
    if fmt == "mapped":
        dataset = cache.prepared_dataset(dataset_config(), cache_dir)
        assert cache.stats["loaded"] == 1, cache.stats
    else:
        dataset = DatasetH(handler=f"file://{pickle_path}", segments=SEGMENTS)
    load = time.perf_counter() - start
    start = time.perf_counter()  # the next task of a long-lived worker: imports done, crc32 checked once
    if fmt == "mapped":
        cache.prepared_dataset(dataset_config(), cache_dir)
    else:
        DatasetH(handler=f"file://{pickle_path}", segments=SEGMENTS)
    again = time.perf_counter() - start
    barrier.wait()  # everyone has loaded: PSS now splits the shared pages between them
    loaded = _mem()
    parts = [dataset.prepare(["train", "valid"], col_set=["feature", "label"], data_key=DataHandlerLP.DK_L),
             dataset.prepare("test", col_set="feature", data_key=DataHandlerLP.DK_I)]
    barrier.wait()
    prepared = _mem()
    barrier.wait()  # nobody exits before all have measured
    out.put({"load": load, "again": again, "base_uss": base["uss"], **{f"loaded_{k}": v - (base[k] if k == "uss" else 0)
             for k, v in loaded.items()}, **{f"prepared_{k}": v for k, v in prepared.items()},
             "rows": sum(len(p) for p in parts)})


def bench_build_load(provider: Path, repeat: int) -> tuple[dict, dict]:
    ctx = mp.get_context("spawn")
    work = Path(tempfile.mkdtemp(prefix="qlib-ext-cache-bench-"))
    cache_dir, pickle_path, out = str(work / "cache"), str(work / "handler.pkl"), ctx.Queue()
    _run(ctx, [(build_child, (str(provider), cache_dir, pickle_path, out))])
    build = out.get()
    loads: dict[str, list[dict]] = {"pickle": [], "mapped": []}
    for _ in range(repeat):
        for fmt in loads:  # interleaved, so machine load drifts hit both formats alike
            barrier = ctx.Barrier(CORES)
            _run(ctx, [(load_child, (fmt, str(provider), cache_dir, pickle_path, barrier, out))] * CORES)
            loads[fmt] += [out.get() for _ in range(CORES)]
    shutil.rmtree(work, ignore_errors=True)  # the entry and the pickle: hundreds of MB at full size
    return build, {fmt: {k: median([r[k] for r in rows]) for k in rows[0]} for fmt, rows in loads.items()}


def _run(ctx, targets: list[tuple]) -> None:
    procs = [ctx.Process(target=t, args=a) for t, a in targets]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"benchmark child failed with exit code {p.exitcode}")


# --------------------------------------------------------------------------- report
def report(size: str, build: dict, loads: dict, repeat: int) -> str:
    p, m = loads["pickle"], loads["mapped"]
    rows = [[name, f"{r['load']:.3f}", f"{r['again']:.3f}", f"{r['loaded_uss']:.0f}", f"{r['prepared_uss']:.0f}",
             f"{r['prepared_rss']:.0f}", f"{r['prepared_pss']:.0f}", f"{r['prepared_pss'] * CORES:.0f}"]
            for name, r in (("pickle", p), ("mapped", m))]
    text = [
        "## Dataset cache: build once, load everywhere", "",
        machine_line() + f"; {size}; Alpha158 {HANDLER['kwargs']['start_time']} .. {HANDLER['kwargs']['end_time']}; "
        f"medians of {repeat} repetition(s) x {CORES} concurrent loaders", "",
        f"Build (in the task, as without the cache): **{build['build']:.1f} s**; writing the entry "
        f"{build['write_mapped']:.1f} s ({build['size_mapped']:.0f} MB mapped format), "
        f"a plain pickle {build['write_pickle']:.1f} s ({build['size_pickle']:.0f} MB).", "",
        table(["format", "1st load s", "next load s", "USS added by load MB", "USS after prepare MB",
               "RSS after prepare MB", "PSS after prepare MB", f"PSS x {CORES} workers MB"], rows), "",
        f"Load time pickle / mapped: first load in a process {p['load'] / max(m['load'], 1e-9):.1f}x, "
        f"next loads {p['again'] / max(m['again'], 1e-9):.1f}x; build / mapped first load: "
        f"{build['build'] / max(m['load'], 1e-9):.0f}x. The mapped first load includes the key (a scan of the "
        "data directory) and a crc32 pass over the file, once per process; the pickle path checks nothing. "
        "USS = memory only that process holds; PSS splits shared "
        "pages between the processes that map them. `prepare` copies each segment out of the frames "
        "(per task, cached or not), which is why the saving after `prepare` is smaller than at load.",
    ]
    text += ["", "The whole 8-config grid with the cache on and off (cold and warm) is in the grid wall time "
                 "section (`benchmarks/scaling_bench.py`)."]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 stocks x 600 days instead of 300 x 1500")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (medians are reported)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    instruments, days = (60, 600) if args.quick else (300, 1500)
    provider = synth_data(instruments, days)
    build, loads = bench_build_load(provider, args.repeat)
    text = report(f"synthetic data {instruments} stocks x {days} days", build, loads, args.repeat)
    text += f"\n\nLoad average (1 min) at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f}."
    print(text)
    write_section("cache_bench", text)


if __name__ == "__main__":
    main()
