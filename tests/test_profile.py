"""Per-host configuration: the qlib-ext.toml profile and its precedence, and the worker's data check."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from qlib_ext import cli
from qlib_ext.errors import ConfigError
from qlib_ext.pool.record import PoolMeta
from qlib_ext.summary import Summary
from qlib_ext.worker.settings import check_worker_data, data_identity


@pytest.fixture
def seen(monkeypatch):
    """Replace the worker machinery: record what `qlib-ext worker` would start with."""
    got: dict = {}

    def fake_settings(pool, **kwargs):
        got.update(pool=pool, **kwargs)
        return type("S", (), {"threads": kwargs.get("threads"), "log_dir": None, "mongo_url": kwargs["mongo_url"],
                              "mlflow_uri": kwargs.get("mlflow_uri"), "gpus": (), "workers_per_gpu": 1,
                              "trainer": kwargs.get("trainer", "rm")})()

    def fake_run(settings, n, on_tick=None):
        got["n"] = n
        return 0

    class NoProgress:  # the fake pool has no store to count in
        def __init__(self, *args):
            pass

        tick = finish = __init__

    monkeypatch.setattr("qlib_ext.worker.settings.worker_settings", fake_settings)
    monkeypatch.setattr("qlib_ext.worker.group.run_workers", fake_run)
    monkeypatch.setattr("qlib_ext.worker.delayed.only_second_stage_left", lambda settings: False)  # no store here
    monkeypatch.setattr("qlib_ext.pool.progress.Progress", NoProgress)
    monkeypatch.setattr("qlib_ext.summary.after_workers", lambda pool, **kw: Summary("", kw["code"]))
    return got


def invoke(args, env=None):
    """Run the CLI in-process; ``env`` values of None unset a variable."""
    return CliRunner().invoke(cli.main, args, env=env or {}, catch_exceptions=False)


def test_profile_in_working_directory_sets_worker_defaults(tmp_path, monkeypatch, seen):
    (tmp_path / "qlib-ext.toml").write_text(
        'mongo_url = "mongodb://tasks.lab:27017/"\nmlflow_uri = "http://tasks.lab:5000"\n'
        'provider_uri = "/mnt/data"\nworkers = 3\nlease_seconds = 42\n[worker]\nthreads = 2\n')
    monkeypatch.chdir(tmp_path)
    result = invoke(["worker", "--pool", "p"], env={"QLIB_EXT_MONGO_URL": None, "MLFLOW_TRACKING_URI": None,
                                                    "QLIB_EXT_PROVIDER_URI": None})
    assert result.exit_code == 0, result.output
    assert seen["mongo_url"] == "mongodb://tasks.lab:27017/"
    assert seen["mlflow_uri"] == "http://tasks.lab:5000"
    assert seen["provider_uri"] == "/mnt/data"
    assert (seen["workers"], seen["threads"], seen["lease_seconds"], seen["n"]) == (3, 2, 42, 3)
    # Unset in the profile: None, so worker_settings falls back to the pool's recorded workers: section.
    assert seen["heartbeat_seconds"] is None


def test_flag_beats_env_beats_profile(tmp_path, monkeypatch, seen):
    profile = tmp_path / "lab.toml"
    profile.write_text('mongo_url = "mongodb://profile:1/"\nmlflow_uri = "http://profile:5000"\n'
                       'provider_uri = "/profile"\n')
    env = {"QLIB_EXT_PROFILE": str(profile), "QLIB_EXT_MONGO_URL": "mongodb://env:1/",
           "MLFLOW_TRACKING_URI": None, "QLIB_EXT_PROVIDER_URI": "/env"}
    result = invoke(["worker", "--pool", "p", "--provider-uri", "/flag"], env=env)
    assert result.exit_code == 0, result.output
    assert (seen["mongo_url"], seen["mlflow_uri"], seen["provider_uri"]) == (
        "mongodb://env:1/", "http://profile:5000", "/flag")


def test_profile_in_home_and_explicit_flag(tmp_path, monkeypatch, seen, _isolated_home):
    monkeypatch.chdir(tmp_path)
    (_isolated_home / "qlib-ext.toml").write_text('mongo_url = "mongodb://home:1/"\n')
    assert invoke(["worker", "--pool", "p"], env={"QLIB_EXT_MONGO_URL": None}).exit_code == 0
    assert seen["mongo_url"] == "mongodb://home:1/"
    other = tmp_path / "other.toml"
    other.write_text('mongo_url = "mongodb://other:1/"\n')
    assert invoke(["--profile", str(other), "worker", "--pool", "p"], env={"QLIB_EXT_MONGO_URL": None}).exit_code == 0
    assert seen["mongo_url"] == "mongodb://other:1/"


@pytest.mark.parametrize("text, message", [
    ("lease = 5\n", "unknown key(s) lease; expected one of: "),
    ("[wrker]\nthreads = 1\n", "[wrker] is not a command; expected one of: "),
    ("[store.serve]\nthreads = 1\n",
     "[store.serve]: unknown key(s) threads; expected one of: auth, dir, host, peer_auth, port, "),
    ("mongo_url = \n", "not valid TOML"),
])
def test_bad_profile_is_one_clear_error(tmp_path, text, message):
    profile = tmp_path / "bad.toml"
    profile.write_text(text)
    result = invoke(["--profile", str(profile), "status", "p"])
    assert result.exit_code == 2
    assert message in result.output and str(profile) in result.output


def test_missing_explicit_profile(tmp_path):
    result = invoke(["status", "p"], env={"QLIB_EXT_PROFILE": str(tmp_path / "nope.toml")})
    assert result.exit_code == 2 and "nope.toml' not found" in result.output


def test_profile_sets_nested_group_command(tmp_path, monkeypatch):
    (tmp_path / "qlib-ext.toml").write_text('[mlflow.serve]\nhost = "10.0.0.5"\nport = 5111\n')
    monkeypatch.chdir(tmp_path)
    got = {}
    monkeypatch.setattr("qlib_ext.tracking.server.serve", lambda d, **kw: got.update(kw) or 0)
    assert invoke(["mlflow", "serve"]).exit_code == 0
    assert got == {"host": "10.0.0.5", "port": 5111, "workers": 1, "basic_auth": True}


# ---------------------------------------------------------------------- worker data check
def test_worker_data_check_accepts_the_same_data_elsewhere(tmp_path, synth_provider):
    copy = tmp_path / "mount" / "qlib_data"
    shutil.copytree(synth_provider, copy)
    meta = PoolMeta(provider_uri=str(synth_provider), data=data_identity(str(synth_provider)))
    assert check_worker_data("p", meta, str(copy)) == str(copy.resolve())
    assert check_worker_data("p", meta) == str(synth_provider.resolve())


def test_worker_data_check_names_both_sides_and_the_fix(tmp_path, synth_provider):
    other = tmp_path / "other"
    shutil.copytree(synth_provider, other)
    days = (other / "calendars" / "day.txt").read_text().split()
    (other / "calendars" / "day.txt").write_text("\n".join(days[:-5]) + "\n")
    meta = PoolMeta(provider_uri=str(synth_provider), data=data_identity(str(synth_provider)),
                    submitted_from="hostA")
    with pytest.raises(ConfigError) as e:
        check_worker_data("p", meta, str(other))
    text = str(e.value)
    assert f"submitted: calendar {days[0]}..{days[-1]} ({len(days)} days), 40 instruments" in text
    assert f"here:      calendar {days[0]}..{days[-6]} ({len(days) - 5} days), 40 instruments" in text
    assert f"{synth_provider} on hostA" in text and str(other) in text and "--provider-uri" in text
    assert "shared path" in text


def test_worker_data_check_missing_directory(tmp_path, synth_provider):
    meta = PoolMeta(provider_uri=str(tmp_path / "not-mounted"), data=data_identity(str(synth_provider)))
    with pytest.raises(ConfigError, match=r"not-mounted \(the path recorded at submit\) is not a Qlib dataset "
                                          r"on this host.*--provider-uri"):
        check_worker_data("p", meta)


def test_url_passwords_never_reach_the_command_line_qlib_logs(monkeypatch, seen):
    # Qlib logs " ".join(sys.argv) as the MLflow param cmd-sys.argv of every run.
    argv = ["qlib-ext", "worker", "--pool", "p", "--mongo-url", "mongodb://qlib:s3cret@10.0.0.1:27017/?authSource=admin"]
    monkeypatch.setattr("sys.argv", list(argv))
    assert invoke(argv[1:]).exit_code == 0
    assert seen["mongo_url"] == argv[-1]  # the worker still gets the real URL
    import sys

    assert sys.argv[-1] == "mongodb://qlib:***@10.0.0.1:27017/?authSource=admin"
