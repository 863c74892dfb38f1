"""One entry of the dataset cache on disk: a memory-mappable data file plus a JSON sidecar.

``KEY.bin`` holds the handler's big DataFrames (``_data``/``_infer``/``_learn``) as raw arrays,
each at a page-aligned offset, followed by a pickle of the handler with those frames taken out
(their index, columns and array layout are in the pickle). Loading unpickles the small part and
maps the arrays copy-on-write (``mmap`` mode ``c``): N workers on a host share one copy of the
pages in the page cache, and a write by Qlib or a model touches a private copy, never the file.
Frames that are not one numeric dtype stay inside the pickle.

``KEY.json`` is written last (an entry without it is unfinished) and holds the key, the format
version, the data file's length and crc32, and a description for ``qlib-ext cache ls``.

Concurrency promise: files are only ever replaced whole (temp file, fsync, ``os.replace``), so
readers see an old entry, a new one or none, never a torn one; a mapped file that gets replaced
or deleted stays valid for the processes that mapped it.
"""

from __future__ import annotations

import contextlib
import copy
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

logger = logging.getLogger("qlib_ext.cache")

FORMAT_VERSION = 3
"""Version of the on-disk layout; entries of another version are rebuilt (1: one plain pickle;
2: ``_FrameRef`` pickled as ``qlib_ext.cache_entry._FrameRef``, moved to :mod:`qlib_ext.cache.entry` in 3)."""

FRAME_ATTRS = ("_data", "_infer", "_learn")
"""Handler attributes holding the prepared DataFrames (raw, inference, learning)."""

ALIGN = 4096
"""Alignment of each array in the data file (a page), bytes."""

stats: Counter = Counter()
"""Per-process counts of ``built``, ``loaded``, ``rebuilt_corrupt`` and ``uncached`` datasets (for tests)."""

_verified: set[tuple] = set()
"""(path, inode, size, mtime_ns) of data files whose crc32 this process has checked already."""


class Entry:
    """Paths and I/O of one cache entry (see the module docstring)."""

    kind = ""
    """Prefix of this kind of entry's counters in ``stats`` (a handler entry: none)."""

    def __init__(self, cache_dir: Path, key: str):
        self.dir = cache_dir
        self.key = key
        self.data_path = cache_dir / f"{key}.bin"
        self.meta_path = cache_dir / f"{key}.json"
        self.lock_path = cache_dir / f"{key}.lock"

    def read_meta(self) -> dict | None:
        """The sidecar, or None if missing or unreadable."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def try_load(self, report: bool) -> Any:
        """The stored handler, or None if there is no valid entry.

        Args:
            report: log and count an invalid entry (done once, under the lock, before rebuilding it).
        """
        meta = self.read_meta()
        problem = "no sidecar" if meta is None else self._problem(meta)
        handler = None
        if problem is None:
            try:
                handler = self._read(self.data_path, meta["header_offset"])  # type: ignore[index]  # problem is None: meta was read
            except Exception as e:  # noqa: BLE001 - a checksum-valid file that still fails to load: rebuild
                problem = f"loading failed: {e!r}"
        if problem is not None:
            if report and meta is not None:
                logger.warning("cache: entry %s is unusable (%s); rebuilding it", self.key[:12], problem)
                stats[f"{self.kind}rebuilt_corrupt"] += 1
            return None
        stats[f"{self.kind}loaded"] += 1
        logger.info("cache: loaded %s", self.key[:12])
        with contextlib.suppress(OSError):  # "last used" for `cache ls/clear`; a read-only cache is fine
            os.utime(self.meta_path)
        return handler

    def _problem(self, meta: dict) -> str | None:
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != self.key:
            return f"format {meta.get('format')} or key mismatch"
        try:
            st = self.data_path.stat()
        except OSError:
            return "data file missing"
        if st.st_size != meta.get("size"):
            return f"size {st.st_size} != {meta.get('size')} (truncated?)"
        # A full crc32 pass costs ~0.1 s per 250 MB; a long-lived worker pays it once per file.
        ident = (str(self.data_path), st.st_ino, st.st_size, st.st_mtime_ns)
        if ident not in _verified:
            if _crc32(self.data_path) != meta.get("crc32"):
                return "checksum mismatch"
            _verified.add(ident)
        return None

    def write(self, handler: Any, describe: dict, read_back: bool = True) -> Any:
        """Store ``handler`` atomically, then its sidecar (which makes the entry visible).

        Returns:
            The handler read back from the new file, memory-mapped like every loader's copy
            (None when not ``read_back``).
        """
        header_offset: list[int] = []
        size, crc = _atomic_write(self.data_path, lambda fh: header_offset.append(self._write(handler, fh)))
        meta = {"key": self.key, "format": FORMAT_VERSION, "size": size, "crc32": crc,
                "header_offset": header_offset[0], "created": time.time(), **describe}
        _atomic_write(self.meta_path, lambda fh: fh.write(json.dumps(meta, indent=1, default=str).encode()))
        return self._read(self.data_path, meta["header_offset"]) if read_back else None

    # The handler layout; another kind of entry (e.g. :class:`PickleEntry`) stores its object its own way.
    def _write(self, obj: Any, fh: Any) -> int:
        return _write_handler(obj, fh)

    def _read(self, path: Path, header_offset: int) -> Any:
        return _read_handler(path, header_offset)

    def remove(self) -> None:
        """Delete the entry's files (sidecar first, so nobody starts using a half-deleted entry)."""
        for path in (self.meta_path, self.data_path, self.dir / f"{self.key}.pkl"):  # .pkl: format 1
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class PickleEntry(Entry):
    """An entry holding one pickled object (small ones: mapping buys nothing), same sidecar and checks."""

    def _write(self, obj: Any, fh: Any) -> int:
        pickle.dump(obj, fh, protocol=5)
        return 0

    def _read(self, path: Path, header_offset: int) -> Any:
        with open(path, "rb") as fh:
            fh.seek(header_offset)
            return pickle.load(fh)


