"""Acting as another local user in a test: ``runuser -u nobody`` with a Python that user can run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def nobody_python(why_root: str = "the other user is reached with runuser") -> list[str]:
    """The command prefix running a Python as ``nobody`` (``[..., "-c"]``: append the code); skips the test when
    there is none, saying why (``why_root``: what needs root in the calling test)."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why_root}")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("needs runuser (util-linux) to act as user nobody")
    for python in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if python and subprocess.run([runuser, "-u", "nobody", "--", python, "-I", "-c", "pass"],
                                     capture_output=True, timeout=60).returncode == 0:
            return [runuser, "-u", "nobody", "--", python, "-I", "-c"]
    pytest.skip("user nobody can run no Python interpreter here (root's virtualenv is not readable)")
