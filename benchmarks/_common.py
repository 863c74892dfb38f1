"""Shared by the benchmark scripts: a private store process, the machine line, docs/performance.md sections."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERF_DOC = ROOT / "docs" / "performance.md"


def machine_line() -> str:
    """Where a table was measured: CPU count, CPU model, Python and key library versions."""
    import importlib.metadata as md

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("pyqlib", "mlflow", "pymongo", "lightgbm", "pandas"))
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {versions}; "
            f"measured {time.strftime('%Y-%m-%d')}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the ``<!-- name -->`` ... ``<!-- /name -->`` section of docs/performance.md."""
    PERF_DOC.parent.mkdir(exist_ok=True)
    text = PERF_DOC.read_text() if PERF_DOC.exists() else "# Performance\n\nWritten by the scripts in benchmarks/.\n"
    block = f"<!-- {name} -->\n{markdown.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    PERF_DOC.write_text(text)


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (also readable in a terminal)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextmanager
def store_process():
    """A fresh embedded store in a temp dir, on a free port; yields its URL."""
    from qlib_ext.store import running_url

    with tempfile.TemporaryDirectory(prefix="qlib-ext-bench-store-") as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "qlib_ext.store", "serve", "--dir", tmp, "--port", "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while (url := running_url(Path(tmp))) is None:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the embedded store did not start")
                time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(15)
