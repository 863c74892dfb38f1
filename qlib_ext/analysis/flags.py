"""Sanity flags on leaderboard rows: results that look like numbers but mean nothing.

Per run (computed by the worker from its validity block, tagged ``qlib_ext.flags`` on the run):

* ``learned_nothing`` — the signal carries no information, for any model class: the predictions are
  (nearly) constant across stocks on at least half the days, or the mean daily IC over the test is
  indistinguishable from zero (HAC t-test, :func:`ic_t_stat`); early stopping alone never fires it;
* ``nan_ic`` — the run logged an IC that is NaN (or its daily IC series is all NaN);
* ``no_trades`` — the backtest traded on no day (turnover 0 throughout);
* ``label_leak`` — a rolling window whose last train/valid sample's label reads a close after the
  first test day's (``gap < horizon``; ``grid.rolling.trunc_days`` missing or too small). Qlib's own
  rolling set-up (label ``Ref($close, -(h+1)) / Ref($close, -1) - 1``, ``trunc_days = h + 1``) is
  exactly at the limit and does not leak; see docs/validity.md.

Per leaderboard row (need the other rows or the statistics):

* ``short_test`` — MinTRL > T: the test is too short for its Sharpe ratio to be significant at 95 %;
* ``inert:<axis>`` — configurations that differ only in this grid axis have the same metrics within
  ``INERT_REL_TOL`` / ``INERT_ABS_TOL``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from qlib_ext.pool.record import Metric, Tag

logger = logging.getLogger(__name__)

LEARNED_NOTHING = "learned_nothing"
NAN_IC = "nan_ic"
NO_TRADES = "no_trades"
LABEL_LEAK = "label_leak"
SHORT_TEST = "short_test"
INERT_PREFIX = "inert:"

FLAGS_TAG = Tag.FLAGS
"""MLflow tag holding a run's flags, comma-separated (set by the worker)."""

FLAT_SHARE = 0.5
"""Share of days with flat predictions from which a model counts as having learned nothing."""

IC_T_CRITICAL = 1.96
"""|t| of the mean daily IC below which the signal is indistinguishable from zero (two-sided 5 %)."""

IC_NOISE = 1e-9
"""A mean daily IC this small is float noise (a constant prediction's correlation), not information."""

INERT_REL_TOL = 1e-4
"""Relative tolerance within which two configurations' metrics count as the same (``inert:``)."""

INERT_ABS_TOL = 1e-6
"""Absolute tolerance within which two configurations' metrics count as the same (``inert:``)."""

DEFAULT_LABELS = {"Alpha158": ["Ref($close, -2)/Ref($close, -1) - 1"],
                  "Alpha360": ["Ref($close, -2)/Ref($close, -1) - 1"]}
"""Label expressions of Qlib's stock handlers when the config sets no ``label``."""

_REF = re.compile(r"Ref\s*\([^,()]*(?:\([^()]*\))?[^,()]*,\s*(-?\d+)\s*\)")


def label_horizon(handler: dict) -> int | None:
    """Trading days the handler's label looks ahead: the largest ``-k`` in its ``Ref(..., -k)``.

    Reads ``kwargs.label`` (a list of expressions, or ``[expressions, names]``), else Qlib's default
    label of Alpha158/Alpha360. None when the label is unknown.
    """
    label = (handler.get("kwargs") or {}).get("label")
    if label is None:
        label = DEFAULT_LABELS.get(str(handler.get("class", "")).rsplit(".", 1)[-1])
    if label is None:
        return None
    if isinstance(label, (list, tuple)) and label and isinstance(label[0], (list, tuple)):
        label = label[0]
    exprs = [label] if isinstance(label, str) else [str(e) for e in label]
    shifts = [-int(k) for e in exprs for k in _REF.findall(e)]
    return max([s for s in shifts if s > 0], default=0)


def ic_t_stat(values: Iterable[float | None], horizon: int | None = None) -> float | None:
    """t statistic of the mean daily IC with a Newey-West (Bartlett) standard error.

    The lag is ``max(horizon - 1, floor(4 (T / 100) ** (2 / 9)))``: a label over ``h`` days makes the
    daily ICs of neighbouring days overlap for ``h - 1`` lags. None with fewer than 3 finite values;
    inf when the ICs are all the same non-zero number.
    """
    x = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(x)
    if n < 3:
        return None
    mean = sum(x) / n
    e = [v - mean for v in x]
    lag = min(n - 1, max((horizon or 0) - 1, int(4 * (n / 100) ** (2 / 9))))
    var = sum(v * v for v in e) / n
    for k in range(1, lag + 1):
        var += 2 * (1 - k / (lag + 1)) * sum(e[i] * e[i - k] for i in range(k, n)) / n
    if var <= 0:
        return math.inf if abs(mean) > IC_NOISE else 0.0
    return mean / math.sqrt(var / n)


