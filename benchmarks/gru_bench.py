"""Qlib's GRU benchmark workflow, one task: ``qrun`` against ``qlib-ext run -n 1`` (issue 23 §1).

Takes Qlib's own ``examples/benchmarks/GRU/workflow_config_gru_Alpha158.yaml`` (pass its path: it is Qlib's
file, not shipped here), changes only its dates and data directory to fit a synthetic dataset
(``qlib-ext data synth``), and runs it once under each command, measuring the wall time and the peak memory
of the whole process tree (the sum of each process's PSS, so pages shared by forked children count once,
sampled every ``--sample`` seconds). ``--before PATH`` adds a ``qlib-ext run`` of another checkout's code
(e.g. the commit before a fix). A run is stopped when the machine's available memory falls under 2 GiB.

    python benchmarks/gru_bench.py --yaml PATH/workflow_config_gru_Alpha158.yaml [--before /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_line, table, write_section  # noqa: E402

DATES = {"2008-01-01": "2018-01-02", "2014-12-31": "2018-12-28", "2015-01-01": "2019-01-02",
         "2016-12-31": "2019-06-28", "2017-01-01": "2019-07-01", "2020-08-01": "2020-09-25"}
"""Qlib's dates -> the synthetic calendar's (1,500 days from 2015-01-05): train one year, valid half a year, test
15 months, in Qlib's order. Qlib's seven training years at 60 stocks take minutes an epoch on 2 cores; one year
keeps a run to a few minutes while every epoch still starts ``n_jobs`` DataLoader processes, which is what the
benchmark is about."""

MIN_AVAILABLE_BYTES = 2 << 30
"""A run is killed when the machine's available memory falls under this, bytes."""


@dataclass
class Measured:
    name: str
    wall: float
    peak_pss_mb: float
    peak_procs: int
    exit_code: int
    load: tuple[float, float]  # 1-minute load average at start and end

    def row(self) -> list[object]:
        return [self.name, f"{self.wall:.0f}", f"{self.peak_pss_mb:,.0f}", self.peak_procs, self.exit_code,
                f"{self.load[0]:.1f} / {self.load[1]:.1f}"]


def shrink(qlib_yaml: Path, provider: Path, epochs: int | None = None) -> str:
    """Qlib's workflow text with only its dates and data directory changed (and ``n_epochs`` when given)."""
    text = re.sub("|".join(DATES), lambda m: DATES[m.group(0)], qlib_yaml.read_text())
    if epochs is not None:
        text = re.sub(r"n_epochs: \d+", f"n_epochs: {epochs}", text)
    return re.sub(r'provider_uri: ".*?"', f'provider_uri: "{provider}"', text)


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return 0


def measure(name: str, cmd: list[str], cwd: Path, env: dict, log: Path, sample: float) -> Measured:
    """Run ``cmd`` to its end; its wall time and the peak summed PSS of its process tree."""
    import psutil

    start_load = os.getloadavg()[0]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    root, peak, procs = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        peak = max(peak, sum(_pss_kb(p.pid) for p in tree))
        procs = max(procs, len(tree))
        if psutil.virtual_memory().available < MIN_AVAILABLE_BYTES:
            print(f"{name}: machine memory nearly exhausted; killing the run", file=sys.stderr)
            os.killpg(proc.pid, 9)
        time.sleep(sample)
    proc.wait()
    return Measured(name, time.monotonic() - t0, peak / 1024, procs, proc.returncode, (start_load, os.getloadavg()[0]))


