"""``qlib-ext dashboard``: a real optuna-dashboard server on a search pool, read in headless Chromium.

A two-objective search runs over the real store (the in-process worker stand-in of test_multi_objective), the
dashboard command serves it, and Chromium checks that the trial list holds every trial with its values; then the
search finishes and the page, reloaded, shows the new trials (kept in step). Screenshots go to
``$QLIB_EXT_UI_SHOTS`` when set, else to the test's tmp dir.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_multi_objective import MULTI
from test_optuna_export import _commit_one
from test_search import write_tiny
from test_ui_browser import _free_port

from qlib_ext.pool.database import save_pool_meta
from qlib_ext.pool.manager import GridTaskManager, open_db
from qlib_ext.pool.record import PoolMeta
from qlib_ext.search.proposer import Proposer
from qlib_ext.search.trials import TrialStore
from qlib_ext.workflow.load import load_workflow

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "dashboard exited"
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"dashboard did not answer {url}")


def _open(page, url: str, tries: int = 3) -> None:
    """Open ``url`` (optuna-dashboard's server answers one request at a time: on a loaded machine a page's
    assets can take long, so wait for the document only, and try again on a timeout)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(tries):
        try:
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            return
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise


def _trials_seen(page, base: str, n: int, docs: list[dict], timeout: float = 120) -> None:
    """Reload the trial list until it holds ``n`` trials, then check each finished trial's values."""
    deadline = time.monotonic() + timeout
    while True:
        _open(page, f"{base}/dashboard/studies/1/trials")
        page.get_by_text(re.compile(r"^\d+ Trials$")).first.wait_for()
        if f"{n} Trials" in page.inner_text("body") or time.monotonic() > deadline:
            break
    assert f"{n} Trials" in page.inner_text("body")
    for doc in docs:
        page.get_by_text(f"Trial {doc['number']}", exact=True).first.click()
        text = page.locator(f"text=Trial {doc['number']} (trial_id=").first
        text.wait_for()
        if doc["state"] == "complete":
            values = ", ".join(repr(float(v)) for v in doc["value"])
            page.get_by_text(values, exact=False).first.wait_for(timeout=30_000)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium for the headless browser check")
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="needs playwright (the test extra)")
@pytest.mark.skipif(importlib.util.find_spec("optuna_dashboard") is None,
                    reason="needs optuna-dashboard (pip install 'qlib-ext[dashboard]')")
def test_dashboard_lists_every_trial_with_its_values_and_follows_the_search(tmp_path, mongo_url):
    from playwright.sync_api import sync_playwright

    path = write_tiny(tmp_path / "m.yaml", tmp_path, MULTI.format(search="nsga2", n=6), pool="dash")
    save_pool_meta(open_db(mongo_url), "dash", PoolMeta(
        workflow=str(path), objective={"metric": "IC", "direction": "maximize"},
        objectives=[{"metric": "IC", "direction": "maximize"}, {"metric": "IR", "direction": "maximize"}]))
    db = open_db(mongo_url)
    tm, store = GridTaskManager("dash", db), TrialStore(db, "dash")
    proposer = Proposer(load_workflow(path), db, batch=2)
    proposer.step()
    _commit_one(tm, 0)
    proposer.step()  # 3 trials: one complete, two running
    port = _free_port()
    shots = Path(os.environ.get("QLIB_EXT_UI_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "qlib_ext", "dashboard", "dash", "--mongo-url", mongo_url,
                             "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--port", str(port), "--every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(base + "/api/studies", proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            _trials_seen(page, base, 3, store.all(tasks=False))
            k = 1
            while not proposer.step():  # the search goes on while the dashboard serves it
                while _commit_one(tm, k):
                    k += 1
            docs = store.all(tasks=False)
            assert len(docs) == 6 and all(d["state"] == "complete" for d in docs)
            _trials_seen(page, base, 6, docs)
            page.screenshot(path=str(shots / "dashboard_trials_test.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
