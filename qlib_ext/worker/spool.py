"""Finished results that could not be committed yet, kept on local disk until they are.

A worker that finishes a task while the store is unreachable writes the result to
``$QLIB_EXT_HOME/spool/<pool>/<task id>-a<attempt>.json`` (atomically: temp file, fsync, rename)
and keeps retrying the commit. If it is stopped or killed first, the next worker started with
the same ``QLIB_EXT_HOME`` replays the file. Either way the commit is fenced (``commit`` accepts it
only if nobody claimed the task since), and the file is removed once the store answered.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bson import ObjectId
from bson.errors import InvalidId

from qlib_ext import defaults
from qlib_ext.pool.manager import Claim
from qlib_ext.pool.record import Doc, SpoolEntry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spooled:
    """One spooled result: the claim it was produced under, the result, and its file."""

    claim: Claim
    result: dict
    path: Path


def spool_dir(pool: str) -> Path:
    """The spool directory of ``pool`` under qlib-ext's home."""
    return defaults.home() / "spool" / pool


def write(pool: str, claim: Claim, result: dict) -> Path:
    """Write ``result`` for ``claim`` atomically; return the file's path."""
    directory = spool_dir(pool)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{claim.id}-a{claim.attempt}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    blob = {SpoolEntry.TASK_ID: str(claim.id), SpoolEntry.WORKER: claim.worker, SpoolEntry.ATTEMPT: claim.attempt,
            SpoolEntry.RESULT: result}
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:  # owner-only
        json.dump(blob, f, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def pending(pool: str) -> list[Spooled]:
    """Spooled results of ``pool``, oldest first; unreadable files are skipped with a warning."""
    directory = spool_dir(pool)
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            blob = json.loads(path.read_text())
            claim = Claim(task={Doc.ID: ObjectId(blob[SpoolEntry.TASK_ID])}, worker=blob[SpoolEntry.WORKER],
                          attempt=blob[SpoolEntry.ATTEMPT])
        except (OSError, ValueError, KeyError, InvalidId) as e:
            logger.warning("spool: cannot read %s (%s); leaving it for inspection", path, e)
            continue
        out.append(Spooled(claim, blob[SpoolEntry.RESULT], path))
    return out


def remove(path: Path) -> None:
    """Forget a spooled result (committed, or refused because the task is someone else's)."""
    path.unlink(missing_ok=True)
