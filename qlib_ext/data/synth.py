"""A synthetic Chinese-A-share-like market in Qlib format, with planted, learnable alpha.

Daily log return of stock i on day t::

    r[t, i] = beta[i] * m[t] + load[i] * s[t, sector(i)] + e[t, i] + alpha[t, i]

* ``m``, ``s`` and ``e`` are GARCH(1,1) processes with Student-t(4) shocks: fat tails and
  volatility clustering, a market factor and eight sector factors.
* ``alpha[t, i] = -REVERSAL * D5[t-1, i] * (1 + VOLUME_AMP * tanh(h[t-1, i] / sd(h)))`` where
  ``D5`` is the stock's 5-day log return minus the cross-sectional mean and ``h`` its persistent
  abnormal log volume. Short-term reversal, stronger after heavy trading: Alpha158's ROC/MA/RSV
  and VMA/VSTD features see it, so a model can learn it; nothing else is predictable.
* Simple returns are clipped to the +-10 % daily price limit. Volume follows its own AR(1) level
  plus a response to |r|. Open, high, low and vwap are drawn around the close path.
* About 10 % of the stocks list late (their first rows are missing), like real IPOs.

The benchmark ``SH000300`` is the equal-weighted index of all stocks; it gets features but is
not in the instrument lists, as in Qlib's cn_data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qlib_ext.data.qlib_format import Panel, atomic_dir, write_panel
from qlib_ext.errors import DataError

logger = logging.getLogger(__name__)

BENCHMARK = "SH000300"
"""Code of the synthetic benchmark index (features only)."""

REVERSAL = 0.12
"""Planted alpha: fraction of the de-meaned 5-day return that reverts the next day."""

VOLUME_AMP = 0.8
"""Planted alpha: how much abnormal volume amplifies (or damps) the reversal, unitless."""

SECTORS = 8
"""Number of sector factors."""

PRICE_LIMIT = 0.10
"""Daily price limit on simple returns (China A-share main board)."""

T_DF = 4.0
"""Degrees of freedom of the Student-t shocks (fat tails)."""

LATE_SHARE = 0.10
"""Share of stocks that list after the first day."""


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_synthetic` wrote; ``str()`` gives the line the CLI prints."""

    out: Path
    instruments: int
    days: int
    first_day: str
    last_day: str
    market: str
    seconds: float

    def __str__(self) -> str:
        return (
            f"wrote {self.instruments} instruments x {self.days} days ({self.first_day} .. {self.last_day}) "
            f"+ benchmark {BENCHMARK} to {self.out} (market '{self.market}', {self.seconds:.1f} s)"
        )


def write_synthetic(
    out: Path,
    *,
    instruments: int = 300,
    days: int = 1500,
    start: str = "2015-01-05",
    seed: int = 0,
    market: str = "csi300",
    overwrite: bool = False,
) -> SynthSummary:
    """Write a synthetic Qlib-format dataset to ``out`` (atomically).

    Args:
        out: target directory; must be absent or empty unless ``overwrite``.
        instruments: number of stocks (at least 2).
        days: number of trading days (weekdays from ``start``; at least 30).
        start: first calendar day, ``YYYY-MM-DD``.
        seed: random seed; the same arguments always give byte-identical files.
        market: name of the instrument list written besides ``all``.
        overwrite: replace an existing dataset at ``out``.

    Returns:
        A summary whose ``str()`` is one human-readable line.

    Raises:
        DataError: bad sizes, an unparsable start date, or a non-empty ``out``.
    """
    t0 = time.perf_counter()
    calendar = _calendar(start, days)
    if instruments < 2:
        raise DataError(f"--instruments must be at least 2, got {instruments}")
    panel = generate(calendar, instruments, seed)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_panel(tmp, panel, [market])
    return SynthSummary(
        Path(out), instruments, days, f"{calendar[0]:%Y-%m-%d}", f"{calendar[-1]:%Y-%m-%d}", market,
        time.perf_counter() - t0,
    )


def _calendar(start: str, days: int) -> pd.DatetimeIndex:
    if days < 30:
        raise DataError(f"--days must be at least 30 (Alpha158 needs 60 days of history), got {days}")
    try:
        return pd.bdate_range(pd.Timestamp(start), periods=days)
    except (ValueError, TypeError) as e:
        raise DataError(f"--start: cannot parse {start!r} as a date (expected YYYY-MM-DD)") from e


def symbols(n: int) -> list[str]:
    """Return ``n`` stock codes alternating Shanghai (SH600000...) and Shenzhen (SZ000001...)."""
    return [f"SH{600000 + i // 2:06d}" if i % 2 == 0 else f"SZ{1 + i // 2:06d}" for i in range(n)]


def generate(calendar: pd.DatetimeIndex, n: int, seed: int) -> Panel:
    """Simulate ``n`` stocks plus the benchmark over ``calendar``; return the panel (float64).

    Args:
        calendar: trading days.
        n: number of stocks.
        seed: random seed.
    """
    rng = np.random.default_rng(seed)
    t = len(calendar)
    log_ret, vol_level, sigma = _returns(rng, t, n)
    fields = _bars(rng, log_ret, vol_level, sigma)
    _list_late(rng, fields, n)
    codes = symbols(n)
    bench = _benchmark(fields)
    for name, col in bench.items():
        fields[name] = np.column_stack([fields[name], col])
    return Panel(calendar, [*codes, BENCHMARK], fields, listed=codes)


