"""H x S strategy grid: train once and sweep the strategies vs the naive grid (one training per point).

Both modes run the same H model configurations x S TopkDropoutStrategy settings with ``qlib-ext
run`` (cache on, ``cores`` workers), each in a fresh QLIB_EXT_HOME (fresh store, MLflow DB and
cache), alternating naive / train-once in every repetition so a noisy shared machine slows both
alike; each repetition's ratio is measured side by side.

    python benchmarks/train_once_bench.py [--repeat N] [--stocks N] [--workers N]

Default: 60 stocks x 1,500 days synthetic data, 2 learning rates x 4 strategies (8 points), 3 repetitions.
Writes its section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import ROOT, machine_line, median, table, write_section
from scaling_bench import make_data, run_qlib_ext

CORES = os.cpu_count() or 1

GRID = """
grid:
    pool: train_once_bench
    train_once: {train_once}
    params:
        task.model.kwargs.learning_rate: [0.05, 0.1]
    strategies:
        topk: [10, 20]
        n_drop: [2, 5]
"""
"""2 model configurations x 4 strategy points."""

STAGES = ("time.data_s", "time.fit_s", "time.signal_s", "time.load_s", "time.backtest_s")


def workflow(tmp: Path, train_once: bool) -> Path:
    """quickstart.yaml (LightGBM / Alpha158, 15-month window) with the strategy grid instead of its own."""
    text = (ROOT / "workflows" / "quickstart.yaml").read_text()
    text = text[:text.index("\ngrid:")] + GRID.format(train_once=str(train_once).lower())
    path = tmp / f"train_once_{str(train_once).lower()}.yaml"
    path.write_text(text)
    return path


def summary(metrics: list[dict]) -> dict[str, float]:
    """Runs, LightGBM fits and the summed seconds of each stage over all runs of one execution."""
    out = {"runs": len(metrics), "fits": sum(1 for m in metrics if "time.fit_s" in m)}
    out.update({k: sum(m.get(k, 0.0) for m in metrics) for k in STAGES})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--stocks", type=int, default=60, help="synthetic instruments (default 60)")
    parser.add_argument("--workers", type=int, default=CORES, help=f"workers (default: cores = {CORES})")
    args = parser.parse_args()
    modes = {"naive (train_once: false)": False, "train once": True}
    times: dict[str, list[float]] = {m: [] for m in modes}
    sums: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="bench-train-once-") as tmp:
        provider = make_data(Path(tmp), args.stocks)
        flows = {m: workflow(Path(tmp), once) for m, once in modes.items()}
        for rep in range(args.repeat):
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))  # neither mode always goes first
            for mode in order:
                elapsed, metrics = run_qlib_ext(flows[mode], provider, args.workers)
                times[mode].append(elapsed)
                sums[mode].append(summary(metrics))
                print(f"rep {rep + 1}/{args.repeat}  {mode}: {elapsed:.1f}s", flush=True)
    print(report(times, sums, args))


def report(times: dict[str, list[float]], sums: dict[str, list[dict]], args: argparse.Namespace) -> str:
    """Print-ready Markdown, also written to docs/performance.md."""
    naive, once = list(times)
    ratios = [n / o for n, o in zip(times[naive], times[once], strict=True)]
    rows = []
    for mode in times:
        s = {k: median([x[k] for x in sums[mode]]) for k in ("runs", "fits", *STAGES)}
        rows.append([mode, f"{median(times[mode]):.1f}", " / ".join(f"{t:.0f}" for t in times[mode]),
                     f"{s['runs']:.0f}", f"{s['fits']:.0f}", *(f"{s[k]:.0f}" for k in STAGES)])
    text = "\n\n".join([
        f"## Strategy grid: train once vs naive (2 model configs x 4 strategies, {args.stocks} stocks x 1,500 days)",
        machine_line() + f"; {args.workers} workers, cache on, each execution in a fresh home; "
        f"{args.repeat} interleaved repetition(s)",
        table(["mode", "median wall s", "each rep s", "MLflow runs", "LightGBM fits",
               *(f"Σ {k[5:-2]} s" for k in STAGES)], rows),
        f"**Train once is {median(ratios):.2f}x faster** (median of the per-repetition ratios naive / train "
        f"once: {', '.join(f'{r:.2f}x' for r in ratios)}; ratio of the medians "
        f"{median(times[naive]) / median(times[once]):.2f}x).",
        "Σ columns add each stage over all runs (CPU-seconds of task work, not wall time). Naive trains "
        "and predicts once per strategy point; train once trains once per model configuration and runs "
        "each strategy as a backtest task that copies the training run's predictions (the `load` stage). "
        "Not in the Σ columns: worker start-up, Qlib/MLflow initialisation and per-run logging. "
        "The machine is shared: compare the two modes within a repetition, not across tables.",
    ])
    write_section("train_once_bench", text)
    return text


if __name__ == "__main__":
    main()
