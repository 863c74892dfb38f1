"""Grid expansion into Qlib task dicts: counts, coordinates, aliases, random search, rolling windows."""

from __future__ import annotations

import json
from pathlib import Path

import bson
import pytest
from click.testing import CliRunner
from data_fixtures import SYNTH_SEGMENTS
from test_config import BASE, write_yaml

from qlib_ext.cli import main
from qlib_ext.errors import ConfigError
from qlib_ext.workflow.expand import expand, model_short_name
from qlib_ext.workflow.load import load_workflow

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"

SHIPPED_COUNTS = {"quickstart": 4, "lgb_grid": 8, "random_search": 12, "multi_model": 4, "strategy_grid": 1,
                  "rolling": 8, "plain_qrun": 1}
"""Tasks each shipped workflow expands to (rolling on the default synthetic calendar; strategy_grid trains once)."""

LINEAR = """\
        linear:
            class: LinearModel
            module_path: qlib.contrib.model.linear
            kwargs: {estimator: ridge, alpha: 0.05}
            params: {kwargs.alpha: [0.01, 0.1, 1.0]}
"""


def _expand(tmp_path: Path, grid: str, **kwargs) -> list[dict]:
    return expand(load_workflow(write_yaml(tmp_path, grid, **kwargs)))


def _meta(tasks: list[dict], key: str) -> list:
    return [t["qlib_ext"][key] for t in tasks]


@pytest.fixture(scope="module")
def synth_calendar(tmp_path_factory) -> Path:
    """A dataset with the default ``qlib-ext data synth`` calendar (1,500 days from 2015-01-05), 3 stocks."""
    from qlib_ext.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("calendar") / "synth"
    write_synthetic(out, instruments=3, days=1500, start="2015-01-05", seed=0)
    return out


# --------------------------------------------------------------------------- grid search
def test_plain_yaml_expands_to_one_task_with_empty_coords(tmp_path):
    (task,) = _expand(tmp_path, "")
    meta = task.pop("qlib_ext")
    assert meta["coords"] == {} and meta["strategy"] == {} and meta["window"] is None
    assert meta["model"] == "lgb" and meta["run_name"] == "lgb"
    assert task == load_workflow(tmp_path / "wf.yaml").config["task"]


def test_grid_is_the_cartesian_product_in_yaml_order(tmp_path):
    tasks = _expand(tmp_path, """
        grid:
            params:
                task.model.kwargs.learning_rate: [0.05, 0.1]
                task.model.kwargs.num_leaves: [16, 32, 64]
        """)
    assert len(tasks) == 6
    assert [(t["model"]["kwargs"]["learning_rate"], t["model"]["kwargs"]["num_leaves"]) for t in tasks] == [
        (0.05, 16), (0.05, 32), (0.05, 64), (0.1, 16), (0.1, 32), (0.1, 64)]
    assert tasks[1]["qlib_ext"]["coords"] == {"task.model.kwargs.learning_rate": 0.05,
                                              "task.model.kwargs.num_leaves": 32}
    assert tasks[1]["qlib_ext"]["run_name"] == "lgb lr=0.05 leaves=32"


def test_exact_meta_block(tmp_path):
    tasks = _expand(tmp_path, """
        experiment_name: exp
        grid:
            pool: p
            params: {task.model.kwargs.learning_rate: [0.05]}
            strategies: {topk: [20]}
        """)
    meta = tasks[0]["qlib_ext"]
    assert list(meta) == ["pool", "experiment", "grid_hash", "config_id", "coords", "model", "strategy",
                          "window", "run_name"]
    assert meta["pool"] == "p" and meta["experiment"] == "exp"
    assert len(meta["grid_hash"]) == 12 and len(meta["config_id"]) == 10
    assert meta["coords"] == {"task.model.kwargs.learning_rate": 0.05,
                              "port_analysis_config.strategy.kwargs.topk": 20}
    assert meta["strategy"] == {"topk": 20}
    assert meta["run_name"] == "lgb lr=0.05 topk=20"


def test_alias_propagation_from_root_paths(tmp_path):
    tasks = _expand(tmp_path, """
        grid:
            params:
                data_handler_config.start_time: [2017-01-03, 2017-02-01]
                port_analysis_config.backtest.account: [1000000]
        """)
    handler = [t["dataset"]["kwargs"]["handler"]["kwargs"]["start_time"] for t in tasks]
    assert handler == ["2017-01-03", "2017-02-01"]  # YAML dates in the grid are normalised too
    assert {t["record"][2]["kwargs"]["config"]["backtest"]["account"] for t in tasks} == {1000000}
    assert tasks[1]["qlib_ext"]["run_name"] == "lgb start_time=2017-02-01 account=1000000"
    wf_config = load_workflow(tmp_path / "wf.yaml").config
    assert wf_config["data_handler_config"]["start_time"] == "2017-01-03"


