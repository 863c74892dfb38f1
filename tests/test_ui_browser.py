"""What a researcher sees, checked in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright) against ``mlflow server`` over runs made by ``qlib-ext run`` through the notebook API.

Checks: the experiment opens in MLflow's training-runs view (not GenAI); the grid is one parent row whose
expander shows its runs; the axis columns have distinct readable headers; a run's plot artifact
previews; the HTML report renders with its images. Screenshots go to ``$QLIB_EXT_UI_SHOTS`` when set
(``QLIB_EXT_UI_SHOTS=docs/ui`` refreshes the ones in docs/ui.md), else to the test's tmp dir.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from grid_yaml import write_workflow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "ui.md"

GRID = """\
grid:
    pool: ui_tour
    params:
        task.model.kwargs.learning_rate: [0.05, 0.1]
        task.model.kwargs.num_leaves: [8]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _example_code() -> str:
    """The notebook example of docs/ui.md (its first ```python block)."""
    match = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert match, f"{DOCS} has no ```python example"
    return match.group(1)


def start_mlflow(uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 (one worker); returns the process and its base URL once healthy."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                return proc, base
        except OSError:
            time.sleep(1)
    proc.kill()
    raise AssertionError(f"mlflow server did not come up: {log.read_text()[-2000:]}")


def browse(base: str, experiment_id: str, pool: str, metric: str, best_run: str, report: Path, shots: Path) -> None:
    """Open the views a researcher opens and assert what they show; screenshot each into ``shots``."""
    from playwright.sync_api import sync_playwright

    from qlib_ext.tracking import mlflow_ui

    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        # wide enough that every column fits beside MLflow's Assistant panel: the runs table renders only the
        # columns in view (a column past the right edge has no header element at all)
        page = browser.new_page(viewport={"width": 1920, "height": 760})
        page.set_default_timeout(120_000)

        # 1. The printed "ranked" link: training-runs view, one row per configuration, best objective first.
        page.goto(mlflow_ui.runs_url(base, experiment_id, pool, metric, mlflow_ui.RANKED))
        page.get_by_text("lgb lr=0.05 leaves=8").first.wait_for()
        _close_assistant(page)
        assert page.get_by_text("matching runs").count() == 1  # the training-runs table, not the GenAI pages
        # the grid renders its metric and param columns after the rows (late under load): wait for each
        for name in ("learning_rate", "num_leaves", "IC", "ICIR", "ann_ret", "IR", "max_dd"):
            page.locator("[role=columnheader]", has_text=re.compile(rf"^\s*{name}\s*$")).first.wait_for()
        _close_assistant(page)
        headers = [h.strip() for h in page.locator("[role=columnheader]").all_inner_texts()]
        assert len([h for h in headers if h.startswith("task.model")]) == 0, headers
        assert page.get_by_text(f"{pool} (grid)").count() == 0  # the ranked view has configurations only
        page.screenshot(path=str(shots / "ranked.png"))

        # 2. The "grid" link: the grid is ONE row; its expander shows the configurations under it.
        page.goto(mlflow_ui.runs_url(base, experiment_id, pool, metric, mlflow_ui.GRID))
        page.get_by_text(f"{pool} (grid)").first.wait_for()
        assert page.get_by_text("lgb lr=0.05 leaves=8").count() == 0  # children folded under the grid row
        page.locator("[role=row]", has_text=f"{pool} (grid)").locator(
            "button[data-component-id*='runnamecellrenderer']").first.click()
        page.get_by_text("lgb lr=0.05 leaves=8").first.wait_for()
        assert page.get_by_text("lgb lr=0.1 leaves=8").count() >= 1
        page.screenshot(path=str(shots / "grid.png"))

        # 3. A run's plot artifact previews as an image in the run page.
        page.goto(f"{base}/#/experiments/{experiment_id}/runs/{best_run}/artifacts?workflowType=machine_learning")
        page.get_by_text("plots").first.click()
        page.get_by_text("run.png").first.click()
        image = page.locator("img[src*='run.png'], img[src^='blob:']").first
        image.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 300", arg=image.element_handle())
        page.screenshot(path=str(shots / "run_plot.png"))

        # 4. The HTML report renders, every plot an embedded image.
        page.set_viewport_size({"width": 1200, "height": 1000})
        page.goto(report.resolve().as_uri())
        widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
        assert len(widths) >= 3 and all(w > 100 for w in widths), widths
        assert page.locator("table").count() >= 2
        page.screenshot(path=str(shots / "report.png"), full_page=True)
        browser.close()


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its "Assistant" side panel on first visit; close it for the screenshots."""
    close = page.locator("button[aria-label='Close']").first
    if close.count():
        close.click()


@pytest.mark.slow
def test_researcher_view_in_a_real_browser(tmp_path, synth_provider, _isolated_home, monkeypatch):
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    wf = write_workflow(tmp_path / "ui_tour.yaml", synth_provider, GRID)
    monkeypatch.chdir(tmp_path)
    # The docs' notebook example, run as written (only the workflow path differs).
    code = _example_code().replace("workflows/quickstart.yaml", str(wf))
    scope: dict = {}
    exec(compile(code, str(DOCS), "exec"), scope)  # noqa: S102 - the documented example is the test
    result, board, page = scope["result"], scope["board"], scope["page"]
    assert result.ok and result.pool == "ui_tour"
    assert list(board["run_name"]) and board["rank"].tolist() == list(range(1, len(board) + 1))
    assert Path(page).name == "report.html" and "data:image/png;base64," in Path(page).read_text()

    import mlflow

    uri = f"sqlite:///{_isolated_home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("ui_tour")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    grid_run = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("qlib_ext.row") == "grid"]
    assert len(grid_run) == 1 and grid_run[0].info.status == "FINISHED"
    assert {"report.html", "plots", "workflow.yaml", "tasks.json", "axes.md"} <= {
        a.path for a in client.list_artifacts(grid_run[0].info.run_id)}
    server, base = start_mlflow(uri, tmp_path / "mlflow.log")
    try:
        browse(base, exp.experiment_id, "ui_tour", board.attrs["grid"]["metric"], board["run_id"].iloc[0],
               Path(page), Path(os.environ.get("QLIB_EXT_UI_SHOTS") or tmp_path / "shots"))
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
