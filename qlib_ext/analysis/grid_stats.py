"""The validity numbers of a leaderboard: per row Sharpe, PSR, DSR, MinTRL and flags; per grid N and PBO.

Inputs are the leaderboard's rows (one per configuration, rolling windows already stitched), each
with ``returns`` (a pandas Series of daily excess return with cost, or None), ``coords``, ``metrics``
and the per-run ``flags``. Nothing here touches MLflow or the store.
"""

from __future__ import annotations

import logging
from typing import Any

from qlib_ext import defaults
from qlib_ext.analysis import flags as fl
from qlib_ext.analysis import stats

logger = logging.getLogger(__name__)

STAT_KEYS = ("sharpe", "psr", "dsr", "min_trl", "T", "skew", "kurtosis")
"""Per-row statistics the leaderboard shows and can rank by."""


def annotate(rows: list[dict], *, trials: int | None = None, blocks: int = defaults.PBO_BLOCKS,
             failed: int = 0) -> dict[str, Any]:
    """Add ``stats`` (STAT_KEYS) and final ``flags`` to every row; return the grid's numbers.

    N (the DSR's number of trials) = the rows that produced a return series + ``trials`` (configurations
    tried outside this pool). Failed tasks produced no returns and are not counted, only reported.

    Returns:
        ``{"trials": N, "trials_in_pool": ..., "trials_declared": ..., "failed_tasks": ..., "pbo": {...}}``;
        ``pbo`` holds :meth:`stats.PBOResult.summary` or ``{"error": why it could not be computed}``.
    """
    with_returns = [r for r in rows if r.get("returns") is not None and len(r["returns"].dropna()) > 2]
    n = len(with_returns) + (trials or 0)
    sharpe = {id(r): stats.sharpe_stats(r["returns"].to_numpy()) for r in with_returns}
    dsr = dict(zip(sharpe, stats.deflate(list(sharpe.values()), n_trials=max(n, 1)), strict=True))
    for row in rows:
        s = sharpe.get(id(row))
        row["stats"] = {**s.as_dict(), "dsr": stats.finite(dsr[id(row)])} if s else dict.fromkeys(STAT_KEYS)
        row["flags"] = list(row.get("flags") or [])
        if s and fl.short_test(row["stats"]["min_trl"], s.T):
            row["flags"].append(fl.SHORT_TEST)
    for axis, idx in fl.inert_axes((r.get("coords") or {}, r.get("compare") or {}) for r in rows).items():
        for i in idx:
            rows[i]["flags"].append(f"{fl.INERT_PREFIX}{axis}")
    return {"trials": n, "trials_in_pool": len(with_returns), "trials_declared": trials or 0,
            "failed_tasks": failed, "pbo": pbo(with_returns, blocks)}


def pbo(rows: list[dict], blocks: int = defaults.PBO_BLOCKS) -> dict[str, Any]:
    """PBO by CSCV over the rows' daily returns aligned on the days they all have, unless the rows'
    Sharpe ratios cannot be told apart (:func:`stats.sharpe_equality`): then ``pbo`` is None,
    ``indistinguishable`` True and ``cscv_pbo`` holds the number CSCV gave. ``equality`` holds the test."""
    import pandas as pd

    if len(rows) < 2:
        return {"error": f"needs at least 2 configurations with returns, have {len(rows)}"}
    matrix = pd.concat({i: r["returns"] for i, r in enumerate(rows)}, axis=1, join="inner").dropna()
    try:
        out = stats.pbo_cscv(matrix.to_numpy(), blocks=blocks).summary()
    except ValueError as e:
        return {"error": str(e)}
    equality = stats.sharpe_equality(matrix.to_numpy())
    out.update(equality=equality.summary(), indistinguishable=equality.indistinguishable)
    if equality.indistinguishable:
        out["cscv_pbo"], out["pbo"] = out["pbo"], None
    return out