# --------------------------------------------------------------------------- the data file
def _mappable(df: Any) -> bool:
    import numpy as np
    import pandas as pd

    return isinstance(df, pd.DataFrame) and df.shape[1] > 0 and len(set(df.dtypes)) == 1 \
        and np.issubdtype(df.dtypes.iloc[0], np.number)


def _write_handler(handler: Any, fh: Any) -> int:
    """Write the arrays, then the pickled rest of the handler; return the pickle's offset."""
    import numpy as np

    stripped, seen = copy.copy(handler), {}
    frames: list[Any] = []
    specs: list[Any] = []
    stripped.__dict__ = dict(handler.__dict__)
    for attr in FRAME_ATTRS:
        df = handler.__dict__.get(attr)
        if _mappable(df):
            if id(df) not in seen:  # _infer is often the very same frame as _data: store it once
                seen[id(df)] = len(frames)
                frames.append(df)
            stripped.__dict__[attr] = _FrameRef(seen[id(df)])
    offset = 0
    for df in frames:
        # Pandas' own block layout (columns x rows, C order): the mapped array becomes the block as is.
        block = np.ascontiguousarray(df.to_numpy().T)
        fh.write(b"\0" * (-offset % ALIGN))
        offset += -offset % ALIGN
        specs.append((offset, block.shape, block.dtype.str, df.index, df.columns))
        fh.write(block.data)
        offset += block.nbytes
    stripped.config(dump_all=True)  # keep the remaining private attributes in the pickle
    pickle.dump((stripped, specs), fh, protocol=5)
    return offset


def _read_handler(path: Path, header_offset: int) -> Any:
    import numpy as np
    import pandas as pd

    with open(path, "rb") as fh:
        fh.seek(header_offset)
        handler, specs = pickle.load(fh)
    frames = [pd.DataFrame(np.memmap(path, dtype=np.dtype(dtype), mode="c", offset=off, shape=shape).T,
                           index=index, columns=columns, copy=False)
              for off, shape, dtype, index, columns in specs]
    for attr in FRAME_ATTRS:
        ref = handler.__dict__.get(attr)
        if isinstance(ref, _FrameRef):
            handler.__dict__[attr] = frames[ref.index]
    return handler


class _FrameRef:
    """Placeholder for a frame stored as an array in the data file."""

    def __init__(self, index: int):
        self.index = index


# --------------------------------------------------------------------------- atomic files
class _ChecksumWriter:
    """File wrapper that counts and crc32s every byte written through it."""

    def __init__(self, fh: Any):
        self.fh, self.size, self.crc = fh, 0, 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        return self.fh.write(view)


_unusable: set[str] = set()
"""Cache directories this process found unwritable (logged once each)."""


def unusable(cache_dir: Path, error: OSError) -> None:
    """Note that ``cache_dir`` cannot be written (disk full, read-only, no permission); log it once.

    The cache is an optimisation: a task whose entry cannot be stored builds and uses its object
    without the cache, and does not fail.
    """
    stats["write_failed"] += 1
    if str(cache_dir) not in _unusable:
        _unusable.add(str(cache_dir))
        logger.warning("cache: cannot write to %s (%s: %s); building without the cache", cache_dir,
                       type(error).__name__, error)


def write_or_skip(entry: Entry, obj: Any, describe: dict, read_back: bool = True) -> Any:
    """``entry.write(obj, ...)``; on an OS error (ENOSPC, read-only...) log once and return ``obj`` itself
    (None when not ``read_back``), leaving no partial entry behind."""
    try:
        return entry.write(obj, describe, read_back)
    except OSError as e:
        unusable(entry.dir, e)
        return obj if read_back else None


def _atomic_write(path: Path, dump: Any) -> tuple[int, int]:
    """Write through ``dump(fh)`` to a temp file beside ``path``, fsync, rename; return (size, crc32)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = _ChecksumWriter(raw)
            dump(writer)
            raw.flush()
            os.fsync(raw.fileno())
        # mkstemp makes it 0600 and so it stays: entries are pickles, loading one runs what it says,
        # so only their owner may write them (the directory is 0700 when qlib-ext creates it)
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
