"""Which of a task's record configs are ``PortAnaRecord`` s (Qlib's, its subclasses, a user's own), and their
configs: the one rule for grid strategies, expansion, the train-once sweep and cache warming."""

from __future__ import annotations

import functools
import importlib
from typing import Any

PORT_ANA_RECORDS = frozenset({"PortAnaRecord", "MultiPassPortAnaRecord"})
"""Qlib's ``PortAnaRecord`` and its subclasses in Qlib: known without importing Qlib."""

OTHER_QLIB_RECORDS = frozenset({"RecordTemp", "ACRecordTemp", "SignalRecord", "HFSignalRecord", "SigAnaRecord",
                                "MultiSegRecord", "SignalMseRecord"})
"""Qlib's other record classes: known not to be a ``PortAnaRecord`` without importing Qlib."""


def is_port_ana(record: Any) -> bool:
    """Whether a record config is a ``PortAnaRecord`` or a subclass of it (Qlib's ``MultiPassPortAnaRecord``, a
    user's own): its ``class`` names one of Qlib's (bare or dotted), or names a class that, imported from its
    ``module_path``, subclasses ``PortAnaRecord``. The one rule for expansion, sweep and cache warming; the caller
    has checked the module against the allow-list where one applies."""
    if not isinstance(record, dict):
        return False
    module, _, name = str(record.get("class", "")).rpartition(".")
    if name in PORT_ANA_RECORDS or name in OTHER_QLIB_RECORDS:
        return name in PORT_ANA_RECORDS
    module = str(record.get("module_path") or module)
    return bool(module and name) and _subclasses_port_ana(module, name)


@functools.lru_cache(maxsize=256)
def _subclasses_port_ana(module: str, name: str) -> bool:
    try:
        from qlib.workflow.record_temp import PortAnaRecord

        cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - a class that cannot be found is not a PortAnaRecord here; the run says why
        return False
    return isinstance(cls, type) and issubclass(cls, PortAnaRecord)


def portana_configs(task: dict) -> list[dict]:
    """Return the ``config`` mapping of every ``PortAnaRecord`` in ``task['record']`` (each once)."""
    records = task.get("record") or []
    found: dict[int, dict] = {}
    for rec in records if isinstance(records, list) else [records]:
        if is_port_ana(rec):
            cfg = (rec.get("kwargs") or {}).get("config")
            if isinstance(cfg, dict) and isinstance(cfg.get("strategy"), dict):
                found.setdefault(id(cfg), cfg)
    return list(found.values())