def test_tasks_share_nothing_with_each_other_or_the_workflow(tmp_path):
    wf = load_workflow(write_yaml(tmp_path, "grid:\n    params: {task.model.kwargs.num_leaves: [8, 16]}\n"))
    tasks = expand(wf)
    tasks[0]["dataset"]["kwargs"]["handler"]["kwargs"]["start_time"] = "1999-01-01"
    assert tasks[1]["dataset"]["kwargs"]["handler"]["kwargs"]["start_time"] == "2017-01-03"
    assert wf.config["data_handler_config"]["start_time"] == "2017-01-03"
    assert wf.config["task"]["model"]["kwargs"]["num_leaves"] == 32


def test_list_index_paths_and_new_keys(tmp_path):
    tasks = _expand(tmp_path, """
        grid:
            params:
                task.record.1.kwargs.ana_long_short: [true]
                +task.model.kwargs.min_data_in_leaf: [10, 20]
        """)
    assert [t["record"][1]["kwargs"]["ana_long_short"] for t in tasks] == [True, True]
    assert [t["model"]["kwargs"]["min_data_in_leaf"] for t in tasks] == [10, 20]
    assert tasks[0]["qlib_ext"]["run_name"] == "lgb ana_long_short=true min_leaf=10"


def test_models_axis_with_per_model_params(tmp_path):
    lgb = ("        lgb: {class: LGBModel, module_path: qlib.contrib.model.gbdt,\n"
           "              kwargs: {learning_rate: 0.1}, params: {kwargs.learning_rate: [0.05, 0.1]}}\n")
    tasks = _expand(tmp_path, "grid:\n    models:\n" + lgb + LINEAR)
    assert len(tasks) == 5
    assert _meta(tasks, "model") == ["lgb", "lgb", "linear", "linear", "linear"]
    assert tasks[3]["model"] == {"class": "LinearModel", "module_path": "qlib.contrib.model.linear",
                                 "kwargs": {"estimator": "ridge", "alpha": 0.1}}
    assert tasks[3]["qlib_ext"]["coords"] == {"task.model.kwargs.alpha": 0.1}
    assert _meta(tasks, "run_name")[:3] == ["lgb lr=0.05", "lgb lr=0.1", "linear alpha=0.01"]


def test_models_times_params_times_strategies(tmp_path):
    tasks = _expand(tmp_path, "grid:\n    params: {data_handler_config.start_time: [2017-01-03, 2017-02-01]}\n"
                              "    train_once: false\n"
                              "    strategies: {topk: [20, 50], n_drop: [2]}\n    models:\n" + LINEAR)
    assert len(tasks) == 3 * 2 * 2
    assert len(set(_meta(tasks, "config_id"))) == 12


def test_strategies_reach_every_port_ana_record(tmp_path):
    extra_record = ("        - {class: PortAnaRecord, module_path: qlib.workflow.record_temp, kwargs: {config: "
                    "{strategy: {class: TopkDropoutStrategy, module_path: qlib.contrib.strategy, "
                    "kwargs: {topk: 5, n_drop: 1}}, backtest: {}}}}\n")
    tasks = _expand(tmp_path, "grid:\n    train_once: false\n    strategies: {topk: [20, 30], n_drop: [2]}\n",
                    base=BASE + extra_record)
    assert len(tasks) == 2
    for task, topk in zip(tasks, (20, 30), strict=True):
        strategies = [r["kwargs"]["config"]["strategy"]["kwargs"] for r in task["record"][2:]]
        assert [(s["topk"], s["n_drop"]) for s in strategies] == [(topk, 2), (topk, 2)]
        assert task["qlib_ext"]["strategy"] == {"topk": topk, "n_drop": 2}


@pytest.mark.parametrize("cls, module", [("MultiPassPortAnaRecord", "qlib.workflow.record_temp"),
                                         ("fixtures.ShuffledPortAnaRecord", None)])
def test_strategies_reach_every_port_ana_record_subclass(tmp_path, cls, module):
    """Qlib's MultiPassPortAnaRecord and a user's own PortAnaRecord subclass are PortAnaRecords (issue 23 §5)."""
    where = f", module_path: {module}" if module else ""
    base = BASE.replace("{class: PortAnaRecord, module_path: qlib.workflow.record_temp", f"{{class: {cls}{where}")
    assert cls in base
    tasks = _expand(tmp_path, "grid:\n    train_once: false\n    strategies: {topk: [20, 30]}\n", base=base)
    assert [t["record"][2]["kwargs"]["config"]["strategy"]["kwargs"]["topk"] for t in tasks] == [20, 30]
    assert [t["qlib_ext"]["strategy"] for t in tasks] == [{"topk": 20}, {"topk": 30}]


