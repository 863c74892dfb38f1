"""Checks that a string can slip past (issue 20 section 4): pool names, ``file://`` references, module paths,
control characters printed, grid and YAML sizes, MLflow parameter names. Fast: a real store and the real
command line where the promise is about them, no workers."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner

from qlib_ext import cli
from qlib_ext.errors import ConfigError
from qlib_ext.names import check_pool_name

BAD_POOL_NAMES = ["a..b", "a.", "a'b", "../../tmp/x", "x/y", ".hidden", "-all", "has space", "system.x",
                  "_qlib_ext_pools", "", "a" * 101, "caf\u00e9", "t\x1b]0;owned\x07"]


@pytest.mark.parametrize("name", BAD_POOL_NAMES)
def test_a_bad_pool_name_is_refused_naming_it_and_the_rule(name):
    with pytest.raises(ConfigError) as e:
        check_pool_name(name)
    assert repr(name) in str(e.value) and "ASCII letters, digits, '_', '-', '.'" in str(e.value)
    assert "\x1b" not in str(e.value)


@pytest.mark.parametrize("name", ["p1", "my_flow", "Grid-2026.12", "_private", "a" * 100, "0.1"])
def test_good_pool_names_pass(name):
    assert check_pool_name(name) == name


def test_a_bad_pool_name_writes_nothing_to_the_store(mongo_url, task_db_name):
    from qlib_ext.pool.manager import GridTaskManager, open_db, save_pool_meta
    from qlib_ext.pool.record import PoolMeta

    db = open_db(mongo_url, task_db_name)
    for name in ("a..b", "a.", "a'b"):
        with pytest.raises(ConfigError, match="invalid pool name"):
            save_pool_meta(db, name, PoolMeta())
        with pytest.raises(ConfigError, match="invalid pool name"):
            GridTaskManager(name, db)
    assert db.list_collection_names() == []


def test_every_pool_command_refuses_a_bad_name_before_it_runs(mongo_url, _isolated_home, tmp_path):
    runner = CliRunner()
    for args in (["status", "a..b"], ["retry", "a'b"], ["cancel", "a."], ["leaderboard", "x'"],
                 ["report", "../../escape"], ["worker", "--pool", "a..b", "-n", "1"], ["cache", "warm", "a."]):
        result = runner.invoke(cli.main, [*args, "--mongo-url", mongo_url])
        assert result.exit_code == 2, (args, result.output)
        assert "invalid pool name" in result.output and "ASCII letters" in result.output, (args, result.output)
    assert not (_isolated_home / "reports").exists() and not (tmp_path.parent / "escape").exists()


def test_a_workflow_names_a_valid_pool_or_is_refused(tmp_path):
    from qlib_ext.workflow.load import load_workflow

    body = "task:\n    model: {class: LGBModel}\n    dataset: {class: DatasetH}\n"
    bad = tmp_path / "ok.yaml"
    bad.write_text(body + "grid:\n    pool: a..b\n")
    with pytest.raises(ConfigError, match=r"invalid pool name 'a\.\.b' in grid\.pool of .*ok\.yaml"):
        load_workflow(bad)
    stem = tmp_path / "it's.yaml"
    stem.write_text(body)
    with pytest.raises(ConfigError, match="the file stem of .*set grid.pool"):
        load_workflow(stem)
    (tmp_path / "fine.yaml").write_text(body + f"grid:\n    pool: p_{uuid.uuid4().hex[:6]}\n")
    assert load_workflow(tmp_path / "fine.yaml").pool.startswith("p_")


# --------------------------------------------------------------------------- control characters printed
OSC_TITLE = "\x1b]0;owned\x07"


def test_printable_escapes_controls_and_keeps_unicode():
    from qlib_ext.tables import printable, text_table

    assert printable(f"a{OSC_TITLE}b\r\x9b2J\u202eZ") == "a\\x1b]0;owned\\x07b\\r\\x9b2J\\u202eZ"
    assert printable("café 日本 ✓ 😀 naïve\nnext\tcol", keep="\n\t") == "café 日本 ✓ 😀 naïve\nnext\tcol"
    assert text_table([["a", "b"], [f"x{OSC_TITLE}", "y\nz"]]).splitlines()[1] == "x\\x1b]0;owned\\x07  y\\nz"


def test_log_lines_on_a_terminal_are_escaped():
    """The CLI's, a worker's and the cache warmer's log handler (qlib_ext.tables.log_to_terminal)."""
    import subprocess
    import sys

    code = ("import logging; from qlib_ext.tables import log_to_terminal; log_to_terminal('INFO'); "
            "logging.getLogger('w').warning('claimed %s', 'r\\x1b]0;owned\\x07 caf\\u00e9')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
    assert "claimed r\\x1b]0;owned\\x07 caf\u00e9" in err and "\x1b" not in err, err


def test_the_command_line_prints_only_through_its_escaping_echo():
    """Every message of qlib_ext/cli leaves through cli.app.echo (the one printing edge)."""
    from pathlib import Path

    for path in (Path(cli.__file__).parent).glob("*.py"):
        text = path.read_text()
        assert "print(" not in text, path
        assert text.count("click.echo(") == (1 if path.name == "app.py" else 0), path


@pytest.fixture
def planted(mongo_url):
    """A pool whose task's error and run name hold an escape sequence, and a pool metadata document whose
    name does (planted by a pool writer bypassing qlib-ext), in the commands' default database; removed after."""
    from qlib_ext.pool.database import POOLS_COLLECTION
    from qlib_ext.pool.manager import open_db

    db = open_db(mongo_url)
    evil, pool = f"evil{uuid.uuid4().hex[:4]}{OSC_TITLE}", f"p_{uuid.uuid4().hex[:6]}"
    db[POOLS_COLLECTION].insert_one({"_id": evil})
    yield db, pool
    db[POOLS_COLLECTION].delete_many({"_id": {"$in": [evil, pool]}})
    db.drop_collection(pool)


def test_status_and_known_pools_escape_a_planted_pool_name_and_error(mongo_url, planted):
    from qlib_ext.pool.manager import GridTaskManager, save_pool_meta
    from qlib_ext.pool.record import PoolMeta

    db, pool = planted
    save_pool_meta(db, pool, PoolMeta())
    tm = GridTaskManager(pool, db)
    tm.create_tasks([{"model": {}, "qlib_ext": {"pool": pool, "run_name": f"r{OSC_TITLE}", "coords": {}}}],
                    max_attempts=1)
    tm.fail(tm.claim(worker="host:1"), f"boom{OSC_TITLE}")
    runner = CliRunner()
    outputs = [runner.invoke(cli.main, [*args, "--mongo-url", mongo_url]) for args in
               (["status"], ["status", "nonexistent"], ["status", pool])]
    assert [r.exit_code for r in outputs] == [0, 2, 0], [r.output for r in outputs]
    for result in outputs:
        assert "\x1b" not in result.output and "\x07" not in result.output, result.output
    assert "\\x1b]0;owned\\x07" in outputs[0].output and "\\x1b]0;owned\\x07" in outputs[1].output
    assert "boom\\x1b]0;owned\\x07" in outputs[2].output
    extra = runner.invoke(cli.main, ["status", pool, OSC_TITLE, "--mongo-url", mongo_url])  # click's own error
    assert extra.exit_code == 2 and "unexpected extra argument (\\x1b]0;owned\\x07)" in extra.output, extra.output


def test_expand_escapes_an_axis_value(tmp_path):
    flow = tmp_path / "flow.yaml"
    flow.write_text('task:\n    model: {class: LGBModel, module_path: qlib.contrib.model.gbdt, kwargs: {x: 1}}\n'
                    '    dataset: {class: DatasetH, module_path: qlib.data.dataset}\n'
                    'grid:\n    params:\n        task.model.kwargs.x: ["\\e]0;owned\\a", "caf\u00e9"]\n')
    result = CliRunner().invoke(cli.main, ["expand", str(flow)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\\x1b]0;owned\\x07" in result.output and "caf\u00e9" in result.output


# --------------------------------------------------------------------------- file:// and module paths
FILE_REFERENCES = ["FILE:///tmp/x.pkl", " file:///tmp/x.pkl", "fi\tle:///tmp/x.pkl", "\x00file:///tmp/x.pkl",
                   "File://tmp/x.pkl", "file:/tmp/x.pkl", "fi\nle:///tmp/x.pkl"]


def _task(handler: object = None, module_path: str = "qlib.contrib.model.gbdt", cls: str = "LGBModel") -> dict:
    return {"model": {"class": cls, "module_path": module_path},
            "dataset": {"class": "DatasetH", "module_path": "qlib.data.dataset", "kwargs": {"handler": handler}}}


@pytest.mark.parametrize("ref", FILE_REFERENCES)
def test_a_file_reference_is_refused_however_it_is_spelled(ref):
    from qlib_ext import defaults
    from qlib_ext.errors import ModuleNotAllowed
    from qlib_ext.pool import allowlist

    with pytest.raises(ModuleNotAllowed, match=r"task key dataset\.kwargs\.handler names a pickle file reference"):
        allowlist.check_modules(_task(ref), defaults.ALLOWED_MODULES)
    allowlist.check_modules(_task(ref), (*defaults.ALLOWED_MODULES, "file://"))  # listed: allowed


def test_qlib_unpickles_a_case_changed_file_reference(tmp_path):
    """Why the check follows Qlib's parsing: Qlib itself opens these spellings."""
    import pickle

    from qlib.utils import init_instance_by_config

    target = tmp_path / "x.pkl"
    target.write_bytes(pickle.dumps({"ran": True}))
    for ref in (f"FILE://{target}", f" file://{target}", f"fi\tle://{target}"):
        assert init_instance_by_config(ref) == {"ran": True}


@pytest.mark.parametrize("module_path", ["qlib./../../x.py", "lightgbm.x/../../evil.py", "qlib..x", "qlib.x/y",
                                         ".qlib.x", "qlib.x.", "qlibx", "lightgbmx.y", "/tmp/evil.py"])
def test_a_module_path_outside_the_list_is_refused_after_normalising(module_path):
    from qlib_ext import defaults
    from qlib_ext.errors import ModuleNotAllowed
    from qlib_ext.pool import allowlist

    with pytest.raises(ModuleNotAllowed, match=r"task key model\.module_path names module"):
        allowlist.check_modules(_task(module_path=module_path), defaults.ALLOWED_MODULES)
    with pytest.raises(ModuleNotAllowed, match=r"task key model\.class names module"):
        allowlist.check_modules(_task(cls=f"{module_path}.Evil"), defaults.ALLOWED_MODULES)


def test_a_py_file_is_allowed_only_inside_a_listed_directory(tmp_path):
    from qlib_ext import defaults
    from qlib_ext.errors import ModuleNotAllowed
    from qlib_ext.pool import allowlist

    lab, outside = tmp_path / "lab", tmp_path / "evil.py"
    lab.mkdir()
    (lab / "m.py").write_text("")
    outside.write_text("")
    (lab / "link.py").symlink_to(outside)
    prefixes = (*defaults.ALLOWED_MODULES, f"{lab}/")
    for ok in ("qlib", "qlib.contrib.model.gbdt", "lightgbm", "lightgbm.sklearn", f"{lab}/m.py"):
        allowlist.check_modules(_task(module_path=ok), prefixes)
    for bad in (f"{lab}/../evil.py", f"{lab}/link.py", f"{lab}x/m.py", str(outside)):
        with pytest.raises(ModuleNotAllowed):
            allowlist.check_modules(_task(module_path=bad), prefixes)
    with pytest.raises(ModuleNotAllowed):  # a prefix that is not a directory admits no file
        allowlist.check_modules(_task(module_path=f"{lab}/m.py"), (*defaults.ALLOWED_MODULES, f"{lab}/m"))


# --------------------------------------------------------------------------- sizes
_SMALL = ("task:\n    model: {class: LGBModel, module_path: qlib.contrib.model.gbdt, kwargs: {a: 1, b: 1, c: 1}}\n"
          "    dataset: {class: DatasetH, module_path: qlib.data.dataset}\n")


def _grid(tmp_path, name: str, values: int, extra: str = "") -> object:
    axis = "[" + ", ".join(map(str, range(values))) + "]"
    path = tmp_path / name
    path.write_text(_SMALL + "grid:\n" + extra + "    params:\n"
                    + "".join(f"        task.model.kwargs.{k}: {axis}\n" for k in "abc"))
    return path


_SIZE_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # before the fix these ran into MemoryError
from click.testing import CliRunner
from qlib_ext import cli
for args in sys.argv[1:]:
    r = CliRunner().invoke(cli.main, args.split("|"))
    print(r.exit_code, r.output.replace("\\n", " "))
"""


def test_a_huge_grid_and_an_alias_bomb_are_refused_before_anything_is_built(tmp_path):
    """300 values on each of three axes (2.7 * 10^7 points) and nine nested levels of nine aliases in the
    task (9^9 nodes once expanded), through the real command line in a process capped at 4 GiB of memory."""
    import os
    import subprocess
    import sys

    big = _grid(tmp_path, "big.yaml", 300)
    bomb = tmp_path / "bomb.yaml"
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb.write_text("\n".join(levels) + "\n" + _SMALL.replace("qlib.data.dataset}", "qlib.data.dataset, kwargs: "
                    "{handler: {class: Alpha158, module_path: qlib.contrib.data.handler, kwargs: {x: *a9}}}}"))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _SIZE_SCRIPT, f"expand|{big}",
                          f"submit|{big}|--limit|1|--mongo-url|mongodb://127.0.0.1:1/", f"expand|{bomb}"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout + out.stderr
    for line in lines[:2]:
        assert line.startswith("2 error: grid of ") and "big.yaml expands to 27,000,000 tasks" in line, line
        assert "(task.model.kwargs.a: 300 x task.model.kwargs.b: 300 x task.model.kwargs.c: 300)" in line, line
        assert "above the cap of 100,000 (grid.max_points" in line, line
    assert lines[2].startswith("2 error: YAML of ") and "bomb.yaml expands to more than 1,000,000 nodes" in lines[2]


def test_grid_max_points_raises_the_cap_and_is_not_part_of_the_grids_identity(tmp_path):
    from qlib_ext.workflow.expand import workflow_hash
    from qlib_ext.workflow.load import load_workflow

    with pytest.raises(ConfigError, match=r"expands to 8 tasks .* above the cap of 7 \(grid.max_points"):
        load_workflow(_grid(tmp_path, "seven.yaml", 2, "    max_points: 7\n"))
    raised = load_workflow(_grid(tmp_path, "eight.yaml", 2, "    max_points: 8\n"))
    default = load_workflow(_grid(tmp_path, "eight.yaml", 2))
    assert (raised.grid.max_points, default.grid.max_points) == (8, 100_000)
    assert workflow_hash(raised) == workflow_hash(default)
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text(_SMALL + "x: &x [1, *x]\n")
    with pytest.raises(ConfigError, match="recursive alias"):
        load_workflow(recursive)


# --------------------------------------------------------------------------- MLflow parameter names
def test_an_axis_mlflow_refuses_as_a_param_name_is_refused_at_submit_and_expand(mongo_url, tmp_path):
    from qlib_ext.pool.manager import open_db, pool_names

    (tmp_path / "data" / "calendars").mkdir(parents=True)
    pool = f"params_{uuid.uuid4().hex[:6]}"
    flow = tmp_path / "flow.yaml"
    flow.write_text(f"qlib_init: {{provider_uri: {tmp_path / 'data'}}}\n" + _SMALL
                    + f"grid:\n    pool: {pool}\n    params:\n        +task.model.kwargs.a'b: [1, 2]\n")
    runner = CliRunner()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for args in (["submit", str(flow), "--mongo-url", mongo_url, "--mlflow-uri", uri], ["expand", str(flow)]):
        result = runner.invoke(cli.main, args)
        assert result.exit_code == 2, result.output
        assert "grid axis task.model.kwargs.a'b of" in result.output and "as the parameter \"a'b\"" in result.output
        assert "Names may only contain alphanumerics" in result.output
    assert pool not in pool_names(open_db(mongo_url)) and not (tmp_path / "mlflow.db").exists()


def test_a_search_axis_is_checked_before_its_trials_exist(tmp_path):
    from qlib_ext.tracking.params import check_param_names
    from qlib_ext.workflow.load import load_workflow

    flow = tmp_path / "search.yaml"
    flow.write_text(_SMALL + "grid:\n    search: random\n    n_trials: 2\n    params:\n"
                    "        +task.model.kwargs.x@y: {dist: uniform, low: 0, high: 1}\n")
    with pytest.raises(ConfigError, match=r"grid axis task.model.kwargs.x@y .* parameter 'x@y', which MLflow refuses"):
        check_param_names([], flow, load_workflow(flow).grid)


def test_qlib_evaluates_a_label_expression_that_the_allow_list_cannot_stop():
    """docs/security.md: the allow-list narrows the surface, but Qlib `eval`s expressions (harmless getpid)."""
    import os

    from qlib.data.data import LocalExpressionProvider

    from qlib_ext import defaults
    from qlib_ext.pool import allowlist

    label = '((__import__)("os").getpid)()'
    handler = {"class": "Alpha158", "module_path": "qlib.contrib.data.handler", "kwargs": {"label": [[label], ["L"]]}}
    task = _task(handler)
    allowlist.check_modules(task, defaults.ALLOWED_MODULES)  # every class is qlib.*: it passes
    assert LocalExpressionProvider().get_expression_instance(label) == os.getpid()  # and Qlib runs the code
