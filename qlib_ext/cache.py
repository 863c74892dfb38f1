"""Shared cache of prepared Qlib data handlers: build once per configuration, load everywhere else.

In a grid every task builds the same Alpha158 handler, which costs more than fitting LightGBM.
:func:`prepared_dataset` keys the handler config plus the data directory's identity and the
library versions; the first process that needs an entry builds it under a file lock, the others
wait for the lock and load it. Entries are written atomically (temp file, fsync, ``os.replace``)
and carry a sidecar with their length and checksum, so a partial or corrupt entry is rebuilt,
never used.

Concurrency promise: any number of processes on any number of hosts may call
:func:`prepared_dataset` on one cache directory. The lock only avoids duplicate builds;
correctness rests on atomic renames, so a lock that does not work (some network file systems)
costs repeated builds, never a wrong or torn entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the on-disk entry layout; entries of another version are rebuilt."""

LOCK_TIMEOUT_SECONDS = 3600.0
"""How long a process waits for another one's build of the same entry, seconds."""

stats: Counter = Counter()
"""Per-process counts of ``built``, ``loaded``, ``rebuilt_corrupt`` and ``uncached`` datasets (for tests)."""


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
    from filelock import FileLock

    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(handler_cfg)
    entry = Entry(cache_dir, key)
    handler = entry.try_load(report=False)  # the common case: built before, no lock needed
    if handler is not None:
        return handler
    with FileLock(str(entry.lock_path), timeout=LOCK_TIMEOUT_SECONDS):
        handler = entry.try_load(report=True)  # another process may have built it while we waited
        if handler is None:
            handler = _build(handler_cfg, entry)
    return handler


def cache_key(handler_cfg: dict) -> str:
    """Hex sha256 of the handler config, the data directory's identity and the library versions.

    Args:
        handler_cfg: the handler config dict.

    Returns:
        A 64-character hex digest.
    """
    payload = {"handler": handler_cfg, "data": data_identity(), "versions": versions(), "format": FORMAT_VERSION}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def data_identity() -> dict:
    """What identifies the data behind ``qlib.init``'s provider URIs: calendars and instrument lists
    (content hashes) and every feature file's size and mtime (one ``os.scandir`` walk, milliseconds).
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
def _canonical(obj: Any) -> str:
    # Dates from YAML, Timestamps and Paths all become strings; key order never matters.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


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
    digest = hashlib.sha256()
    if not folder.is_dir():
        return ""
    with os.scandir(folder) as instruments:
        for inst in sorted(instruments, key=lambda e: e.name):
            if not inst.is_dir():
                continue
            with os.scandir(inst.path) as files:
                for f in sorted(files, key=lambda e: e.name):
                    st = f.stat()
                    digest.update(f"{inst.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


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


# --------------------------------------------------------------------------- entries on disk
class Entry:
    """One cache entry: ``KEY.pkl`` (the pickled handler) and ``KEY.json`` (its sidecar).

    The sidecar is written last, so an entry without one is unfinished; it holds the key, the
    format version, the data file's length and crc32, and a description for ``cache ls``.
    """

    def __init__(self, cache_dir: Path, key: str):
        self.dir = cache_dir
        self.key = key
        self.data_path = cache_dir / f"{key}.pkl"
        self.meta_path = cache_dir / f"{key}.json"
        self.lock_path = cache_dir / f"{key}.lock"

    def read_meta(self) -> dict | None:
        """The sidecar, or None if missing or unreadable."""
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None

    def try_load(self, report: bool) -> Any:
        """The stored handler, or None if there is no valid entry.

        Args:
            report: log and count an invalid entry (done once, under the lock, before rebuilding it).
        """
        meta = self.read_meta()
        if meta is None:
            return None
        problem = self._problem(meta)
        if problem is None:
            try:
                with open(self.data_path, "rb") as fh:
                    handler = pickle.load(fh)
            except Exception as e:  # a checksum-valid file that still fails to load: rebuild
                problem = f"unpickling failed: {e!r}"
        if problem is not None:
            if not report:
                return None
            logger.warning("cache: entry %s is unusable (%s); rebuilding it", self.key[:12], problem)
            stats["rebuilt_corrupt"] += 1
            return None
        stats["loaded"] += 1
        logger.info("cache: loaded %s", self.key[:12])
        with contextlib.suppress(OSError):  # "last used" for `cache ls/clear`; a read-only cache is fine
            os.utime(self.meta_path)
        return handler

    def _problem(self, meta: dict) -> str | None:
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != self.key:
            return f"format {meta.get('format')} / key mismatch"
        try:
            size = self.data_path.stat().st_size
        except OSError:
            return "data file missing"
        if size != meta.get("size"):
            return f"size {size} != {meta.get('size')} (truncated?)"
        if _crc32(self.data_path) != meta.get("crc32"):
            return "checksum mismatch"
        return None

    def write(self, handler: Any, describe: dict) -> None:
        """Store ``handler`` atomically, then its sidecar."""
        handler.config(dump_all=True)  # keep the built _data/_infer/_learn frames in the pickle
        backend = handler.get_backend()  # Qlib's choice per class: pickle, or dill for some handlers
        size, crc = _atomic_write(self.data_path, lambda fh: backend.dump(handler, fh, protocol=5))
        meta = {"key": self.key, "format": FORMAT_VERSION, "size": size, "crc32": crc, "created": time.time(),
                **describe}
        _atomic_write(self.meta_path, lambda fh: fh.write(json.dumps(meta, indent=1, default=str).encode()))


def _build(handler_cfg: dict, entry: Entry) -> Any:
    from qlib.data.dataset.handler import DataHandler
    from qlib.utils import init_instance_by_config

    start = time.perf_counter()
    handler = init_instance_by_config(handler_cfg, accept_types=DataHandler)
    seconds = time.perf_counter() - start
    entry.write(handler, _describe(handler_cfg, seconds))
    stats["built"] += 1
    logger.info("cache: built %s in %.1fs", entry.key[:12], seconds)
    return handler


def _describe(handler_cfg: dict, seconds: float) -> dict:
    kwargs = handler_cfg.get("kwargs", {})
    return {"handler": f"{handler_cfg['module_path']}.{handler_cfg['class']}",
            "instruments": kwargs.get("instruments"), "start_time": kwargs.get("start_time"),
            "end_time": kwargs.get("end_time"), "build_seconds": round(seconds, 3)}


class _ChecksumWriter:
    """File wrapper that counts and crc32s every byte written through it."""

    def __init__(self, fh: Any):
        self.fh, self.size, self.crc = fh, 0, 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        return self.fh.write(view)


def _atomic_write(path: Path, dump: Any) -> tuple[int, int]:
    """Write through ``dump(fh)`` to a temp file beside ``path``, fsync, rename; return (size, crc32)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = _ChecksumWriter(raw)
            dump(writer)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users of a shared cache must read it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return writer.size, writer.crc


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc
