"""Loading workflow YAML (as qrun does) and validating its grid:/workers: sections."""

from __future__ import annotations

import datetime as dt
import sys
import textwrap
from pathlib import Path

import pytest

from qlib_ext import defaults
from qlib_ext.errors import ConfigError
from qlib_ext.workflow.load import load_workflow, normalise_dates
from qlib_ext.workflow.spec import Dist, GridSpec, WorkersSpec

BASE = """\
qlib_init:
    provider_uri: ~/.qlib-ext/data/synth
    region: cn
market: &market csi300
benchmark: &benchmark SH000300
data_handler_config: &data_handler_config
    start_time: 2017-01-03
    end_time: 2019-06-28
    fit_start_time: 2017-01-03
    fit_end_time: 2018-06-29
    instruments: *market
port_analysis_config: &port_analysis_config
    strategy:
        class: TopkDropoutStrategy
        module_path: qlib.contrib.strategy
        kwargs: {signal: <PRED>, topk: 50, n_drop: 5}
    backtest:
        start_time: 2019-01-02
        end_time: 2019-06-28
        account: 100000000
        benchmark: *benchmark
task:
    model:
        class: LGBModel
        module_path: qlib.contrib.model.gbdt
        kwargs: {loss: mse, learning_rate: 0.1, num_leaves: 32, num_boost_round: 100}
    dataset:
        class: DatasetH
        module_path: qlib.data.dataset
        kwargs:
            handler: {class: Alpha158, module_path: qlib.contrib.data.handler, kwargs: *data_handler_config}
            segments:
                train: [2017-01-03, 2018-06-29]
                valid: [2018-07-02, 2018-12-28]
                test: [2019-01-02, 2019-06-28]
    record:
        - {class: SignalRecord, module_path: qlib.workflow.record_temp, kwargs: {model: <MODEL>, dataset: <DATASET>}}
        - {class: SigAnaRecord, module_path: qlib.workflow.record_temp, kwargs: {ana_long_short: false}}
        - {class: PortAnaRecord, module_path: qlib.workflow.record_temp, kwargs: {config: *port_analysis_config}}
"""
"""A small qrun YAML with the aliases of Qlib's benchmark files; tests append grid:/workers: to it."""


def write_yaml(directory: Path, extra: str = "", name: str = "wf.yaml", base: str = BASE) -> Path:
    """Write ``base`` + ``extra`` (dedented) to ``directory/name`` and return the path."""
    path = directory / name
    path.write_text(base + textwrap.dedent(extra))
    return path


# --------------------------------------------------------------------------- loading
def test_plain_qrun_yaml_is_a_one_point_grid_named_after_the_file(tmp_path):
    wf = load_workflow(write_yaml(tmp_path, name="my_flow.yaml"))
    assert wf.grid == GridSpec()
    assert wf.workers == WorkersSpec()
    assert wf.pool == wf.experiment_name == "my_flow"
    assert "grid" not in wf.config and "workers" not in wf.config
    assert wf.config["task"]["model"]["class"] == "LGBModel"


def test_pool_and_experiment_name_come_from_the_yaml_when_given(tmp_path):
    wf = load_workflow(write_yaml(tmp_path, "experiment_name: exp1\ngrid:\n    pool: p1\n"))
    assert (wf.pool, wf.experiment_name) == ("p1", "exp1")


def test_dates_become_strings_and_aliases_stay_shared(tmp_path):
    cfg = load_workflow(write_yaml(tmp_path)).config
    handler_kwargs = cfg["task"]["dataset"]["kwargs"]["handler"]["kwargs"]
    assert handler_kwargs is cfg["data_handler_config"]
    assert cfg["task"]["record"][2]["kwargs"]["config"] is cfg["port_analysis_config"]
    assert handler_kwargs["start_time"] == "2017-01-03"
    assert cfg["task"]["dataset"]["kwargs"]["segments"]["test"] == ["2019-01-02", "2019-06-28"]
    assert cfg["port_analysis_config"]["backtest"]["end_time"] == "2019-06-28"


def test_normalise_dates_keeps_a_time_of_day_and_turns_tuples_into_lists():
    obj = {"a": dt.datetime(2020, 1, 2, 9, 30), "b": (dt.date(2020, 1, 3), 1), "c": dt.datetime(2020, 1, 4)}
    assert normalise_dates(obj) == {"a": "2020-01-02 09:30:00", "b": ["2020-01-03", 1], "c": "2020-01-04"}


