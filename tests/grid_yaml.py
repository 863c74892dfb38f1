"""Small qrun-style workflows on the session's synthetic dataset, written into a test's tmp dir."""

from __future__ import annotations

from pathlib import Path

from data_fixtures import SYNTH_END, SYNTH_SEGMENTS, SYNTH_START

TEMPLATE = """\
qlib_init:
    provider_uri: {provider}
    region: cn
market: &market csi300
benchmark: &benchmark SH000300
data_handler_config: &data_handler_config
    start_time: {start}
    end_time: {end}
    fit_start_time: {train0}
    fit_end_time: {train1}
    instruments: *market
port_analysis_config: &port_analysis_config
    strategy:
        class: TopkDropoutStrategy
        module_path: qlib.contrib.strategy
        kwargs:
            signal: <PRED>
            topk: 10
            n_drop: 2
    backtest:
        start_time: {test0}
        end_time: {test1}
        account: 100000000
        benchmark: *benchmark
        exchange_kwargs:
            limit_threshold: 0.095
            deal_price: close
            open_cost: 0.0005
            close_cost: 0.0015
            min_cost: 5
task:
    model:
        class: LGBModel
        module_path: qlib.contrib.model.gbdt
        kwargs:
            loss: mse
            learning_rate: 0.1
            num_leaves: 16
            num_boost_round: 30
            verbose: -1
    dataset:
        class: DatasetH
        module_path: qlib.data.dataset
        kwargs:
            handler:
                class: Alpha158
                module_path: qlib.contrib.data.handler
                kwargs: *data_handler_config
            segments:
                train: [{train0}, {train1}]
                valid: [{valid0}, {valid1}]
                test: [{test0}, {test1}]
    record:
        - class: SignalRecord
          module_path: qlib.workflow.record_temp
          kwargs:
            model: <MODEL>
            dataset: <DATASET>
        - class: SigAnaRecord
          module_path: qlib.workflow.record_temp
          kwargs:
            ana_long_short: False
            ann_scaler: 252
        - class: PortAnaRecord
          module_path: qlib.workflow.record_temp
          kwargs:
            config: *port_analysis_config
"""


def write_workflow(path: Path, provider: Path, grid: str = "") -> Path:
    """Write a LightGBM/Alpha158 workflow on ``provider`` with an optional ``grid:`` block (YAML text)."""
    seg = SYNTH_SEGMENTS
    text = TEMPLATE.format(provider=provider, start=SYNTH_START, end=SYNTH_END, train0=seg["train"][0],
                           train1=seg["train"][1], valid0=seg["valid"][0], valid1=seg["valid"][1],
                           test0=seg["test"][0], test1=seg["test"][1])
    path.write_text(text + grid)
    return path
