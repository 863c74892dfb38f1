"""What MLflow's logins cost a worker: per-request time against a real ``qlib-ext mlflow serve``.

Starts ``qlib-ext mlflow serve`` three ways in fresh directories (logins off; logins on with MLflow's shipped auth
config, which checks the password hash on every request; logins on as qlib-ext configures them) and times
``MlflowClient.get_experiment`` and ``log_metric`` calls from one client, reporting the median and mean
milliseconds per request and the server's CPU seconds per request.

    python benchmarks/mlflow_auth_bench.py [--requests 200] [--write]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import machine_line, median, table, write_section

MODES = {
    "logins off (--no-auth)": (["--no-auth"], None),
    "logins on, MLflow's shipped auth config (hash checked on every request)": ([], "shipped"),
    "logins on, as `qlib-ext mlflow serve` configures them": ([], None),
}
"""Label: (extra ``mlflow serve`` flags, ``MLFLOW_AUTH_CONFIG_PATH`` to use or None)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and all its descendants (the server's uvicorn/gunicorn workers)."""
    out = subprocess.run(["ps", "-o", "pid=,ppid=,time=", "-e"], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    children: dict[str, list[str]] = {}
    for p, pp, _t in rows:
        children.setdefault(pp, []).append(p)
    times = {p: t for p, _pp, t in rows}
    todo, total = [str(pid)], 0.0
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        day, _, clock = times.get(p, "0:0:0").rpartition("-")
        h, m, s = (float(x) for x in clock.split(":"))
        total += (float(day or 0) * 24 + h) * 3600 + m * 60 + s
    return total


def _start(directory: Path, flags: list[str], config: str | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    if config == "shipped":
        import mlflow.server.auth

        env["MLFLOW_AUTH_CONFIG_PATH"] = str(Path(mlflow.server.auth.__file__).parent / "basic_auth.ini")
    proc = subprocess.Popen([sys.executable, "-m", "qlib_ext", "mlflow", "serve", "--dir", str(directory),
                             "--port", str(port), *flags], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=3).read()
            return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow serve {flags} did not come up") from None
            time.sleep(0.5)


def one_mode(flags: list[str], config: str | None, requests: int) -> dict[str, float]:
    """Per-request milliseconds (median, mean) of get_experiment and log_metric, and server CPU ms per request."""
    import mlflow

    from qlib_ext.tracking.server import CREDENTIALS_FILE, read_credentials

    with tempfile.TemporaryDirectory(prefix="mlflow-auth-bench-") as tmp:
        directory = Path(tmp) / "srv"
        proc, base = _start(directory, flags, config)
        try:
            if "--no-auth" not in flags:
                os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = \
                    read_credentials(directory / CREDENTIALS_FILE)
            client = mlflow.MlflowClient(base)
            exp = client.create_experiment("bench")
            run = client.create_run(exp).info.run_id
            out: dict[str, float] = {}
            cpu0 = _server_cpu(proc.pid)
            for name, call in (("get_experiment", lambda i: client.get_experiment(exp)),
                               ("log_metric", lambda i: client.log_metric(run, "m", float(i), step=i))):
                laps = []
                for i in range(requests):
                    t = time.perf_counter()
                    call(i)
                    laps.append((time.perf_counter() - t) * 1000)
                out[name] = median(laps)
                out[name + "_mean"] = sum(laps) / len(laps)
            out["server_cpu"] = (_server_cpu(proc.pid) - cpu0) * 1000 / (2 * requests)
            return out
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
            os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
            os.killpg(proc.pid, 15)
            proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="calls of each kind per server")
    parser.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = []
    for label, (flags, config) in MODES.items():
        r = one_mode(flags, config, args.requests)
        rows.append([label, f"{r['get_experiment']:.1f} ({r['get_experiment_mean']:.1f})",
                     f"{r['log_metric']:.1f} ({r['log_metric_mean']:.1f})", f"{r['server_cpu']:.1f}"])
        print(rows[-1], flush=True)
    text = table(["server", "get_experiment ms, median (mean)", "log_metric ms, median (mean)",
                  "server CPU ms / request"], rows)
    text += (f"\n\n{args.requests} calls of each kind from one `MlflowClient` on the same host (loopback), one "
             f"server worker, sqlite backend; load average {load:.1f} at the start. {machine_line()}.\n")
    print(text)
    if args.write:
        write_section("mlflow-auth", text)


if __name__ == "__main__":
    main()
