"""What ``status`` and ``run`` show of a search: trials per state, the best trial, how the best improved."""

from __future__ import annotations

from collections import Counter

from pymongo.database import Database

from qlib_ext.pool.database import find_pool_meta
from qlib_ext.pool.record import PoolMeta, TaskMeta, Trial
from qlib_ext.search.trials import TrialState, TrialStore


def best_so_far(docs: list[dict]) -> list[tuple[int, float]]:
    """``(trial number, value)`` each time a completed trial beat every earlier one, in trial order."""
    out: list[tuple[int, float]] = []
    for doc in sorted(docs, key=lambda d: d[Trial.NUMBER]):
        if doc[Trial.STATE] != TrialState.COMPLETE.value or doc.get(Trial.VALUE) is None:
            continue
        sign = 1 if doc[Trial.OBJECTIVE]["direction"] == "maximize" else -1
        if not out or sign * doc[Trial.VALUE] > sign * out[-1][1]:
            out.append((doc[Trial.NUMBER], doc[Trial.VALUE]))
    return out


def summary_lines(db: Database, pool: str) -> list[str]:
    """Lines about ``pool``'s search; none when the pool has no search."""
    docs = TrialStore(db, pool).all()
    if not docs:
        return []
    counts = Counter(d[Trial.STATE] for d in docs)
    meta = find_pool_meta(db, pool, [PoolMeta.Field.SEARCH])
    n_trials = (meta.search_trials if meta else None) or len(docs)
    objective = docs[0][Trial.OBJECTIVE]
    lines = [f"search {docs[0]['sampler']}: {len(docs)} of {n_trials} trials — "
             + ", ".join(f"{s.value} {counts[s.value]}" for s in TrialState if counts[s.value])]
    if docs[0].get(Trial.OBJECTIVES):
        return lines + front_lines(docs)
    improved = best_so_far(docs)
    if improved:
        number, value = improved[-1]
        best = next(d for d in docs if d[Trial.NUMBER] == number)
        lines.append(f"best {objective['metric']} {value:.4f} ({objective['direction']}) at trial {number}: "
                     f"{str(TaskMeta.of(best['tasks'][0]).run_name).rsplit(' w', 1)[0]}")
        lines.append("best so far: " + ", ".join(f"#{n} {v:.4f}" for n, v in improved))
    return lines


def front_lines(docs: list[dict]) -> list[str]:
    """A multi-objective search's Pareto front: its completed trials that no other completed trial dominates."""
    from qlib_ext.analysis.pareto import front_ranks

    objectives = docs[0][Trial.OBJECTIVES]
    done = [d for d in docs if d[Trial.STATE] == TrialState.COMPLETE.value and d.get(Trial.VALUE)]
    ranks = front_ranks([d[Trial.VALUE] for d in done], [o["direction"] for o in objectives])
    front = [d for d, r in zip(done, ranks, strict=True) if r == 1]
    if not front:
        return []
    names = ", ".join(f"{o['metric']} ({o['direction']})" for o in objectives)
    return [f"Pareto front over {names}: {len(front)} of {len(done)} completed trials — "
            + "; ".join(f"#{d[Trial.NUMBER]} (" + ", ".join(f"{v:.4f}" for v in d[Trial.VALUE]) + ")" for d in front)]