def _garch(shocks: np.ndarray, long_vol: np.ndarray, a: float, b: float) -> np.ndarray:
    """GARCH(1,1) path: returns eps[t] = sqrt(h[t]) * z[t] for unit-variance shocks z (T, K)."""
    omega = long_vol**2 * (1 - a - b)
    h = long_vol**2 * np.ones(shocks.shape[1])
    out = np.empty_like(shocks)
    for k, z in enumerate(shocks):
        out[k] = np.sqrt(h) * z
        h = omega + a * out[k] ** 2 + b * h
    return out


def _t_shocks(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # Scale Student-t to unit variance so the GARCH long-run vol means what it says.
    return rng.standard_t(T_DF, size=shape) / np.sqrt(T_DF / (T_DF - 2))


def _returns(rng: np.random.Generator, t: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (log returns, abnormal log-volume level h, idiosyncratic vol per stock), each (T, N)."""
    sectors = rng.integers(0, SECTORS, size=n)
    beta = np.clip(rng.normal(1.0, 0.25, n), 0.4, 1.8)
    load = np.clip(rng.normal(1.0, 0.2, n), 0.5, 1.5)
    idio_vol = rng.uniform(0.012, 0.025, n)
    market = _garch(_t_shocks(rng, (t, 1)), np.array([0.012]), 0.08, 0.90)[:, 0]
    sector = _garch(_t_shocks(rng, (t, SECTORS)), np.full(SECTORS, 0.008), 0.06, 0.92)
    idio = _garch(_t_shocks(rng, (t, n)), idio_vol, 0.06, 0.92)
    common = beta * market[:, None] + load * sector[:, sectors]
    vol_level = _ar1(rng, t, n, phi=0.9, sd=0.25)
    return _add_alpha(common + idio, vol_level), vol_level, np.broadcast_to(idio_vol, (t, n))


def _ar1(rng: np.random.Generator, t: int, n: int, phi: float, sd: float) -> np.ndarray:
    x = np.empty((t, n))
    x[0] = rng.normal(0, sd / np.sqrt(1 - phi**2), n)
    noise = rng.normal(0, sd, (t, n))
    for k in range(1, t):
        x[k] = phi * x[k - 1] + noise[k]
    return x


def _add_alpha(base: np.ndarray, vol_level: np.ndarray) -> np.ndarray:
    """Feed the planted reversal back into the returns day by day (it depends on past returns)."""
    t, _ = base.shape
    amp = 1 + VOLUME_AMP * np.tanh(vol_level / vol_level.std())
    out = np.empty_like(base)
    limit_hi, limit_lo = np.log1p(PRICE_LIMIT), np.log1p(-PRICE_LIMIT)
    for k in range(t):
        alpha = 0.0
        if k >= 5:
            d5 = out[k - 5 : k].sum(axis=0)
            alpha = -REVERSAL * (d5 - d5.mean()) * amp[k - 1]
        out[k] = np.clip(base[k] + alpha, limit_lo, limit_hi)
    return out


def _bars(rng: np.random.Generator, log_ret: np.ndarray, vol_level: np.ndarray, sigma: np.ndarray) -> dict:
    """Build open/high/low/close/volume/vwap/factor/change (T, N) from the return path."""
    t, n = log_ret.shape
    close = rng.lognormal(np.log(12), 0.8, n) * np.exp(np.cumsum(log_ret, axis=0))
    prev = np.vstack([close[:1] * np.exp(-log_ret[:1]), close[:-1]])
    gap = 0.3 * log_ret + rng.normal(0, 0.2, (t, n)) * sigma
    open_ = prev * np.exp(gap)
    wick = np.abs(rng.normal(0, 0.4, (2, t, n))) * sigma
    high = np.maximum(open_, close) * np.exp(wick[0])
    low = np.minimum(open_, close) * np.exp(-wick[1])
    base_volume = rng.lognormal(np.log(5e6), 1.0, n)
    volume = np.round(base_volume * np.exp(vol_level + 8 * np.abs(log_ret)))
    change = close / prev - 1
    change[0] = np.nan  # no previous close on the first day, as in Qlib's cn_data
    return {
        "open": open_, "high": high, "low": low, "close": close, "volume": volume,
        "vwap": (open_ + high + low + 2 * close) / 5, "factor": np.ones((t, n)), "change": change,
    }


def _list_late(rng: np.random.Generator, fields: dict, n: int) -> None:
    """Blank the first rows of a few stocks (late listings) in place."""
    t = fields["close"].shape[0]
    late = rng.random(n) < LATE_SHARE
    first = rng.integers(1, max(2, t // 4), n)
    for j in np.flatnonzero(late):
        for arr in fields.values():
            arr[: first[j], j] = np.nan
        fields["change"][first[j], j] = np.nan


def _benchmark(fields: dict) -> dict[str, np.ndarray]:
    """Equal-weighted index over the listed stocks, starting at 3000."""
    close = fields["close"]
    simple = np.nanmean(close[1:] / close[:-1] - 1, axis=1)
    idx = 3000 * np.concatenate([[1.0], np.cumprod(1 + simple)])
    prev = np.concatenate([[idx[0]], idx[:-1]])
    rel = {f: np.nanmean(fields[f] / close, axis=1) for f in ("open", "high", "low", "vwap")}
    change = idx / prev - 1
    change[0] = np.nan
    return {
        "close": idx, "open": idx * rel["open"], "high": idx * rel["high"], "low": idx * rel["low"],
        "vwap": idx * rel["vwap"], "volume": np.nansum(fields["volume"], axis=1),
        "factor": np.ones_like(idx), "change": change,
    }
