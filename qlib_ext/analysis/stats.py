"""How much a backtest's Sharpe ratio means: PSR, MinTRL, Deflated Sharpe and PBO by CSCV.

Standard definitions, numpy/scipy only:

* Bailey & López de Prado (2012), "The Sharpe Ratio Efficient Frontier" — PSR and MinTRL;
* Bailey & López de Prado (2014), "The Deflated Sharpe Ratio" — DSR;
* Bailey, Borwein, López de Prado & Zhu (2015), "The Probability of Backtest Overfitting" — PBO by
  combinatorially symmetric cross-validation (CSCV).

Every ratio inside the formulas is **per period** (daily): ``SR = mean / std`` of the daily series.
Only :attr:`SharpeStats.sharpe` is annualised, by ``sqrt(periods)`` with ``periods`` = 238 by default,
Qlib's own scaler for daily ``risk_analysis`` — so it equals Qlib's
``1day.excess_return_with_cost.information_ratio`` computed on the same series. ``kurtosis`` is the
plain (Pearson) kurtosis, 3 for a normal distribution, as in the papers.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from qlib_ext import defaults

logger = logging.getLogger(__name__)

EULER_GAMMA = 0.5772156649015329
"""The Euler-Mascheroni constant in the expected maximum of N Gaussian Sharpe ratios."""


@dataclass(frozen=True)
class SharpeStats:
    """Sharpe ratio of one daily series and what it takes to trust it."""

    sharpe: float  # annualised: SR * sqrt(periods)
    sr: float  # per period (daily) Sharpe ratio, mean / std (ddof=1)
    skew: float  # sample skewness of the series
    kurtosis: float  # Pearson kurtosis (normal = 3)
    T: int  # number of observations (days)
    psr: float  # P[true SR > 0] given the estimate (PSR against 0)
    min_trl: float  # days needed for PSR(0) to reach the confidence level (inf when SR <= 0)

    def as_dict(self) -> dict[str, Any]:
        """Plain floats (JSON/BSON friendly); NaN and inf become None."""
        return {k: finite(v) for k, v in asdict(self).items()}


def finite(value: Any) -> Any:
    """``value``, or None when it is a NaN or infinite float (JSON and BSON friendly)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _moments(returns: np.ndarray) -> tuple[float, float, float]:
    """Per-period SR, skewness and Pearson kurtosis (NaN when the series cannot give them)."""
    if len(returns) < 3 or not np.std(returns) > 0:
        return math.nan, math.nan, math.nan
    sr = float(np.mean(returns) / np.std(returns, ddof=1))
    return sr, float(sps.skew(returns)), float(sps.kurtosis(returns, fisher=False))


def sr_variance_term(sr: float, skew: float, kurtosis: float) -> float:
    """``1 - skew * SR + (kurtosis - 1) / 4 * SR**2``: T-1 times the variance of the SR estimate
    (Mertens 2002, as used by Bailey & López de Prado; equals ``1 + SR**2 / 2`` for normal returns)."""
    return 1.0 - skew * sr + (kurtosis - 1.0) / 4.0 * sr * sr


def probabilistic_sharpe_ratio(sr: float, T: int, skew: float, kurtosis: float, sr_benchmark: float = 0.0) -> float:
    """PSR: the probability that the true per-period Sharpe ratio exceeds ``sr_benchmark``.

    ``PSR(SR*) = Phi( (SR - SR*) * sqrt(T - 1) / sqrt(1 - g3 SR + (g4 - 1)/4 SR^2) )``
    with ``g3`` the skewness and ``g4`` the (Pearson) kurtosis of the T returns.

    Args:
        sr: per-period Sharpe ratio estimate.
        T: number of returns it was estimated on.
        skew: their skewness.
        kurtosis: their Pearson kurtosis.
        sr_benchmark: per-period Sharpe ratio to beat.

    Returns:
        A probability, NaN when an input is NaN or the variance term is not positive.
    """
    var = sr_variance_term(sr, skew, kurtosis)
    if not (T > 1 and var > 0):
        return math.nan
    return float(sps.norm.cdf((sr - sr_benchmark) * math.sqrt(T - 1) / math.sqrt(var)))


def min_track_record_length(sr: float, skew: float, kurtosis: float, sr_benchmark: float = 0.0,
                            confidence: float = defaults.MINTRL_CONFIDENCE) -> float:
    """MinTRL: the number of returns needed for PSR(``sr_benchmark``) to reach ``confidence``.

    ``MinTRL = 1 + (1 - g3 SR + (g4 - 1)/4 SR^2) * (Z_confidence / (SR - SR*))^2``; inf when SR <= SR*.
    """
    var = sr_variance_term(sr, skew, kurtosis)
    if math.isnan(var) or var <= 0:
        return math.nan
    if sr <= sr_benchmark:
        return math.inf
    return 1.0 + var * (sps.norm.ppf(confidence) / (sr - sr_benchmark)) ** 2


