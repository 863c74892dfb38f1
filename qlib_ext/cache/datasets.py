"""Shared cache of prepared Qlib data handlers: build once per configuration, load everywhere else.

In a grid every task builds the same Alpha158 handler, which costs more than fitting LightGBM.
:func:`prepared_dataset` keys the handler config plus the data directory's identity and the
library versions; the first process that needs an entry builds it under a file lock, the others
wait for the lock and load it, memory-mapped so that workers on one host share the pages (the
layout and its atomic writes are in :mod:`qlib_ext.cache.entry`). A partial or corrupt entry is
rebuilt, never used.

Concurrency promise: any number of processes on any number of hosts may call
:func:`prepared_dataset` on one cache directory. The lock only avoids duplicate builds;
correctness rests on atomic renames, so a lock that does not work (some network file systems)
costs repeated builds, never a wrong or torn entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlib_ext.cache.entry import FORMAT_VERSION, Entry, stats, unusable, write_or_skip
from qlib_ext.identity import digest

logger = logging.getLogger(__name__)

LOCK_TIMEOUT_SECONDS = 3600.0
"""How long a process waits for another one's build of the same entry, seconds."""

__all__ = ["prepared_dataset", "load_or_build", "shared", "entry_lock", "handler_config", "dataset_key", "cache_key",
           "data_fingerprint", "key_digest", "versions", "list_entries", "clear", "stats"]


# --------------------------------------------------------------------------- public API
def prepared_dataset(config: dict, cache_dir: str | os.PathLike) -> Any:
    """Return the dataset of ``config``, its handler built once and shared through ``cache_dir``.

    Must run after ``qlib.init``. Datasets that are not a ``DatasetH`` (or subclass) with a handler
    given as a ``{"class", "module_path", ...}`` dict are built uncached.

    Args:
        config: the task's ``dataset`` block (Qlib ``init_instance_by_config`` form).
        cache_dir: directory of cache entries, created if missing; may be on a shared disk.

    Returns:
        The ``qlib.data.dataset.DatasetH`` (or subclass) instance, segments as in ``config``.
    """
    from qlib.data.dataset import Dataset
    from qlib.utils import init_instance_by_config

    klass, kwargs = _dataset_parts(config)
    if klass is None:
        stats["uncached"] += 1
        return init_instance_by_config(config, accept_types=Dataset)
    handler_cfg = kwargs["handler"]
    handler = load_or_build(handler_cfg, Path(cache_dir))
    return klass(**{**kwargs, "handler": handler})


def load_or_build(handler_cfg: dict, cache_dir: Path) -> Any:
    """Load the handler of ``handler_cfg`` from ``cache_dir``, building and storing it if needed.

    Args:
        handler_cfg: a handler config dict with ``class`` and ``module_path``.
        cache_dir: the cache directory.

    Returns:
        The ``DataHandler`` instance with its data set up.
    """
    return shared(Entry(cache_dir, cache_key(handler_cfg)), lambda entry: _build(handler_cfg, entry))


def shared(entry: Entry, build: Callable[[Entry], Any]) -> Any:
    """The object stored in ``entry``, or ``build(entry)`` (which must write it) run by one process at a time.

    Args:
        entry: the cache entry (any kind: the handler layout or a :class:`PickleEntry`).
        build: builds the object, writes it with ``entry.write`` and returns what it wrote.
    """
    from filelock import Timeout

    try:
        entry.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:  # no cache directory (read-only, disk full): build, skip the write
        unusable(entry.dir, e)
        return build(entry)
    obj = entry.try_load(report=False)  # the common case: built before, no lock needed
    if obj is not None:
        return obj
    lock = entry_lock(entry)
    try:
        lock.acquire()
    except Timeout:
        raise
    except OSError as e:  # the lock file cannot be created: nobody can share this entry now
        unusable(entry.dir, e)
        return build(entry)
    try:
        obj = entry.try_load(report=True)  # another process may have built it while we waited
        if obj is None:
            obj = build(entry)
    finally:
        lock.release()
    return obj


