"""The notebook example of docs/ui.md, run as written on a tiny grid, from inside a running event loop
(what a Jupyter cell is): qlib_ext.run returns the pool, counts, leaderboard, grid numbers and links."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from grid_yaml import write_workflow

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parent.parent / "docs" / "ui.md"

GRID = """
grid:
    pool: notebook
    params:
        task.model.kwargs.num_leaves: [8, 16]
"""


def notebook_example() -> str:
    """The python block under docs/ui.md's "From a notebook" heading."""
    section = DOC.read_text().split("## From a notebook", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/ui.md: no python block under 'From a notebook'"
    return match.group(1)


def test_the_notebook_example_runs_inside_an_event_loop(tmp_path, synth_provider, mongo_url, monkeypatch, capsys,
                                                        shared_dataset_cache):
    workflow = write_workflow(tmp_path / "nb.yaml", synth_provider, GRID)
    code = notebook_example()
    assert '"workflows/quickstart.yaml"' in code
    code = code.replace('"workflows/quickstart.yaml"', repr(str(workflow)))
    # the example names no store or tracking URI: they come from the environment, as on the command line
    monkeypatch.setenv("QLIB_EXT_MONGO_URL", mongo_url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    scope: dict = {}

    async def cell() -> None:
        assert asyncio.get_running_loop().is_running()
        exec(compile(code, str(DOC), "exec"), scope)

    asyncio.run(cell())
    out = capsys.readouterr().out
    result = scope["result"]
    assert result.ok and result.exit_code == 0 and result.pool == "notebook"
    assert result.counts == {"done": 2}
    assert list(result.leaderboard["rank"]) == [1, 2] and result.grid["metric"] == "IC"
    assert result.grid["trials"] == 2 and "pbo" in result.grid
    assert "-m mlflow ui --backend-store-uri sqlite:" in result.links["ui"]
    assert "#/experiments/" in result.links["ranked"] and "#/experiments/" in result.links["grid"]
    assert Path(scope["page"]).is_file()
    # quiet unless asked: only the example's own prints, no progress line, no "starting 2 workers"
    assert "notebook {'done': 2} ok" in out
    assert "starting" not in out and "running 0" not in out and "compare runs" not in out
