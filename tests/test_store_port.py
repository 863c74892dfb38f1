"""Port 27017 taken: the embedded store starts elsewhere and says so, with the lines for Qlib's tools (issue 23 §4).

A real socket holds 27017 while ``submit``, ``status`` and ``store url`` start and use the embedded store of
the test's own home; the ``qlib.init(mongo=...)`` URL they print is then used, without credentials, as Qlib's
tools would use it. (``run`` prints the same submit line: :class:`qlib_ext.session.plan.Submitted`.)
"""

from __future__ import annotations

import re
import socket

import pymongo
import pytest
from click.testing import CliRunner
from fixtures import write_chaos_workflow

from qlib_ext.cli import main
from qlib_ext.defaults import STORE_PORT, TASK_DB_NAME
from qlib_ext.store import stop


@pytest.fixture
def port_27017_taken():
    """A listening socket on 127.0.0.1:27017 for the test's length."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", STORE_PORT))
    except OSError as e:
        holder.close()
        pytest.skip(f"cannot hold port {STORE_PORT} for this test ({e}): another process (a MongoDB, another "
                    "test's store) has it, so the test cannot know what the store would have chosen")
    holder.listen()
    yield holder
    holder.close()


def test_a_store_off_27017_says_its_port_and_the_qlib_init_lines(port_27017_taken, tmp_path, synth_provider):
    wf = write_chaos_workflow(tmp_path / "portnote.yaml", synth_provider, 1, "portnote")
    runner = CliRunner()
    try:
        submitted = runner.invoke(main, ["submit", str(wf)])  # --mongo-url embedded (the default)
        assert submitted.exit_code == 0, submitted.output
        note = re.search(r"the task store is on port (\d+), not 27017.*\n.*qlib\.init\(\.\.\., mongo=\{\"task_url\": "
                         r"\"(mongodb://127\.0\.0\.1:(\d+)/)\", \"task_db_name\": \"(\w+)\"\}\)", submitted.output)
        assert note is not None, submitted.output
        port, task_url, url_port, db = note.groups()
        assert port == url_port != str(STORE_PORT) and db == TASK_DB_NAME
        with pymongo.MongoClient(task_url, serverSelectionTimeoutMS=5000) as client:  # as Qlib's tools connect
            assert client[db]["portnote"].count_documents({}) == 1

        status = runner.invoke(main, ["status", "portnote"])
        assert status.exit_code == 0, status.output
        assert "waiting 1" in status.stdout and f"on port {port}, not 27017" in status.stderr
        assert task_url in status.stderr

        url = runner.invoke(main, ["store", "url"])
        assert url.exit_code == 0, url.output
        assert f":{port}/" in url.stdout.strip() and "\n" not in url.stdout.strip()  # stdout: the URL alone
        assert f"on port {port}, not 27017" in url.stderr and task_url in url.stderr
    finally:
        stop(None)


def test_a_store_on_27017_says_nothing_about_ports():
    from qlib_ext.store.access import qlib_note

    assert qlib_note("mongodb://qlib-ext:pw@127.0.0.1:27017/?authSource=admin") == ""
    note = qlib_note("mongodb://qlib-ext:pw@127.0.0.1:40001/?authSource=admin", "rolling_db")
    assert '"task_url": "mongodb://127.0.0.1:40001/"' in note and '"task_db_name": "rolling_db"' in note
    assert "pw" not in note  # never a password on the terminal