def test_model_short_names():
    assert model_short_name({"class": "LGBModel"}) == "lgb"
    assert model_short_name({"class": "LinearModel"}) == "linear"
    assert model_short_name({"class": "qlib.contrib.model.xgboost.XGBModel"}) == "xgb"


def test_grid_hash_is_stable_and_tracks_the_grid(tmp_path):
    grid = "grid:\n    params: {task.model.kwargs.num_leaves: [8, 16]}\n"
    first, again = _expand(tmp_path, grid), _expand(tmp_path, grid)
    assert first == again
    assert len(set(_meta(first, "grid_hash"))) == 1
    changed = _expand(tmp_path, grid.replace("16]", "16, 32]"))
    assert changed[0]["qlib_ext"]["grid_hash"] != first[0]["qlib_ext"]["grid_hash"]
    assert changed[0]["qlib_ext"]["config_id"] == first[0]["qlib_ext"]["config_id"]


def test_tasks_are_bson_encodable(tmp_path):
    tasks = _expand(tmp_path, "grid:\n    params: {data_handler_config.end_time: [2019-06-28]}\n")
    assert bson.decode(bson.encode(tasks[0])) == tasks[0]


def test_unencodable_value_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"holds set .* at model.kwargs.bad, which MongoDB \(BSON\) cannot store"):
        _expand(tmp_path, "", base=BASE.replace("num_boost_round: 100}", "num_boost_round: 100, bad: !!set {a}}"))


# --------------------------------------------------------------------------- random search
RANDOM = """
    grid:
        search: random
        n_trials: 8
        seed: {seed}
        params:
            task.model.kwargs.learning_rate: {{dist: loguniform, low: 0.01, high: 0.3}}
            task.model.kwargs.num_leaves: {{dist: int, low: 8, high: 10}}
            +task.model.kwargs.subsample: {{dist: uniform, low: 0.5, high: 1.0}}
            task.model.kwargs.loss: [mse, huber]
    """


def test_random_search_is_seeded_and_reproducible(tmp_path):
    first = _meta(_expand(tmp_path, RANDOM.format(seed=1)), "coords")
    assert first == _meta(_expand(tmp_path, RANDOM.format(seed=1)), "coords")
    assert first != _meta(_expand(tmp_path, RANDOM.format(seed=2)), "coords")
    assert len(first) == 8 and len({json.dumps(c, sort_keys=True) for c in first}) == 8


def test_random_search_respects_each_distribution(tmp_path):
    coords = _meta(_expand(tmp_path, RANDOM.format(seed=0).replace("n_trials: 8", "n_trials: 60")), "coords")
    lr, leaves, sub, loss = (
        [c[f"task.model.kwargs.{k}"] for c in coords] for k in ("learning_rate", "num_leaves", "subsample", "loss"))
    assert all(0.01 <= v <= 0.3 for v in lr) and min(lr) < 0.03  # log scale: small values are common
    assert set(leaves) == {8, 9, 10} and all(isinstance(v, int) for v in leaves)  # inclusive bounds
    assert all(0.5 <= v <= 1.0 for v in sub)
    assert set(loss) == {"mse", "huber"}


def test_random_search_covers_a_finite_space_exactly(tmp_path):
    tasks = _expand(tmp_path, """
        grid:
            search: random
            n_trials: 6
            train_once: false
            params: {task.model.kwargs.num_leaves: [8, 16, 32]}
            strategies: {topk: [20, 50]}
        """)
    points = {(c["task.model.kwargs.num_leaves"], c["port_analysis_config.strategy.kwargs.topk"])
              for c in _meta(tasks, "coords")}
    assert len(points) == 6


def test_random_search_draws_models(tmp_path):
    tasks = _expand(tmp_path, "grid:\n    search: random\n    n_trials: 4\n    models:\n"
                              "        lgb: {class: LGBModel, module_path: qlib.contrib.model.gbdt, kwargs: {}}\n"
                    + LINEAR)
    assert len(tasks) == 4 and set(_meta(tasks, "model")) == {"lgb", "linear"}


