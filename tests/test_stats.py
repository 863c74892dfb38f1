"""PSR, MinTRL, DSR against the papers' worked examples and skfolio; PBO by CSCV on synthetic matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qlib_ext.analysis import stats


def test_dsr_worked_example_of_bailey_lopez_de_prado_2014():
    # The paper's example: best of N=100 trials, annualised SR 2.5 over 5 years of daily data
    # (T=1250, 250 days a year), annualised variance of the trials' SRs 1/2, skew -3, kurtosis 10:
    # SR0 = 0.1132 a day and DSR = 0.9004.
    sr, var = 2.5 / math.sqrt(250), 0.5 / 250
    assert stats.expected_max_sharpe(100, var) == pytest.approx(0.1132, abs=5e-5)
    assert stats.deflated_sharpe_ratio(sr, 1250, -3.0, 10.0, 100, var) == pytest.approx(0.9004, abs=5e-4)


def test_psr_and_mintrl_closed_form_for_normal_returns():
    # Normal returns: the variance term is 1 + SR^2/2. With SR = 0.1/day, T = 500:
    # PSR(0) = Phi(0.1 * sqrt(499) / sqrt(1.005)) = Phi(2.2283); MinTRL at 95 % = 1 + 1.005 * (1.6449 / 0.1)^2 = 272.9.
    assert stats.probabilistic_sharpe_ratio(0.1, 500, 0.0, 3.0) == pytest.approx(0.98707, abs=1e-5)
    assert stats.min_track_record_length(0.1, 0.0, 3.0) == pytest.approx(272.92, abs=0.05)
    assert stats.min_track_record_length(-0.1, 0.0, 3.0) == math.inf
    assert stats.expected_max_sharpe(1, 0.3) == 0.0


def test_psr_dsr_match_skfolio():
    measures = pytest.importorskip("skfolio.measures")
    rng = np.random.default_rng(3)
    trials = rng.standard_t(5, size=(600, 12)) * 0.01 + 0.0004
    r = trials[:, 0]
    s = stats.sharpe_stats(r)
    assert s.psr == pytest.approx(measures.probabilistic_sharpe_ratio(r), rel=1e-9)
    srs = [stats.sharpe_stats(trials[:, i]).sr for i in range(12)]
    dsr = stats.deflate([stats.sharpe_stats(trials[:, i]) for i in range(12)])[0]
    assert dsr == pytest.approx(measures.deflated_sharpe_ratio(r, np.array(srs)), rel=1e-9)
    assert s.sharpe == pytest.approx(s.sr * math.sqrt(238))


def test_sharpe_equals_qlib_information_ratio():
    import pandas as pd
    from qlib.contrib.evaluate import risk_analysis

    r = pd.Series(np.random.default_rng(0).normal(0.0005, 0.01, 300))
    ir = risk_analysis(r, freq="day").loc["information_ratio", "risk"]
    assert stats.sharpe_stats(r.to_numpy()).sharpe == pytest.approx(ir, rel=1e-9)


def test_degenerate_series_give_nan_not_errors():
    flat = stats.sharpe_stats(np.zeros(50))
    assert math.isnan(flat.sr) and math.isnan(flat.psr) and flat.as_dict()["psr"] is None
    assert stats.sharpe_stats([0.01, np.nan]).T == 1


def _noise(seed: int, T: int = 800, N: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.01, size=(T, N))


def test_pbo_of_pure_noise_is_about_one_half():
    pbos = [stats.pbo_cscv(_noise(seed)).pbo for seed in range(8)]
    assert 0.3 < float(np.mean(pbos)) < 0.7


def test_pbo_near_zero_with_planted_skill():
    m = _noise(1)
    m[:, 7] += 0.003  # daily SR 0.3 against 0: always best in sample and out of sample
    res = stats.pbo_cscv(m)
    assert res.pbo < 0.02 and res.prob_oos_loss < 0.02
    assert res.splits == math.comb(16, 8) and res.blocks == 16


def test_pbo_high_when_the_best_is_chosen_from_noise():
    # Every column demeaned over the whole sample: the in-sample winner's out-of-sample half must
    # give back exactly what it won, so it ranks low out of sample (the overfit case).
    m = _noise(2)
    m -= m.mean(axis=0)
    res = stats.pbo_cscv(m)
    assert res.pbo > 0.9
    assert res.slope < 0 and res.prob_oos_loss > 0.9


def test_pbo_deterministic_for_seed_and_blocks():
    m = _noise(4, T=400, N=6)
    a, b = stats.pbo_cscv(m, blocks=10), stats.pbo_cscv(m, blocks=10)
    assert a.pbo == b.pbo and np.array_equal(a.logits, b.logits) and a.splits == math.comb(10, 5)
    s1, s2 = stats.pbo_cscv(m, blocks=20, max_splits=500, seed=7), stats.pbo_cscv(m, blocks=20, max_splits=500, seed=7)
    assert np.array_equal(s1.logits, s2.logits) and 500 <= s1.splits <= 501
    summary = s1.summary()
    assert summary["blocks"] == 20 and set(summary["logit_quantiles"]) == {"5%", "25%", "50%", "75%", "95%"}


@pytest.mark.parametrize(("shape", "blocks", "match"), [((100, 1), 16, "N >= 2"), ((100, 4), 7, "even"),
                                                       ((20, 4), 16, "at least 32 rows")])
def test_pbo_refuses_bad_input(shape, blocks, match):
    with pytest.raises(ValueError, match=match):
        stats.pbo_cscv(np.ones(shape), blocks=blocks)


def _base(T: int = 300) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0008, 0.01, T)


def test_pbo_ranks_ties_as_ties():
    # two fit_intercept runs of a Linear model with identical returns: the choice between them is a coin
    # toss (0.5), not an overfit selection (1.0)
    tied = np.column_stack([_base(), _base()])
    assert stats.pbo_cscv(tied).pbo == 0.5
    assert stats.sharpe_equality(tied).max_z == 0.0 and stats.sharpe_equality(tied).indistinguishable
    # a tie for the in-sample best among three: their mean OOS rank, not the first column's
    three = np.column_stack([_base(), _base(), _base() - 0.002])
    assert stats.pbo_cscv(three).pbo < 0.5


def test_sharpe_equality_tells_flat_grids_from_real_differences():
    rng = np.random.default_rng(0)
    flat = np.column_stack([_base() + rng.normal(0, 0.0005, 300) for _ in range(4)])  # four near-identical configs
    eq = stats.sharpe_equality(flat)
    assert eq.indistinguishable and eq.pairs == 6 and eq.critical == pytest.approx(2.638, abs=1e-3)
    assert stats.pbo_cscv(flat).pbo > 0.7, "what CSCV reads on a flat grid: an overfit-looking number"
    seventh = np.column_stack([_base() + 1e-9 * rng.normal(size=300) for _ in range(4)])  # differ in the 7th digit
    assert stats.sharpe_equality(seventh).indistinguishable
    skill = np.column_stack([flat, _base() + 0.002])  # one configuration clearly better
    eq = stats.sharpe_equality(skill)
    assert not eq.indistinguishable and 4 in eq.best_pair and eq.p_value < 0.05