def learned_nothing(validity: dict) -> bool:
    """Whether a run's signal carries no information (any model class; see the module docstring).

    Reads ``pred_flat_share``, the daily ``ic`` series and ``label_horizon`` of a validity block.
    Without an IC series only the flat-prediction check applies.
    """
    if validity.get("pred_flat_share", 0.0) >= FLAT_SHARE:
        return True
    values = (validity.get("ic") or {}).get("values") or []
    t = ic_t_stat(values, validity.get("label_horizon"))
    if t is None:
        return False
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return abs(sum(finite) / len(finite)) <= IC_NOISE or abs(t) < IC_T_CRITICAL


def run_flags(validity: dict, metrics: dict, rolling: bool) -> list[str]:
    """The per-run flags of one committed result (see the module docstring)."""
    flags = []
    if learned_nothing(validity):
        flags.append(LEARNED_NOTHING)
    ic_values = (validity.get("ic") or {}).get("values")
    if (Metric.IC in metrics and _missing(metrics[Metric.IC])) or (ic_values and all(v is None for v in ic_values)):
        flags.append(NAN_IC)
    if validity.get("trade_days") == 0:
        flags.append(NO_TRADES)
    horizon, gap = validity.get("label_horizon"), validity.get("label_gap_days")
    if rolling and horizon and gap is not None and leaks(gap, horizon):
        flags.append(LABEL_LEAK)
    return flags


def leaks(gap: int, horizon: int) -> bool:
    """Whether the last pre-test sample reads a price unknown when the first test prediction is made.

    The last train/valid day ``e`` lies ``gap`` trading days before the first test day ``s``; its label
    reads closes up to ``e + horizon``. Qlib's prediction dated ``s`` is made after the close of ``s``
    (it trades on ``s + 1``), so closes up to ``s`` are known: a leak is ``e + horizon > s``, i.e.
    ``gap < horizon``.
    """
    return gap < horizon


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def short_test(min_trl: float | None, days: int) -> bool:
    """MinTRL > T (a MinTRL of None/inf means the Sharpe ratio is not positive: also too short)."""
    return days > 0 and (min_trl is None or min_trl > days)


def inert_axes(rows: Iterable[tuple[dict, dict]], rel_tol: float = INERT_REL_TOL,
               abs_tol: float = INERT_ABS_TOL) -> dict[str, list[int]]:
    """Axes that changed nothing: configurations that differ only in one axis (two or more of its
    values) and have the same metrics within the tolerances.

    Args:
        rows: ``(coords, metrics)`` per configuration, in row order.
        rel_tol: metrics count as the same when ``max - min <= abs_tol + rel_tol * max(|value|)``.
        abs_tol: see ``rel_tol``.

    Returns:
        axis -> indexes of the rows in which changing it changed nothing (only axes with such rows).
    """
    rows = list(rows)
    axes = sorted({k for coords, _ in rows for k in coords})
    out: dict[str, list[int]] = {}
    for axis in axes:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (coords, _) in enumerate(rows):
            if axis in coords:
                rest = repr(sorted((k, repr(v)) for k, v in coords.items() if k != axis))
                groups[rest].append(i)
        inert = [i for g in groups.values() if len({repr(rows[i][0][axis]) for i in g}) > 1
                 and _same([rows[i][1] for i in g], rel_tol, abs_tol) for i in g]
        if inert:
            out[axis] = sorted(inert)
    return out


def _same(metrics: list[dict], rel_tol: float, abs_tol: float) -> bool:
    """Equal within the tolerances on every metric all of them have a number for, and at least one such metric.

    A NaN in one row and a value in another is no evidence either way (a constant prediction's IC is
    NaN or a float-noise 1e-19 depending on the label), so such a metric is left out."""
    keys = set.intersection(*[{k for k, v in m.items() if not _missing(v)} for m in metrics])
    for k in keys:
        values = [float(m[k]) for m in metrics]
        if max(values) - min(values) > abs_tol + rel_tol * max(abs(v) for v in values):
            return False
    return bool(keys)