def median_of(ms: list[Measured]) -> Measured:
    """The run with the median wall time (its own memory and load), the worst exit code."""
    chosen = sorted(ms, key=lambda m: m.wall)[(len(ms) - 1) // 2]
    return Measured(chosen.name, chosen.wall, chosen.peak_pss_mb, chosen.peak_procs,
                    max(ms, key=lambda m: abs(m.exit_code)).exit_code, chosen.load)


def qlib_ext_env(code: Path, home: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(code), "QLIB_EXT_HOME": str(home)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--yaml", type=Path, required=True, help="Qlib's workflow_config_gru_Alpha158.yaml")
    ap.add_argument("--instruments", type=int, default=60)
    ap.add_argument("--before", type=Path, help="a checkout whose qlib-ext code runs as 'before'")
    ap.add_argument("--only", choices=["qrun", "before", "after"], action="append", help="run only these (repeat)")
    ap.add_argument("--work", type=Path, help="working directory (default: a new temp dir)")
    ap.add_argument("--sample", type=float, default=1.0, help="memory sampling interval, s")
    ap.add_argument("--epochs", type=int, help="n_epochs instead of Qlib's 200 (early stopping decides otherwise)")
    ap.add_argument("--warm-home", action="store_true",
                    help="one QLIB_EXT_HOME per code for all rounds (store up, MLflow database made: a user's second "
                         "run), its dataset cache emptied and a new pool each round; default: a fresh home each round")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the commands, interleaved; medians reported")
    ap.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qlib-ext-gru-"))
    data = work / "data"
    if not (data / "calendars").exists():
        subprocess.run([sys.executable, "-m", "qlib_ext", "data", "synth", "--out", str(data), "--instruments",
                        str(args.instruments)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wf = work / "workflow_config_gru_Alpha158.yaml"
    wf.write_text(shrink(args.yaml, data, args.epochs))
    qrun = Path(sys.executable).with_name("qrun")
    # qrun's default tracking store is ./mlruns, which this MLflow refuses unless told to accept it
    codes = {"after": ROOT, "before": args.before}
    cases = {"qrun": lambda r: ([str(qrun), str(wf)], {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"})}
    cases.update({n: (lambda r, n=n: _qlib_ext_case(work, wf, codes[n], n, r, args.warm_home))
                  for n in codes if codes[n]})
    names = [n for n in ("qrun", "after", "before") if n in cases and (not args.only or n in args.only)]
    rounds: dict[str, list[Measured]] = {n: [] for n in names}
    for r in range(args.repeat):
        for name in names if r % 2 == 0 else names[::-1]:  # interleaved, the order alternating
            (work / f"{name}-{r}").mkdir(exist_ok=True)
            cmd, env = cases[name](r)
            rounds[name].append(m := measure(name, cmd, work / f"{name}-{r}", env, work / f"{name}-{r}.log",
                                             args.sample))
            print(r, m.row(), flush=True)
            if not args.warm_home:
                _stop_store(work / f"home-{name}-{r}")
    for name in rounds if args.warm_home else ():
        _stop_store(work / f"home-{name}")
    results = [median_of(ms) for ms in rounds.values()]
    rows = [m.row() for m in results]
    if "qrun" in rounds:
        base = results[0].wall
        rows = [[*row, f"{m.wall / base:.2f}x"] for row, m in zip(rows, results, strict=True)]
    header = ["command", "wall s", "peak PSS MB (tree)", "peak processes", "exit", "load 1-min start / end"]
    text = table(header + (["wall / qrun"] if "qrun" in rounds else []), rows)
    text += f"\n\nMedians of {args.repeat} interleaved round(s); walls per round: " + "; ".join(
        f"{n} " + ", ".join(f"{m.wall:.0f}" for m in ms) for n, ms in rounds.items())
    setup = (f"{args.instruments} synthetic instruments" + (f", n_epochs {args.epochs}" if args.epochs else "")
             + ("; qlib-ext on a warm home (its cache emptied each round)" if args.warm_home else
                "; qlib-ext on a fresh home each round"))
    print(f"\n{machine_line()}; {setup}; work dir {work}\n\n{text}")
    if args.write:
        write_section("gru_bench", f"{machine_line()}; {setup}\n\n{text}")


def _qlib_ext_case(work: Path, wf: Path, code: Path, name: str, r: int, warm_home: bool) -> tuple[list[str], dict]:
    """``qlib-ext run -n 1`` of round ``r``: a fresh home, or the code's one home with its cache emptied and the
    workflow under a new file name (a new pool)."""
    import shutil

    if not warm_home:
        return [sys.executable, "-m", "qlib_ext", "run", "-n", "1", str(wf)], qlib_ext_env(code,
                                                                                          work / f"home-{name}-{r}")
    home = work / f"home-{name}"
    shutil.rmtree(home / "cache", ignore_errors=True)
    copy = wf.with_name(f"{wf.stem}-{name}{r}.yaml")
    copy.write_text(wf.read_text())
    return [sys.executable, "-m", "qlib_ext", "run", "-n", "1", str(copy)], qlib_ext_env(code, home)


def _stop_store(home: Path) -> None:
    if (home / "store" / "store.json").exists():
        from qlib_ext.store import stop

        stop(home / "store")


if __name__ == "__main__":
    main()
