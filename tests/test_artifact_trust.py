"""Artifacts are untrusted input: a crafted Arrow array is refused without a crash, and an artifact swapped
after its run was committed is refused by the workers and operators that would read it (issue 20 §3)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa


class _HugeArrowArray:
    """Pickles as ``pyarrow.lib._restore_array`` of a string array claiming 10^9 values over an 8-byte buffer."""

    def __reduce__(self):
        data = (pa.string(), 10**9, 0, 0, [None, pa.py_buffer(b"\0" * 8), pa.py_buffer(b"")], [], None)
        return pa.lib._restore_array, (data,)


_READ = """
import sys
from qlib_ext.errors import TaskDecodeError
from qlib_ext.tracking.artifacts import read_frame
try:
    frame = read_frame(sys.argv[1])
except TaskDecodeError as e:
    print("REFUSED", e)
else:
    print("READ", len(frame), frame[len(frame) - 1])
"""


def _read_in_child(path) -> subprocess.CompletedProcess:
    """``read_frame(path)`` in a child process, so that a crash fails the test instead of killing pytest."""
    return subprocess.run([sys.executable, "-c", _READ, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def test_a_crafted_arrow_array_is_refused_without_a_crash(tmp_path):
    crafted = tmp_path / "report_normal_1day.pkl"
    crafted.write_bytes(pickle.dumps(_HugeArrowArray(), protocol=5))
    done = _read_in_child(crafted)
    assert done.returncode == 0, f"the read crashed (rc {done.returncode}): {done.stderr[-2000:]}"
    assert done.stdout.startswith("REFUSED"), done.stdout
    assert "Arrow array" in done.stdout and "too small" in done.stdout, done.stdout


def test_a_frame_with_arrow_strings_still_reads(tmp_path):
    from qlib_ext.tracking.artifacts import read_frame

    idx = pd.MultiIndex.from_product([pd.date_range("2020-01-01", periods=3, freq="B"), ["SH600000", "SZ000001"]],
                                     names=["datetime", "instrument"])
    frame = pd.DataFrame({"score": np.arange(6.0), "name": list("abcdef")}, index=idx)
    (tmp_path / "pred.pkl").write_bytes(pickle.dumps(frame, protocol=5))
    pd.testing.assert_frame_equal(read_frame(tmp_path / "pred.pkl"), frame)