def expected_max_sharpe(n_trials: int, sr_variance: float) -> float:
    """Expected maximum of ``n_trials`` per-period Sharpe ratios whose true value is 0 (the DSR's SR0).

    ``SR0 = sqrt(V[SR_n]) * ((1 - gamma) * Z^-1(1 - 1/N) + gamma * Z^-1(1 - 1/(N e)))``
    with gamma the Euler-Mascheroni constant and V[SR_n] the variance of the trials' Sharpe ratios
    (Bailey & López de Prado 2014, eq. 2). 0 for a single trial.
    """
    if n_trials <= 1 or not sr_variance > 0:
        return 0.0
    z = sps.norm.ppf
    return math.sqrt(sr_variance) * ((1 - EULER_GAMMA) * z(1 - 1 / n_trials)
                                     + EULER_GAMMA * z(1 - 1 / (n_trials * math.e)))


def deflated_sharpe_ratio(sr: float, T: int, skew: float, kurtosis: float, n_trials: int,
                          sr_variance: float) -> float:
    """DSR: PSR against the Sharpe ratio the best of ``n_trials`` skill-less trials would reach.

    ``DSR = PSR(SR0)`` with ``SR0 = expected_max_sharpe(N, V[SR_n])``; all ratios per period.
    Reads as the probability that the strategy's true Sharpe ratio is positive after accounting
    for the selection among N trials. With N = 1 it is PSR(0).
    """
    return probabilistic_sharpe_ratio(sr, T, skew, kurtosis, expected_max_sharpe(n_trials, sr_variance))


def sharpe_stats(returns: Any, periods: int = defaults.SHARPE_PERIODS_PER_YEAR,
                 confidence: float = defaults.MINTRL_CONFIDENCE) -> SharpeStats:
    """Sharpe ratio, moments, PSR(0) and MinTRL of one daily series (NaNs dropped)."""
    r = np.asarray(returns, dtype=float)
    r = r[np.isfinite(r)]
    sr, skew, kurt = _moments(r)
    return SharpeStats(sharpe=sr * math.sqrt(periods), sr=sr, skew=skew, kurtosis=kurt, T=len(r),
                       psr=probabilistic_sharpe_ratio(sr, len(r), skew, kurt),
                       min_trl=min_track_record_length(sr, skew, kurt, confidence=confidence))


def deflate(stats: list[SharpeStats], n_trials: int | None = None) -> list[float]:
    """The DSR of each row, deflated by N trials (default ``len(stats)``) and the variance of the
    per-period Sharpe ratios of the rows that have one (ddof=1)."""
    srs = np.array([s.sr for s in stats if math.isfinite(s.sr)])
    n = max(n_trials if n_trials is not None else len(stats), 1)
    var = float(np.var(srs, ddof=1)) if len(srs) > 1 else 0.0
    return [deflated_sharpe_ratio(s.sr, s.T, s.skew, s.kurtosis, n, var) for s in stats]


SHARPE_DECIMALS = 12
"""Per-period Sharpe ratios equal to this many decimals are tied in CSCV's ranks (float summation noise)."""

EQUALITY_ALPHA = 0.05
"""Family-wise level of the test that the configurations' Sharpe ratios differ (Bonferroni over pairs)."""


