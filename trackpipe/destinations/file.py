"""The file destination: every message as one NDJSON line, in rotating files.

Files are `<directory>/<prefix>-<UTC time>.ndjson` (`.ndjson.gz` with gzip).
A new file starts when the current one reaches `max_bytes`, is `max_age_seconds`
old, or the server starts, so a file is never appended to by two runs. Each
batch is fsynced before it counts as delivered. With gzip every batch is its
own gzip member (gzip readers concatenate members), so a crash can cut at most
the batch being written and everything before it stays readable. A batch that
fails is cut back out of the file, and a file created for it is removed (retries
during an outage leave no empty files). A file moved away or replaced while trackpipe
runs is left alone: the next batch starts a new file.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Sequence

import msgspec

from trackpipe.destinations.base import DELIVERED, Destination, DestinationError, Event, Outcome
from trackpipe.destinations.base import fail, retry

# A full or failing disk, or a directory that is briefly gone (an unmounted volume),
# can heal on its own; a permission or path problem needs someone to change something.
RETRYABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOENT,
                              errno.EAGAIN, errno.EINTR, errno.ESTALE})


class FileDestination(Destination):
    kind = "file"
    default_batch_size = 500

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        directory: str
        """Where the files go; created at start when missing."""
        prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]+$")] = "events"
        """File names start with this (letters, digits, '.', '_', '-')."""
        max_bytes: Annotated[int, msgspec.Meta(gt=0)] = 64 * 1024 * 1024
        """Start a new file once the current one holds this many bytes (as written)."""
        max_age_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3600
        """Start a new file once the current one is this old."""
        gzip: bool = False
        """Write `.ndjson.gz`, one gzip member per batch."""

    def __init__(self, name: str, settings: msgspec.Struct):
        super().__init__(name, settings)
        self._fd: int | None = None  # the current file, held open from creation to rotation
        self._path: Path | None = None  # its name
        self._size = 0
        self._opened_at = 0.0
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            Path(self.settings.directory).mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # each send reports the problem with the file it tried to write

    async def send(self, batch: Sequence[Event]) -> Outcome:
        data = b"".join(e.json + b"\n" for e in batch)
        await self._lock.acquire()
        # The lock is released when the write thread ends, not when this call does: a send
        # cancelled by the worker's timeout leaves its thread running, and the next batch
        # must wait for it (on the event loop, holding no thread) rather than write beside it.
        write = asyncio.ensure_future(asyncio.to_thread(self._append, data))
        write.add_done_callback(self._write_done)
        try:
            await asyncio.shield(write)
        except OSError as exc:
            return os_error_outcome(exc, self.settings.directory)
        return DELIVERED

    def _write_done(self, write: asyncio.Future) -> None:
        self._lock.release()
        if not write.cancelled():
            write.exception()  # seen by send, or by nobody after a timeout: not an error to log

    async def close(self) -> None:
        async with self._lock:  # a write still running after a timeout ends first
            self._release_file()

    async def check(self) -> str:
        directory = self.settings.directory
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".trackpipe-check-"):
                pass
        except OSError as exc:
            raise DestinationError(f"File destination {self.name!r} cannot write in {directory}:"
                                   f" {exc.strerror}. Create the directory and give the user"
                                   " running trackpipe write access to it.") from None
        return f"can write files in {directory}"

    # -- runs in a worker thread, one batch at a time (the lock) -------------------

    def _append(self, data: bytes) -> None:
        payload = gzip.compress(data, mtime=0) if self.settings.gzip else data
        fd = self._current_file()
        start = os.fstat(fd).st_size  # the real size, what a failed write must cut back to
        try:
            _write_all(fd, payload)
            os.fsync(fd)
        except OSError:
            self._cut_back(fd, start)
            raise
        self._size = start + len(payload)

    def _current_file(self) -> int:
        """The open file to append to; a new one when rotation is due or when the name no
        longer leads to the file we hold (moved away or replaced: someone else's now)."""
        if self._fd is None or self._due_for_rotation() or not self._still_at_path(self._fd):
            return self._create()
        return self._fd

    def _still_at_path(self, fd: int) -> bool:
        # The name is looked up each batch, so a file or directory moved away is noticed.
        # Holding the file open keeps its inode number from being reused: equal numbers
        # mean the very same file, not a new one created where ours was.
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return False  # a vanished directory: _create says so, and ours waits for it
        held = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    def _due_for_rotation(self) -> bool:
        return (self._size >= self.settings.max_bytes
                or time.monotonic() - self._opened_at >= self.settings.max_age_seconds)

    def _create(self) -> int:
        directory = Path(self.settings.directory)
        suffix = ".ndjson.gz" if self.settings.gzip else ".ndjson"
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        while True:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            path = directory / f"{self.settings.prefix}-{stamp}{suffix}"
            try:
                fd = os.open(path, flags, 0o644)
            except FileExistsError:
                continue  # another writer took this microsecond
            try:
                _fsync_dir(directory)  # the new name must survive a crash too
            except OSError:
                os.close(fd)
                _remove_quietly(path)  # empty, and the retry creates another
                raise
            self._release_file()
            self._fd, self._path = fd, path
            self._size, self._opened_at = 0, time.monotonic()
            return fd

    def _cut_back(self, fd: int, size: int) -> None:
        """After a failed write: drop what this write added, so the file holds whole lines
        (or whole gzip members) only, and start a fresh file next time. Cut through the
        descriptor: the name may lead to another file by now. A file created for this
        write is removed instead: each retry during an outage (a full disk) creates one,
        and would leave it behind empty."""
        if size == 0 and self._size == 0 and self._remove_if_ours(fd):
            self._release_file()
            return
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            pass  # the disk is failing; the next batch starts a new file
        self._release_file()

    def _remove_if_ours(self, fd: int) -> bool:
        try:
            return self._still_at_path(fd) and _remove_quietly(self._path)
        except OSError:
            return False  # left in place, and cut back like any other

    def _release_file(self) -> None:
        fd, self._fd, self._path = self._fd, None, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # every batch written to it was fsynced; nothing is left to lose


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


def _remove_quietly(path: Path) -> bool:
    try:
        os.unlink(path)
    except OSError:
        return False  # the disk is failing: an empty file is left behind
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error_outcome(exc: OSError, directory: str) -> Outcome:
    where = exc.filename or directory
    code = errno.errorcode.get(exc.errno or 0, "unknown")
    if exc.errno in RETRYABLE_ERRNOS:
        return retry(None, f"cannot write {where}: {exc.strerror} ({code}); trackpipe retries."
                           f" Free disk space or remount {directory} if it persists.")
    return fail(None, f"cannot write {where}: {exc.strerror} ({code}). Check that {directory}"
                      " is a directory the user running trackpipe can write, then replay"
                      " the failed events.")
