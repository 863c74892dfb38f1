"""Durability: an append-only journal with group commit, compacted into a snapshot.

Files in the store directory:

* ``snapshot.bson`` - framed records rebuilding the whole state; the first says which journal
  generation follows it. Written to a temporary file, fsynced, then renamed: always complete.
* ``journal-<gen>.log`` - one framed record per write command, appended before the command is
  acknowledged. A torn record at the end (a crash mid-write) fails its CRC and is cut off at replay.

A frame is ``<u32 length><u32 crc32><BSON payload>``. Group commit: a writer appends its record
under the engine lock, then waits outside it; the first waiter runs ``fdatasync`` for everything
written so far and every writer whose record it covered returns with it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import bson

from qlib_ext.errors import StoreError
from qlib_ext.store.wire import CODEC

logger = logging.getLogger(__name__)

FRAME = struct.Struct("<II")
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
SNAPSHOT = "snapshot.bson"
FILE_MODE = 0o600
"""Snapshot and journal hold every task: readable by the store's owner only."""


def frame(record: dict[str, Any]) -> bytes:
    """Encode one record with its length and CRC."""
    payload = bson.encode(record)
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_frames(path: Path) -> tuple[list[dict[str, Any]], int, int]:
    """Records of a framed file, the byte offset after the last good one, and the file size."""
    data = path.read_bytes()
    records, pos = [], 0
    while pos + FRAME.size <= len(data):
        length, crc = FRAME.unpack_from(data, pos)
        payload = data[pos + FRAME.size: pos + FRAME.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        try:
            records.append(bson.decode(payload, CODEC))
        except (bson.errors.BSONError, RecursionError, ValueError) as e:  # intact but unreadable: skip it
            logger.error("store: skipping an unreadable record at byte %d of %s: %r", pos, path, e)
        pos += FRAME.size + length
    return records, pos, len(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Append-only log of one store directory.

    Concurrency: :meth:`append` and :meth:`compact` must be called under the engine lock (they
    define the order of records); :meth:`wait_durable` is called without it, from any thread.
    """

    def __init__(self, directory: Path, compact_bytes: int):
        self.dir = directory
        self.compact_bytes = compact_bytes
        self.gen = 0
        self.snapshot_bytes = 0
        self.journal_bytes = 0
        self._fd = -1
        self._written = 0
        self._flushed = 0
        self._syncing = False
        self._error: OSError | None = None  # a failed flush: no later flush may be trusted
        self._cv = threading.Condition()

    def _journal_path(self, gen: int) -> Path:
        return self.dir / f"journal-{gen}.log"

    def open(self) -> Iterator[dict[str, Any]]:
        """Yield every stored record (snapshot, then journal) and open the journal for appends."""
        snap = self.dir / SNAPSHOT
        if snap.exists():
            records, good, size = read_frames(snap)
            if good != size or not records or "gen" not in records[0]:
                raise StoreError(f"{snap} is damaged ({good} of {size} bytes readable); "
                                 "restore it from a backup or move it away to start empty")
            self.gen, self.snapshot_bytes = records[0]["gen"], size
            yield from records[1:]
        path = self._journal_path(self.gen)
        if path.exists():
            records, good, size = read_frames(path)
            if good != size:
                logger.warning("store: cutting a torn record (%d bytes) off the end of %s", size - good, path)
                os.truncate(path, good)
            self.journal_bytes = good
            yield from records
        for stale in self.dir.glob("journal-*.log"):
            if stale != path:
                stale.unlink()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        os.fchmod(self._fd, FILE_MODE)  # files written by an older version were world-readable
        if snap.exists():
            snap.chmod(FILE_MODE)

    def append(self, ops: list[dict[str, Any]]) -> int:
        """Write one record (not yet durable); return its sequence number for :meth:`wait_durable`."""
        data = frame({"ops": ops})
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.journal_bytes += len(data)
        with self._cv:
            self._written += 1
            return self._written

    def wait_durable(self, lsn: int) -> None:
        """Block until record ``lsn`` is on disk, sharing one fdatasync among concurrent writers."""
        with self._cv:
            while self._flushed < lsn:
                if self._error is not None:
                    raise OSError(f"an earlier journal flush failed: {self._error}")
                if self._syncing:
                    self._cv.wait()
                    continue
                self._syncing, target, fd = True, self._written, self._fd
                self._cv.release()
                try:
                    _datasync(fd)
                except OSError as e:
                    self._error = e
                    raise
                finally:
                    self._cv.acquire()
                    self._syncing = False
                    self._cv.notify_all()
                self._flushed = max(self._flushed, target)

    def needs_compaction(self) -> bool:
        """Whether the journal has grown past its budget and twice the snapshot's size."""
        return self.journal_bytes > max(self.compact_bytes, 2 * self.snapshot_bytes)

    def compact(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace snapshot + journal by a snapshot of ``records`` (the whole current state)."""
        with self._cv:
            while self._syncing:
                self._cv.wait()
            new_gen = self.gen + 1
            tmp = self.dir / (SNAPSHOT + ".tmp")
            tmp.unlink(missing_ok=True)
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb") as f:
                f.write(frame({"gen": new_gen}))
                for record in records:
                    f.write(frame(record))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / SNAPSHOT)
            _fsync_dir(self.dir)
            old_fd, old_path = self._fd, self._journal_path(self.gen)
            self._fd = os.open(self._journal_path(new_gen), os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
            _fsync_dir(self.dir)
            os.close(old_fd)
            old_path.unlink(missing_ok=True)
            self.gen, self.journal_bytes = new_gen, 0
            self.snapshot_bytes = (self.dir / SNAPSHOT).stat().st_size
            self._flushed = self._written  # the snapshot holds everything appended so far
            self._cv.notify_all()
        logger.info("store: compacted into %s (%d bytes)", SNAPSHOT, self.snapshot_bytes)

    def close(self) -> None:
        """Flush and close the journal file."""
        with self._cv:
            if self._fd >= 0:
                _datasync(self._fd)
                os.close(self._fd)
                self._fd = -1
                self._flushed = self._written
                self._cv.notify_all()