def test_jinja_renders_environment_variables_like_qrun(tmp_path, monkeypatch):
    monkeypatch.setenv("QLIB_EXT_TEST_MARKET", "csi500")
    path = write_yaml(tmp_path, base=BASE.replace("market: &market csi300",
                                                  "market: &market {{ QLIB_EXT_TEST_MARKET }}"))
    assert load_workflow(path).config["data_handler_config"]["instruments"] == "csi500"


def test_base_config_path_is_found_next_to_the_file_and_merged_under_it(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    write_yaml(tmp_path / "conf", name="base.yaml")
    child = tmp_path / "conf" / "child.yaml"
    child.write_text("BASE_CONFIG_PATH: base.yaml\nexperiment_name: child_exp\n"
                     "grid:\n    params:\n        task.model.kwargs.learning_rate: [0.05, 0.1]\n")
    monkeypatch.chdir(tmp_path)  # base.yaml is not in the cwd: qrun then looks next to the file
    wf = load_workflow(child)
    assert wf.experiment_name == "child_exp"
    assert wf.config["task"]["model"]["class"] == "LGBModel"
    assert wf.config["data_handler_config"]["start_time"] == "2017-01-03"
    assert list(wf.grid.params) == ["task.model.kwargs.learning_rate"]
    assert wf.config["task"]["dataset"]["kwargs"]["handler"]["kwargs"] is wf.config["data_handler_config"]


def test_base_config_path_relative_to_the_working_directory_wins(tmp_path, monkeypatch):
    write_yaml(tmp_path, name="base.yaml")
    (tmp_path / "sub").mkdir()
    write_yaml(tmp_path / "sub", name="base.yaml", base=BASE.replace("csi300", "csi100"))
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("BASE_CONFIG_PATH: base.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert load_workflow(child).config["market"] == "csi300"


def test_missing_base_config_names_both_places_searched(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text("BASE_CONFIG_PATH: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"BASE_CONFIG_PATH 'nowhere.yaml' of .*child.yaml not found"):
        load_workflow(path)


def test_sys_rel_path_is_added_to_sys_path_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = write_yaml(tmp_path, "sys:\n    rel_path: [mods]\n")
    load_workflow(path)
    load_workflow(path)
    assert sys.path.count(str(tmp_path.resolve() / "mods")) == 1


def test_workers_section_overrides_defaults(tmp_path):
    wf = load_workflow(write_yaml(tmp_path, "workers:\n    max_attempts: 5\n    task_timeout: 120\n"
                                            "    threads_per_worker: 2\n"))
    assert (wf.workers.max_attempts, wf.workers.task_timeout, wf.workers.threads_per_worker) == (5, 120, 2)
    assert wf.workers.lease_seconds == defaults.LEASE_SECONDS


def test_grid_section_is_parsed_into_specs(tmp_path):
    wf = load_workflow(write_yaml(tmp_path, """
        grid:
            search: random
            n_trials: 5
            seed: 7
            params:
                task.model.kwargs.learning_rate: {dist: loguniform, low: 0.01, high: 0.3}
                +task.model.kwargs.min_data_in_leaf: [10, 20]
            strategies:
                topk: [20, 50]
            rolling: {step: 20, type: sliding}
        """))
    g = wf.grid
    assert (g.search, g.n_trials, g.seed) == ("random", 5, 7)
    assert g.params == {"task.model.kwargs.learning_rate": Dist("loguniform", 0.01, 0.3),
                        "task.model.kwargs.min_data_in_leaf": [10, 20]}
    assert g.strategies == {"topk": [20, 50]}
    assert (g.rolling.step, g.rolling.type) == (20, "sliding")


def test_models_axis_keeps_per_model_params_as_root_paths(tmp_path):
    wf = load_workflow(write_yaml(tmp_path, """
        grid:
            models:
                linear:
                    class: LinearModel
                    module_path: qlib.contrib.model.linear
                    kwargs: {estimator: ridge, alpha: 0.05}
                    params: {kwargs.alpha: [0.05, 1.0]}
        """))
    spec = wf.grid.models["linear"]
    assert spec.block == {"class": "LinearModel", "module_path": "qlib.contrib.model.linear",
                          "kwargs": {"estimator": "ridge", "alpha": 0.05}}
    assert spec.params == {"task.model.kwargs.alpha": [0.05, 1.0]}


# --------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"workflow file .*nope.yaml not found"):
        load_workflow(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task:\n  model: {class: LGBModel\n  dataset: x\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error in .*bad.yaml at line \d+"):
        load_workflow(path)


def test_missing_task(tmp_path):
    path = tmp_path / "notask.yaml"
    path.write_text("qlib_init: {region: cn}\n")
    with pytest.raises(ConfigError, match=r"missing mapping 'task' in .*notask.yaml"):
        load_workflow(path)


def test_unknown_search_message_lists_the_choices(tmp_path):
    path = write_yaml(tmp_path, "grid:\n    search: grdi\n")
    with pytest.raises(ConfigError) as e:
        load_workflow(path)
    assert str(e.value) == (f"unknown search 'grdi' in grid.search of {path}; "
                            "expected one of: grid, random, tpe, cmaes, gp, qmc, nsga2")


GRID_ERRORS = [
    pytest.param("params: {task.model.kwargs.learning_rat: [0.1]}",
                 ["unknown key 'learning_rat' under task.model.kwargs",
                  "grid.params.task.model.kwargs.learning_rat", "learning_rate", "'+'"], id="unknown-leaf"),
    pytest.param("params: {task.modle.kwargs.lr: [0.1]}",
                 ["unknown key 'modle' under task", "one of: model, dataset, record"], id="unknown-middle"),
    pytest.param("params: {task.record.7.kwargs.x: [1]}",
                 ["'7' is not an index of the list at task.record", "0..2"], id="bad-list-index"),
    pytest.param("params: {task.model.class.x: [1]}",
                 ["task.model.class is a str, so 'x' does not exist"], id="path-through-scalar"),
    pytest.param("params: {task.model.kwargs.learning_rate: []}",
                 ["empty list in grid.params.task.model.kwargs.learning_rate", "at least one value"], id="empty"),
    pytest.param("params: {task.model.kwargs.learning_rate: 0.1}",
                 ["float value 0.1 in grid.params.task.model.kwargs.learning_rate", "non-empty list"], id="scalar"),
    pytest.param("params: {market: [csi300, csi500]}",
                 ["'market' never reaches the task", "grid.params.market"], id="scalar-alias"),
    pytest.param("search: random\nn_trials: 3\nparams: {task.model.kwargs.num_leaves: {dist: normal, low: 1, high: 2}}",
                 ["unknown dist 'normal' in grid.params.task.model.kwargs.num_leaves.dist",
                  "one of: int, uniform, loguniform"], id="dist-name"),
    pytest.param("search: random\nn_trials: 3\nparams: {task.model.kwargs.num_leaves: {dist: int, low: 9, high: 9}}",
                 ["low 9 >= high 9 in grid.params.task.model.kwargs.num_leaves", "low < high"], id="low>=high"),
    pytest.param("search: random\nn_trials: 3\n"
                 "params: {task.model.kwargs.learning_rate: {dist: loguniform, low: 0, high: 1}}",
                 ["loguniform low 0 in grid.params.task.model.kwargs.learning_rate.low", "low > 0"], id="log<=0"),
    pytest.param("search: random\nn_trials: 3\nparams: {task.model.kwargs.num_leaves: {dist: int, low: 1.5, high: 9}}",
                 ["float value 1.5 in grid.params.task.model.kwargs.num_leaves.low", "an integer"], id="int-float"),
    pytest.param("params: {task.model.kwargs.learning_rate: {dist: uniform, low: 0.01, high: 0.1}}",
                 ["distribution 'uniform' with search: grid in grid.params.task.model.kwargs.learning_rate",
                  "grid.search: random"], id="dist-in-grid"),
    pytest.param("search: random\nparams: {task.model.kwargs.learning_rate: [0.1, 0.2]}",
                 ["missing n_trials for search: random in grid.n_trials", "an integer > 0"], id="no-n_trials"),
    pytest.param("search: random\nn_trials: 0\nparams: {task.model.kwargs.learning_rate: [0.1, 0.2]}",
                 ["value 0 in grid.n_trials", "an integer > 0"], id="n_trials-0"),
    pytest.param("search: random\nn_trials: 5\nparams: {task.model.kwargs.learning_rate: [0.1, 0.2]}",
                 ["n_trials 5 exceeds the 2 distinct points", "search: grid"], id="n_trials>space"),
    pytest.param("strategies: {topkk: [10]}",
                 ["unknown key 'topkk' for TopkDropoutStrategy in grid.strategies.topkk",
                  "n_drop", "topk", "risk_degree", "trade_exchange"], id="strategy-key-mro"),
    pytest.param("rolling: {step: 0}", ["value 0 in grid.rolling.step", "an integer > 0"], id="step-0"),
    pytest.param("rolling: {step: -20}", ["value -20 in grid.rolling.step"], id="step-negative"),
    pytest.param("rolling: {type: expanding}", ["missing step in grid.rolling.step"], id="no-step"),
    pytest.param("rolling: {step: 20, type: rolling}",
                 ["unknown type 'rolling' in grid.rolling.type", "one of: expanding, sliding"], id="rolling-type"),
    pytest.param("rolling: {step: 20, stride: 2}",
                 ["unknown key 'stride' in grid.rolling", "one of: step, type, trunc_days"], id="rolling-key"),
    pytest.param("serach: random", ["unknown key 'serach' in grid", "one of: pool, search, n_trials"],
                 id="grid-key"),
    pytest.param("pool: 'has space'", ["invalid pool name 'has space' in grid.pool"], id="pool-name"),
    pytest.param("models: {}", ["empty mapping in grid.models"], id="models-empty"),
    pytest.param("models: {lin: {module_path: qlib.contrib.model.linear}}",
                 ["missing or non-string class None in grid.models.lin.class"], id="model-class"),
    pytest.param("models: {lin: {class: LinearModel, kwarg: {}}}",
                 ["unknown key 'kwarg' in grid.models.lin", "one of: class, module_path, kwargs, params"],
                 id="model-key"),
    pytest.param("models: {lin: {class: LinearModel, kwargs: {alpha: 1}, params: {kwargs.alpah: [1]}}}",
                 ["unknown key 'alpah' under kwargs in grid.models.lin.params.kwargs.alpah"], id="model-param"),
    pytest.param("models: {lin: {class: LinearModel}}\nparams: {task.model.kwargs.learning_rate: [0.1]}",
                 ["a task.model path together with grid.models", "grid.models.<name>.params"], id="models+task.model"),
]


@pytest.mark.parametrize(("grid", "fragments"), GRID_ERRORS)
def test_grid_errors_name_file_key_and_expectation(tmp_path, grid, fragments):
    path = write_yaml(tmp_path, "grid:\n" + textwrap.indent(grid, "    ") + "\n", name="bad_grid.yaml")
    with pytest.raises(ConfigError) as e:
        load_workflow(path)
    message = str(e.value)
    assert f"of {path}" in message
    for fragment in fragments:
        assert fragment in message, message


def test_strategy_key_without_a_port_ana_record(tmp_path):
    base = BASE[:BASE.index("        - {class: PortAnaRecord")]
    path = write_yaml(tmp_path, "grid:\n    strategies: {topk: [10]}\n", base=base)
    with pytest.raises(ConfigError, match="no PortAnaRecord with config.strategy in task.record in grid.strategies"):
        load_workflow(path)


def test_rolling_needs_both_ends_of_the_test_segment(tmp_path):
    path = write_yaml(tmp_path, "grid:\n    rolling: {step: 20}\n",
                      base=BASE.replace("test: [2019-01-02, 2019-06-28]", "test: [2019-01-02, null]"))
    with pytest.raises(ConfigError, match=r"test segment .* cannot roll in task.dataset.kwargs.segments.test"):
        load_workflow(path)


WORKER_ERRORS = [
    pytest.param("leese_seconds: 5", ["unknown key 'leese_seconds' in workers", "lease_seconds"], id="key"),
    pytest.param("max_attempts: 0", ["value 0 in workers.max_attempts", "an integer > 0"], id="attempts"),
    pytest.param("heartbeat_seconds: 60\n    lease_seconds: 30",
                 ["heartbeat 60 s >= lease 30 s in workers.heartbeat_seconds"], id="heartbeat>=lease"),
    pytest.param("task_timeout: -1", ["value -1 in workers.task_timeout"], id="timeout"),
    pytest.param("threads_per_worker: many", ["str value 'many' in workers.threads_per_worker"], id="threads"),
    pytest.param("grace_seconds: true", ["bool value True in workers.grace_seconds", "a number"], id="bool"),
]


@pytest.mark.parametrize(("workers", "fragments"), WORKER_ERRORS)
def test_workers_errors_name_file_and_key(tmp_path, workers, fragments):
    path = write_yaml(tmp_path, f"workers:\n    {workers}\n")
    with pytest.raises(ConfigError) as e:
        load_workflow(path)
    assert f"of {path}" in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_new_keys_need_the_plus_prefix(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'min_data_in_leaf'"):
        load_workflow(write_yaml(tmp_path, "grid:\n    params: {task.model.kwargs.min_data_in_leaf: [5]}\n"))
    wf = load_workflow(write_yaml(tmp_path, "grid:\n    params: {+task.model.kwargs.min_data_in_leaf: [5]}\n"))
    assert wf.grid.params == {"task.model.kwargs.min_data_in_leaf": [5]}
