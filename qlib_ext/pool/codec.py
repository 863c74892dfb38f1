"""Reading the pickled fields of a pool document (``def``, ``res``) as data, never as code.

Qlib's ``TaskManager`` stores a task's ``def`` and ``res`` as pickles and unpickles them with
``pickle.loads``: anyone who can write one document into the pool can make every worker (and the
cache warmer) run code of their choosing. Our own pickles hold plain data only (dicts, lists,
strings, numbers, None: checked for every shipped workflow), so they are read here through an
unpickler that resolves no global outside :data:`SAFE_GLOBALS` — the builtin containers and
scalars, :mod:`datetime`, :mod:`decimal` and :mod:`collections` types, and ``pandas.Timestamp`` (the dates
Qlib's own ``RollingGen`` puts in the tasks it generates). It is the same idea as Qlib's
main-branch ``qlib.utils.pickle_utils.RestrictedUnpickler``, narrower: no other pandas class, no
numpy or Qlib classes, and no ``builtins.type``.

One exception, in ``res`` only: the Recorder that Qlib's ``run_task`` commits there (``task_train``'s or
``begin_task_train``'s return value, an ``MLflowRecorder`` holding an ``MlflowClient``) is read as a
:class:`RecorderRef`: an inert object with the pickled attributes, built without importing or running any
Qlib or MLflow code. ``DelayTrainerRM``'s second stage needs its run id.

A field that does not decode raises :class:`~qlib_ext.errors.TaskDecodeError`, naming the task, the
field and the refused global; the worker fails that one task with it (no retry: it is not going to
decode next time either).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from qlib_ext.errors import TaskDecodeError
from qlib_ext.pool.record import META, QLIB_ENCODED_PREFIXES, Doc, TaskMeta

ENCODED_PREFIXES = QLIB_ENCODED_PREFIXES
"""Qlib's ``TaskManager.ENCODE_FIELDS_PREFIX``: document fields whose names start with these are pickles."""

SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    *(("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes",
                                       "bytearray", "int", "float", "bool", "complex", "slice", "range")),
    *(("datetime", name) for name in ("date", "datetime", "time", "timedelta", "timezone")),
    ("decimal", "Decimal"),
    *(("collections", name) for name in ("OrderedDict", "defaultdict", "Counter", "deque")),
    # pandas.Timestamp: Qlib's RollingGen writes the segments of the tasks it generates as Timestamps; the
    # constructor only builds a Timestamp from an integer, a resolution and a time zone (itself refused
    # unless it is a datetime.timezone)
    ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"),
})
"""``(module, name)`` pairs a task pickle may reference; anything else is refused before it is imported."""


class AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the ``(module, name)`` pairs in ``allowed`` (one per load).

    Subclasses set ``allowed`` and ``holds`` (what the refusal says the pickle may hold).
    """

    allowed: frozenset[tuple[str, str]] = SAFE_GLOBALS
    where = "a pool field"
    holds = "plain data only (dict, list, str, numbers, datetime, collections)"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: {self.where} may hold {self.holds}")


class PlainUnpickler(AllowListUnpickler):
    """Resolves only :data:`SAFE_GLOBALS`: what a pool's ``def``/``res`` may reference."""


RECORDER_MODULE = "qlib.workflow.recorder"
"""Module of Qlib's Recorder classes, whose pickles ``run_task`` commits in ``res``."""


class _Inert:
    """Stands in for any class a pickled Recorder names (its MLflow client and what that holds): takes any
    arguments, runs no code, keeps the pickled state as attributes."""

    def __new__(cls, *_args: Any, **_kwargs: Any) -> Any:
        return object.__new__(cls)

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})


class RecorderRef(_Inert):
    """A Qlib Recorder from ``res``, as data: which MLflow run it names (``run_id``, ``experiment_id``, ``uri``)."""

    @property
    def run_id(self) -> str:
        return str(self.__dict__.get("id") or "")

    @property
    def experiment_id(self) -> str:
        return str(self.__dict__.get("experiment_id") or "")

    @property
    def uri(self) -> str:
        return str(self.__dict__.get("_uri") or "")