def entry_lock(entry: Entry) -> Any:
    """The build lock of ``entry``: one reentrant object per path in a process (so a caller already
    holding it, like the cache warmer, can build through :func:`shared`), a ``flock`` between processes."""
    from filelock import FileLock

    entry.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return FileLock(str(entry.lock_path), timeout=LOCK_TIMEOUT_SECONDS, is_singleton=True)


def handler_config(config: Any) -> dict | None:
    """The handler config of a dataset config the cache handles, else None."""
    return _dataset_parts(config)[1].get("handler")


def dataset_key(config: dict) -> str | None:
    """Identity of the data ``prepared_dataset(config, ...)`` returns: its handler's cache key plus the
    rest of the dataset config (segments, ...); None for a dataset the cache does not handle."""
    klass, kwargs = _dataset_parts(config)
    if klass is None:
        return None
    rest = {k: v for k, v in kwargs.items() if k != "handler"}
    payload = {"handler": cache_key(kwargs["handler"]), "class": f"{klass.__module__}.{klass.__qualname__}",
               "rest": rest}
    return key_digest(payload)


def cache_key(handler_cfg: dict) -> str:
    """Hex sha256 of the handler config, the data directory's identity and the library versions.

    Args:
        handler_cfg: the handler config dict.

    Returns:
        A 64-character hex digest.
    """
    payload = {"handler": handler_cfg, "data": data_fingerprint(), "versions": versions(), "format": FORMAT_VERSION}
    return key_digest(payload)


def data_fingerprint() -> dict:
    """A fingerprint of the data behind ``qlib.init``'s provider URIs, for cache keys: calendars and
    instrument lists (content hashes) and every feature file's size and mtime (one ``os.scandir`` walk,
    milliseconds). Not :func:`qlib_ext.worker.settings.data_identity`, the summary (calendar range,
    instrument count) a pool records to check a worker host's data.
    """
    from qlib.config import C

    uris = C["provider_uri"] if isinstance(C["provider_uri"], dict) else {"day": C["provider_uri"]}
    return {"region": C.get("region"), **{str(freq): _dir_identity(uri) for freq, uri in sorted(uris.items())}}


def versions() -> dict:
    """Library versions an entry depends on (pickles of pandas objects are not portable across them)."""
    import numpy
    import pandas
    import qlib

    import qlib_ext

    return {"pyqlib": qlib.__version__, "qlib_ext": qlib_ext.__version__, "pandas": pandas.__version__,
            "numpy": numpy.__version__}


# --------------------------------------------------------------------------- key helpers
def key_digest(obj: Any) -> str:
    """Hex sha256 of the canonical JSON of ``obj``: the one way every cache key is made."""
    return digest(obj, "sha256")


def _dir_identity(uri: Any) -> dict:
    path = Path(str(uri)).expanduser()
    if not path.is_dir():  # e.g. a remote (client/server) provider: its URI is all we know
        return {"uri": str(uri)}
    path = path.resolve()
    return {"uri": str(path), "calendars": _files_digest(path / "calendars"),
            "instruments": _files_digest(path / "instruments"), "features": _features_digest(path / "features")}


