"""Sanity flags on leaderboard rows: results that look like numbers but mean nothing.

Per run (computed by the worker from its validity block, tagged ``qlib_ext.flags`` on the run):

* ``learned_nothing`` — LightGBM stopped at iteration <= 1, or the predictions are (nearly) constant
  across stocks on at least half the days (a constant signal ranks nothing);
* ``nan_ic`` — the run logged an IC that is NaN (or its daily IC series is all NaN);
* ``no_trades`` — the backtest traded on no day (turnover 0 throughout);
* ``label_leak`` — a rolling window whose last train/valid day plus the label's horizon reaches
  into its test segment (``grid.rolling.trunc_days`` missing or too small).

Per leaderboard row (need the other rows or the statistics):

* ``short_test`` — MinTRL > T: the test is too short for its Sharpe ratio to be significant at 95 %;
* ``inert:<axis>`` — configurations that differ only in this grid axis have identical metrics.
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


def run_flags(validity: dict, metrics: dict, rolling: bool) -> list[str]:
    """The per-run flags of one committed result (see the module docstring)."""
    flags = []
    best = validity.get("best_iteration")
    if (best is not None and best <= 1) or validity.get("pred_flat_share", 0.0) >= FLAT_SHARE:
        flags.append(LEARNED_NOTHING)
    ic_values = (validity.get("ic") or {}).get("values")
    if (Metric.IC in metrics and _missing(metrics[Metric.IC])) or (ic_values and all(v is None for v in ic_values)):
        flags.append(NAN_IC)
    if validity.get("trade_days") == 0:
        flags.append(NO_TRADES)
    horizon, gap = validity.get("label_horizon"), validity.get("label_gap_days")
    if rolling and horizon and gap is not None and gap <= horizon:
        flags.append(LABEL_LEAK)
    return flags


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def short_test(min_trl: float | None, days: int) -> bool:
    """MinTRL > T (a MinTRL of None/inf means the Sharpe ratio is not positive: also too short)."""
    return days > 0 and (min_trl is None or min_trl > days)


def inert_axes(rows: Iterable[tuple[dict, dict]], decimals: int = 12) -> dict[str, list[int]]:
    """Axes that changed nothing: configurations that differ only in one axis (two or more of its
    values) and have identical metrics.

    Args:
        rows: ``(coords, metrics)`` per configuration, in row order.
        decimals: metrics are compared rounded to this many decimals.

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
                 and _same([rows[i][1] for i in g], decimals) for i in g]
        if inert:
            out[axis] = sorted(inert)
    return out


def _same(metrics: list[dict], decimals: int) -> bool:
    """Equal (rounded) on every metric all of them have a number for, and at least one such metric.

    A NaN in one row and a value in another is no evidence either way (a constant prediction's IC is
    NaN or a float-noise 1e-19 depending on the label), so such a metric is left out."""
    keys = set.intersection(*[{k for k, v in m.items() if not _missing(v)} for m in metrics])
    return bool(keys) and len({tuple(round(float(m[k]), decimals) for k in sorted(keys)) for m in metrics}) == 1