# --------------------------------------------------------------------------- rolling
def _synth_base() -> str:
    """BASE with the segments of the session dataset (``synth_provider``)."""
    base = BASE
    for key, old in (("train", "[2017-01-03, 2018-06-29]"), ("valid", "[2018-07-02, 2018-12-28]"),
                     ("test", "[2019-01-02, 2019-06-28]")):
        base = base.replace(f"{key}: {old}", f"{key}: [{SYNTH_SEGMENTS[key][0]}, {SYNTH_SEGMENTS[key][1]}]")
    return base


ROLLING = """
    grid:
        params: {task.model.kwargs.learning_rate: [0.05, 0.1]}
        rolling: {step: 60, type: %s}
    """


def test_rolling_windows_cover_the_test_segment(tmp_path, synth_calendar):
    tasks = expand(load_workflow(write_yaml(tmp_path, ROLLING % "expanding")), provider_uri=str(synth_calendar))
    windows = _meta(tasks, "window")
    assert len(tasks) == 2 * 3  # 2019-01-02..2019-06-28 is 126 weekdays: windows of 60, 60, 6
    assert [w["index"] for w in windows] == [0, 1, 2] * 2
    assert [w["test"] for w in windows[:3]] == [["2019-01-02", "2019-03-26"], ["2019-03-27", "2019-06-18"],
                                                ["2019-06-19", "2019-06-28"]]
    assert {w["train"][0] for w in windows} == {"2017-01-03"}  # expanding: train start stays
    for task, window in zip(tasks, windows, strict=True):
        assert task["dataset"]["kwargs"]["segments"]["test"] == window["test"]
        assert [task["record"][2]["kwargs"]["config"]["backtest"][k] for k in ("start_time", "end_time")] == \
            window["test"]
    assert len(set(_meta(tasks, "config_id"))) == 2  # windows of one configuration group together
    assert _meta(tasks, "run_name")[:2] == ["lgb lr=0.05 w0", "lgb lr=0.05 w1"]


def test_rolling_windows_count_against_the_grid_cap_before_they_are_built(tmp_path, synth_calendar):
    flow = write_yaml(tmp_path, ROLLING.replace("rolling:", "max_points: 5\n        rolling:") % "expanding")
    with pytest.raises(ConfigError, match=r"expands to 6 tasks \(task.model.kwargs.learning_rate: 2 x rolling "
                                          r"windows: 3\), above the cap of 5 \(grid.max_points"):
        expand(load_workflow(flow), provider_uri=str(synth_calendar))


def test_sliding_windows_move_the_train_start(tmp_path, synth_calendar):
    tasks = expand(load_workflow(write_yaml(tmp_path, ROLLING % "sliding")), provider_uri=str(synth_calendar))
    assert [w["train"][0] for w in _meta(tasks, "window")[:3]] == ["2017-01-03", "2017-03-28", "2017-06-20"]


def test_rolling_on_the_session_dataset(tmp_path, synth_provider):
    tasks = expand(load_workflow(write_yaml(tmp_path, "grid:\n    rolling: {step: 40}\n", base=_synth_base())),
                   provider_uri=str(synth_provider))
    assert [w["test"] for w in _meta(tasks, "window")] == [
        ["2016-03-28", "2016-05-20"], ["2016-05-23", "2016-07-13"]]


def test_rolling_test_end_must_leave_a_trading_day(tmp_path, synth_provider):
    base = _synth_base().replace("test: [2016-03-28, 2016-07-13]", "test: [2016-03-28, 2016-07-15]")
    path = write_yaml(tmp_path, "grid:\n    rolling: {step: 40}\n", base=base)
    with pytest.raises(ConfigError) as e:
        expand(load_workflow(path), provider_uri=str(synth_provider))
    assert "calendar's last day 2016-07-15 in task.dataset.kwargs.segments.test of" in str(e.value)
    assert "end the test on 2016-07-14 or earlier" in str(e.value)


def test_trunc_days_from_the_calendars_first_day_is_a_config_error(tmp_path, synth_provider):
    """Qlib's TimeAdjuster.truncate asserts every truncated date lies after the calendar's first day: a bare
    AssertionError from expand and run before (issue 23 §5); now a ConfigError naming the key and the fix."""
    base = _synth_base().replace("train: [2015-03-30, 2015-12-04]", "train: [2015-01-05, 2015-12-04]")
    path = write_yaml(tmp_path, "grid:\n    rolling: {step: 40, trunc_days: 3}\n", base=base)
    with pytest.raises(ConfigError) as e:
        expand(load_workflow(path), provider_uri=str(synth_provider))
    assert "grid.rolling.trunc_days (3) with task.dataset.kwargs.segments.train of" in str(e.value)
    assert "start segments.train on 2015-01-06 or later" in str(e.value)
    fixed = write_yaml(tmp_path, "grid:\n    rolling: {step: 40, trunc_days: 3}\n", name="fixed.yaml",
                       base=base.replace("train: [2015-01-05,", "train: [2015-01-06,"))
    assert [w["train"][0] for w in _meta(expand(load_workflow(fixed), provider_uri=str(synth_provider)),
                                         "window")] == ["2015-01-06", "2015-01-06"]
    cli = CliRunner().invoke(main, ["expand", "--provider-uri", str(synth_provider), str(path)])
    assert cli.exit_code != 0 and "start segments.train on 2015-01-06 or later" in cli.output
    assert "AssertionError" not in cli.output.replace("(AssertionError)", "")