def _files_digest(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _features_digest(folder: Path) -> str:
    """sha256 over (instrument, file, size, mtime_ns) of every feature file."""
    h = hashlib.sha256()
    if not folder.is_dir():
        return ""
    with os.scandir(folder) as instruments:
        for inst in sorted(instruments, key=lambda e: e.name):
            if not inst.is_dir():
                continue
            with os.scandir(inst.path) as files:
                for f in sorted(files, key=lambda e: e.name):
                    st = f.stat()
                    h.update(f"{inst.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _dataset_parts(config: Any) -> tuple[type | None, dict]:
    """The dataset class and kwargs when the config is cacheable, else ``(None, {})``."""
    from qlib.data.dataset import DatasetH
    from qlib.utils import get_callable_kwargs

    if not isinstance(config, dict) or not isinstance(config.get("kwargs", {}).get("handler"), dict):
        return None, {}
    handler = config["kwargs"]["handler"]
    if not isinstance(handler.get("class"), str) or not isinstance(handler.get("module_path"), str):
        return None, {}
    klass, kwargs = get_callable_kwargs(config, default_module="qlib.data.dataset")
    if not (isinstance(klass, type) and issubclass(klass, DatasetH)):
        return None, {}
    return klass, dict(kwargs)


# --------------------------------------------------------------------------- building
def _build(handler_cfg: dict, entry: Entry) -> Any:
    from qlib.data.dataset.handler import DataHandler
    from qlib.utils import init_instance_by_config

    start = time.perf_counter()
    handler = init_instance_by_config(handler_cfg, accept_types=DataHandler)
    seconds = time.perf_counter() - start
    # The builder, too, continues with the mapped copy: its pages are then shared with the loaders.
    mapped = write_or_skip(entry, handler, _describe(handler_cfg, seconds))
    stats["built"] += 1
    logger.info("cache: built %s in %.1fs", entry.key[:12], seconds)
    return mapped


def _describe(handler_cfg: dict, seconds: float) -> dict:
    kwargs = handler_cfg.get("kwargs", {})
    return {"handler": f"{handler_cfg['module_path']}.{handler_cfg['class']}",
            "instruments": kwargs.get("instruments"), "start_time": kwargs.get("start_time"),
            "end_time": kwargs.get("end_time"), "build_seconds": round(seconds, 3)}


# --------------------------------------------------------------------------- ls / clear
STALE_TEMP_SECONDS = 3600.0
"""Age after which a leftover temp file of an interrupted build is removed by ``clear``, seconds."""


def list_entries(cache_dir: str | os.PathLike) -> list[dict]:
    """Describe the entries of ``cache_dir``, most recently used first.

    Args:
        cache_dir: the cache directory (a missing one has no entries).

    Returns:
        One dict per entry: key, handler, instruments, start_time, end_time, size (bytes),
        created and last_used (epoch seconds), build_seconds, complete (False: no valid sidecar).
    """
    rows = []
    for key in _keys(Path(cache_dir)):
        entry = Entry(Path(cache_dir), key)
        meta = entry.read_meta() or {}
        size = sum(p.stat().st_size for p in (entry.data_path, entry.meta_path) if p.exists())
        rows.append({"key": key, "handler": meta.get("handler"), "instruments": meta.get("instruments"),
                     "start_time": meta.get("start_time"), "end_time": meta.get("end_time"), "size": size,
                     "created": meta.get("created"), "last_used": _mtime(entry.meta_path),
                     "build_seconds": meta.get("build_seconds"),
                     "complete": meta.get("key") == key and meta.get("format") == FORMAT_VERSION})
    return sorted(rows, key=lambda r: -(r["last_used"] or 0))


def clear(cache_dir: str | os.PathLike, older_than_days: float | None = None) -> list[str]:
    """Delete entries (all, or those not used for ``older_than_days``) and stale temp files.

    Safe while workers run: a process that mapped an entry keeps reading the deleted file, and a
    build in progress simply writes a fresh entry when it finishes.

    Args:
        cache_dir: the cache directory.
        older_than_days: only entries whose last use is at least this many days ago.

    Returns:
        The keys of the deleted entries.
    """
    folder, now = Path(cache_dir), time.time()
    deleted = []
    for row in list_entries(folder):
        if older_than_days is not None and now - (row["last_used"] or 0) < older_than_days * 86400:
            continue
        entry = Entry(folder, row["key"])
        entry.remove()
        entry.lock_path.unlink(missing_ok=True)  # a waiter on the old lock at worst builds once more
        deleted.append(row["key"])
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
        if now - _mtime(tmp) > STALE_TEMP_SECONDS:
            tmp.unlink(missing_ok=True)
    logger.info("cache: cleared %d entries from %s", len(deleted), folder)
    return deleted


def _keys(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir() if p.suffix in (".bin", ".json", ".pkl") and len(p.stem) == 64})


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
