"""The file destination: every message as one NDJSON line, in rotating files.

Files are `<directory>/<prefix>-<UTC time>.ndjson` (`.ndjson.gz` with gzip).
A new file starts when the current one reaches `max_bytes`, is `max_age_seconds`
old, or the server starts, so a file is never appended to by two runs. Each
batch is fsynced before it counts as delivered. With gzip every batch is its
own gzip member (gzip readers concatenate members), so a crash can cut at most
the batch being written and everything before it stays readable.
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
        self._path: Path | None = None
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
        async with self._lock:
            try:
                await asyncio.to_thread(self._append, data)
            except OSError as exc:
                return os_error_outcome(exc, self.settings.directory)
        return DELIVERED

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
        if self._due_for_rotation():
            self._path, self._size, self._opened_at = self._create(), 0, time.monotonic()
        payload = gzip.compress(data, mtime=0) if self.settings.gzip else data
        try:
            # Opened per batch, so a directory that was moved or replaced is noticed.
            with open(self._path, "ab") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            self._cut_back()
            raise
        self._size += len(payload)

    def _due_for_rotation(self) -> bool:
        return (self._path is None or self._size >= self.settings.max_bytes
                or time.monotonic() - self._opened_at >= self.settings.max_age_seconds)

    def _create(self) -> Path:
        directory = Path(self.settings.directory)
        suffix = ".ndjson.gz" if self.settings.gzip else ".ndjson"
        while True:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            path = directory / f"{self.settings.prefix}-{stamp}{suffix}"
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue  # another writer took this microsecond
            _fsync_dir(directory)  # the new name must survive a crash too
            return path

    def _cut_back(self) -> None:
        """After a failed write: drop the partial batch so the file holds whole lines
        (or whole gzip members) only, and start a fresh file next time."""
        path, self._path = self._path, None
        try:
            os.truncate(path, self._size)
        except OSError:
            pass  # the file is gone or unwritable; the next batch starts a new one


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