class ResUnpickler(PlainUnpickler):
    """:class:`PlainUnpickler`, plus a Qlib Recorder read as a :class:`RecorderRef` (``res`` only)."""

    where = "field 'res'"
    holds = "plain data or a Qlib Recorder"

    def find_class(self, module: str, name: str) -> Any:
        if module == RECORDER_MODULE and name.endswith("Recorder"):
            return RecorderRef
        if module.split(".")[0] == "mlflow":
            return _Inert
        return super().find_class(module, name)


def loads(blob: bytes, where: str = "pickle", unpickler: type[pickle.Unpickler] = PlainUnpickler) -> Any:
    """Unpickle ``blob`` allowing plain data only (``unpickler``: :class:`ResUnpickler` for ``res``).

    Args:
        blob: the pickle's bytes.
        where: what is decoded, for the error message (e.g. ``"task 65a...: field 'def'"``).
        unpickler: the allow-list to read it with.

    Raises:
        TaskDecodeError: the pickle names a refused global or is not a valid pickle.
    """
    try:
        return unpickler(io.BytesIO(bytes(blob))).load()
    except Exception as e:  # noqa: BLE001 - a broken pickle raises anything from EOFError to TypeError
        raise TaskDecodeError(f"{where} cannot be decoded as plain data: {type(e).__name__}: {e}") from e


def dumps(value: Any) -> bytes:
    """Pickle plain data the way :func:`loads` reads it back (checked: refuses what loads would)."""
    blob = pickle.dumps(value, protocol=4)
    loads(blob, "value to store")
    return blob


def decode_document(doc: dict) -> dict:
    """Decode a pool document's pickled fields in place (``TaskManager._decode_task``, restricted).

    Raises:
        TaskDecodeError: a field does not decode; the message names the task and the field.
    """
    for key in list(doc):
        if key.startswith(ENCODED_PREFIXES) and isinstance(doc[key], (bytes, bytearray)):
            reader = ResUnpickler if key == Doc.RES else PlainUnpickler
            doc[key] = loads(doc[key], f"task {doc.get('_id')}: field {key!r}", reader)
    return doc


def check_shape(task: Any, task_id: Any = None) -> dict:
    """Return ``task`` if it has the shape a worker runs, else raise naming what is wrong.

    A training task needs ``model`` and ``dataset`` dicts; a backtest task (``qlib_ext.kind: backtest``)
    needs ``record`` and ``qlib_ext.parent_run_id``; ``qlib_ext`` and ``record``, when present, must be a
    dict and a dict or list.

    Raises:
        TaskDecodeError: the definition is not a dict, or a key is missing or of the wrong type.
    """
    where = f"task {task_id}: 'def'" if task_id is not None else "task 'def'"
    if not isinstance(task, dict):
        raise TaskDecodeError(f"{where} is a {type(task).__name__}, not a task dict")
    block = task.get(META, {})
    if not isinstance(block, dict):
        raise TaskDecodeError(f"{where}: key 'qlib_ext' is a {type(block).__name__}, expected a dict")
    if "record" in task and not isinstance(task["record"], (dict, list)):
        raise TaskDecodeError(f"{where}: key 'record' is a {type(task['record']).__name__}, expected a list")
    meta = TaskMeta.from_dict(block)
    if meta.is_backtest:
        required: dict[str, type | tuple[type, ...]] = {"record": (dict, list)}
        if not meta.parent_run_id:
            raise TaskDecodeError(f"{where}: a backtest task needs key 'qlib_ext.parent_run_id'")
    else:
        required = {"model": dict, "dataset": dict}
    for key, kind in required.items():
        if not isinstance(task.get(key), kind):
            got = "missing" if key not in task else f"a {type(task[key]).__name__}"
            raise TaskDecodeError(f"{where}: key {key!r} is {got}; a task needs keys {', '.join(required)}")
    return task