# ------------------------------------------------------------------------- equal Sharpe ratios
@dataclass(frozen=True)
class SharpeEquality:
    """Whether any two configurations' Sharpe ratios differ: Jobson-Korkie test with Memmel's correction
    on every pair, Bonferroni over the pairs."""

    max_z: float  # largest |z| over the pairs
    critical: float  # |z| a pair needs to differ at EQUALITY_ALPHA family-wise
    p_value: float  # Bonferroni-adjusted p of the most different pair (capped at 1)
    pairs: int  # N (N - 1) / 2
    best_pair: tuple[int, int]  # columns of the most different pair
    indistinguishable: bool  # max_z <= critical: no pair's Sharpe ratios can be told apart

    def summary(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return {"test": "Jobson-Korkie/Memmel equal-Sharpe z, Bonferroni over pairs", "alpha": EQUALITY_ALPHA,
                "max_z": finite(self.max_z), "critical_z": self.critical, "p_value": self.p_value,
                "pairs": self.pairs, "best_pair": list(self.best_pair), "indistinguishable": self.indistinguishable}


def sharpe_equality(matrix: Any, alpha: float = EQUALITY_ALPHA) -> SharpeEquality:
    """Test that the T x N matrix's columns have equal Sharpe ratios, pair by pair.

    For columns i, j with per-period Sharpe ratios SR_i, SR_j and correlation rho over T days (Jobson &
    Korkie 1981, corrected by Memmel 2003): ``z = (SR_i - SR_j) / sqrt(V / T)`` with
    ``V = 2 (1 - rho) + (SR_i^2 + SR_j^2 - 2 SR_i SR_j rho^2) / 2``. Identical columns give z = 0; nearly
    identical ones (rho near 1) differ as soon as their Sharpe ratios differ consistently. The
    configurations are indistinguishable when no |z| exceeds ``Z^-1(1 - alpha / (2 m))``, m = N (N - 1) / 2.

    Raises:
        ValueError: fewer than 2 columns or 3 rows.
    """
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[1] < 2 or m.shape[0] < 3:
        raise ValueError(f"the equal-Sharpe test needs a T x N matrix with T >= 3, N >= 2, got shape {m.shape}")
    t, n = m.shape
    std = m.std(axis=0, ddof=1)
    sr = np.where(std > 0, m.mean(axis=0) / np.where(std > 0, std, 1.0), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.nan_to_num(np.corrcoef(m, rowvar=False), nan=1.0)
    diff = np.round(sr[:, None] - sr[None, :], SHARPE_DECIMALS)
    var = 2 * (1 - rho) + (sr[:, None] ** 2 + sr[None, :] ** 2 - 2 * np.outer(sr, sr) * rho ** 2) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(diff == 0, 0.0, np.abs(diff) / np.sqrt(np.maximum(var, 0.0) / t))
    z = np.nan_to_num(z, nan=0.0, posinf=math.inf)
    pairs = n * (n - 1) // 2
    upper = np.triu_indices(n, 1)
    k = int(np.argmax(z[upper]))
    i, j = int(upper[0][k]), int(upper[1][k])
    max_z = float(z[i, j])
    critical = float(sps.norm.ppf(1 - alpha / (2 * pairs)))
    p_value = min(1.0, float(2 * sps.norm.sf(max_z)) * pairs)
    return SharpeEquality(max_z=max_z, critical=critical, p_value=p_value, pairs=pairs, best_pair=(i, j),
                          indistinguishable=max_z <= critical)


# ----------------------------------------------------------------------------------- PBO by CSCV
@dataclass(frozen=True)
class PBOResult:
    """PBO by CSCV over a T x N matrix, and the distribution it comes from."""

    pbo: float  # share of splits whose in-sample best ranks at or below the out-of-sample median
    logits: np.ndarray  # lambda_c = ln(w_c / (1 - w_c)), w_c = OOS relative rank of the IS best
    blocks: int  # S, the number of row blocks
    splits: int  # number of IS/OOS splits evaluated (C(S, S/2), or a seeded sample of them)
    n_strategies: int  # N
    n_obs: int  # T
    slope: float  # performance degradation: slope of OOS on IS Sharpe of the IS best (< 0: it degrades)
    intercept: float  # intercept of that regression (per-period Sharpe)
    prob_oos_loss: float  # share of splits where the IS best has a negative OOS Sharpe
    is_sharpe: np.ndarray  # per split, per-period IS Sharpe of the IS best
    oos_sharpe: np.ndarray  # per split, its OOS Sharpe

    def summary(self) -> dict[str, Any]:
        """Plain numbers for JSON: PBO, sizes, degradation, P[OOS loss], logit quantiles."""
        q = np.quantile(self.logits, [0.05, 0.25, 0.5, 0.75, 0.95]) if len(self.logits) else [math.nan] * 5
        return {"pbo": finite(self.pbo), "blocks": self.blocks, "splits": self.splits,
                "strategies": self.n_strategies, "days": self.n_obs, "slope": finite(self.slope),
                "intercept": finite(self.intercept), "prob_oos_loss": finite(self.prob_oos_loss),
                "logit_mean": finite(float(np.mean(self.logits))) if len(self.logits) else None,
                "logit_quantiles": {k: finite(float(v)) for k, v in zip(("5%", "25%", "50%", "75%", "95%"), q,
                                                                          strict=True)}}


def _splits(blocks: int, max_splits: int, seed: int) -> np.ndarray:
    """Boolean (splits x S) matrix of in-sample block choices: all C(S, S/2) of them, or a sample of
    ``max_splits`` drawn with ``seed`` (each with its complement, so the set stays symmetric)."""
    total = math.comb(blocks, blocks // 2)
    if total <= max_splits:
        chosen = list(itertools.combinations(range(blocks), blocks // 2))
    else:
        rng = np.random.default_rng(seed)
        seen: set[tuple[int, ...]] = set()
        while len(seen) < max_splits:
            combo = tuple(sorted(rng.choice(blocks, blocks // 2, replace=False).tolist()))
            seen.update({combo, tuple(sorted(set(range(blocks)) - set(combo)))})
        chosen = sorted(seen)
    mask = np.zeros((len(chosen), blocks), dtype=bool)
    for i, combo in enumerate(chosen):
        mask[i, list(combo)] = True
    return mask


def _sharpe_from_sums(count: np.ndarray, total: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """Per-period Sharpe (ddof=1) from block-summed counts, sums and sums of squares."""
    mean = total / count
    var = (squares - total * mean) / (count - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sr = mean / np.sqrt(var)
    return np.where(np.isfinite(sr), sr, 0.0)


def pbo_cscv(matrix: Any, blocks: int = defaults.PBO_BLOCKS, max_splits: int = defaults.PBO_MAX_SPLITS,
             seed: int = 0) -> PBOResult:
    """Probability of backtest overfitting by CSCV (Bailey, Borwein, López de Prado & Zhu 2015).

    The T x N matrix (rows = days, columns = configurations, no NaN) is cut into S contiguous blocks
    of rows (``np.array_split``). For each way c of choosing S/2 blocks as in-sample (IS, the rest
    out-of-sample, OOS): n* = the column with the best IS Sharpe; w_c = rank of n*'s OOS Sharpe
    among all columns / (N + 1) (ranks 1..N, ties averaged); lambda_c = ln(w_c / (1 - w_c)).
    ``PBO = #{c: lambda_c <= 0} / #splits`` — how often the IS winner is no better than the OOS median.
    Performance degradation: least-squares slope of OOS Sharpe(n*) on IS Sharpe(n*) over the splits;
    P[OOS loss] = share of splits with OOS Sharpe(n*) < 0.

    Deterministic: the splits are all C(S, S/2) combinations when there are at most ``max_splits``
    (12,870 for S = 16), else a sample drawn with ``seed``.

    Raises:
        ValueError: fewer than 2 columns, S odd or < 2, fewer than 2 rows per block, or NaN inside.
    """
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"PBO needs a T x N matrix with N >= 2 strategies, got shape {m.shape}")
    if blocks < 2 or blocks % 2:
        raise ValueError(f"PBO blocks S={blocks}: expected an even number >= 2")
    if m.shape[0] < 2 * blocks:
        raise ValueError(f"PBO with S={blocks} blocks needs at least {2 * blocks} rows (days), got {m.shape[0]}")
    if not np.isfinite(m).all():
        raise ValueError("PBO matrix holds NaN or inf; align the series on common days first")
    parts = np.array_split(m, blocks)
    count = np.array([len(p) for p in parts], dtype=float)[:, None]
    sums, squares = np.stack([p.sum(0) for p in parts]), np.stack([(p * p).sum(0) for p in parts])
    mask = _splits(blocks, max_splits, seed).astype(float)
    is_sr = _sharpe_from_sums(mask @ count, mask @ sums, mask @ squares)
    oos_sr = _sharpe_from_sums((1 - mask) @ count, (1 - mask) @ sums, (1 - mask) @ squares)
    is_sr, oos_sr = np.round(is_sr, SHARPE_DECIMALS), np.round(oos_sr, SHARPE_DECIMALS)  # float noise is a tie
    tied_best = is_sr == is_sr.max(axis=1, keepdims=True)  # every IS best, ties included
    ranks = sps.rankdata(oos_sr, axis=1)  # ties get the average rank
    omega = (ranks * tied_best).sum(1) / tied_best.sum(1) / (m.shape[1] + 1)
    logits = np.log(omega / (1 - omega))
    x = (is_sr * tied_best).sum(1) / tied_best.sum(1)
    y = (oos_sr * tied_best).sum(1) / tied_best.sum(1)
    slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (math.nan, math.nan)
    pbo = float(np.mean(logits < 0) + 0.5 * np.mean(logits == 0))
    return PBOResult(pbo=pbo, logits=logits, blocks=blocks, splits=len(logits),
                     n_strategies=m.shape[1], n_obs=m.shape[0], slope=float(slope), intercept=float(intercept),
                     prob_oos_loss=float(np.mean(y < 0)), is_sharpe=x, oos_sharpe=y)