def test_rolling_without_a_calendar_says_how_to_get_one(tmp_path):
    path = write_yaml(tmp_path, ROLLING % "expanding")
    with pytest.raises(ConfigError, match=r"needs the Qlib calendar, but .*calendars/day.txt does not exist"):
        expand(load_workflow(path), provider_uri=str(tmp_path / "nodata"))


# --------------------------------------------------------------------------- shipped workflows and CLI
@pytest.mark.parametrize("name", sorted(SHIPPED_COUNTS))
def test_shipped_workflow_loads_and_expands(name, synth_calendar):
    wf = load_workflow(WORKFLOWS / f"{name}.yaml")
    tasks = expand(wf, provider_uri=str(synth_calendar))
    assert len(tasks) == SHIPPED_COUNTS[name]
    calendar_end = (synth_calendar / "calendars" / "day.txt").read_text().split()[-1]
    for task in tasks:
        bson.encode(task)
        test_end = task["dataset"]["kwargs"]["segments"]["test"][1]
        assert test_end < calendar_end
        backtests = [task["record"][2:], *(point["record"] for point in task["qlib_ext"].get("sweep", []))]
        ends = [r["kwargs"]["config"]["backtest"]["end_time"] for records in backtests for r in records]
        assert ends and all(end <= test_end for end in ends)


SEARCH_WORKFLOWS = {"tpe", "pareto"}
"""Shipped workflows whose points a sampler proposes while they run (nothing to expand; see test_search.py)."""


def test_every_shipped_workflow_is_tested():
    assert {p.stem for p in WORKFLOWS.glob("*.yaml")} == set(SHIPPED_COUNTS) | SEARCH_WORKFLOWS


def test_shipped_search_workflow_loads_and_says_why_it_does_not_expand():
    wf = load_workflow(WORKFLOWS / "tpe.yaml")
    assert (wf.grid.search, wf.grid.n_trials, wf.grid.objective.metric) == ("tpe", 16, "IC")
    with pytest.raises(ConfigError, match="search: tpe in grid.search of .*tpe.yaml proposes its points"):
        expand(wf)


def test_cli_expand_prints_count_and_coordinates():
    result = CliRunner().invoke(main, ["expand", str(WORKFLOWS / "strategy_grid.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("1 tasks for pool strategy_grid")
    assert lines[0].endswith("then 4 strategy backtests on their predictions")
    assert lines[1].split() == ["#", "model", "strategy", "window"]
    assert lines[2].split() == ["0", "lgb", "sweep", "of", "4", "-"]


def test_cli_expand_json_and_errors(tmp_path):
    result = CliRunner().invoke(main, ["expand", "--json", str(WORKFLOWS / "quickstart.yaml")])
    assert [t["qlib_ext"]["run_name"] for t in json.loads(result.output)][0] == "lgb lr=0.05 leaves=16"
    bad = write_yaml(tmp_path, "grid:\n    search: grdi\n")
    result = CliRunner().invoke(main, ["expand", str(bad)])
    assert result.exit_code == 2 and "unknown search 'grdi' in grid.search" in result.output


def test_backtest_ending_on_the_last_calendar_day_is_refused(tmp_path, synth_provider):
    base = _synth_base().replace("end_time: 2019-06-28\n        account", "end_time: 2016-07-15\n        account")
    wf = load_workflow(write_yaml(tmp_path, base=base))
    with pytest.raises(ConfigError) as e:
        expand(wf, provider_uri=str(synth_provider))
    assert "backtest end_time 2016-07-15 is not before the calendar's last day 2016-07-15" in str(e.value)
    assert "port_analysis_config.backtest.end_time of" in str(e.value) and "on 2016-07-14 or earlier" in str(e.value)
    assert len(expand(wf, provider_uri=str(tmp_path / "no-data"))) == 1  # no calendar, no rolling: not checked
