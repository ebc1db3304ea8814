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

A run killed while writing (kill -9, a crash) leaves that batch cut at the end of
its file, a partial line or gzip member that jq, DuckDB and zcat refuse. The next
start cuts every such tail back to the last whole line (or member) and removes a
file left empty; the batch was never counted delivered, so it goes again. The file
being written is flock()ed, so a start elsewhere (`trackpipe check`, another node
on a shared directory) leaves it alone while its writer lives.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import gzip
import logging
import os
import re
import tempfile
import time
import zlib
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

# Every member trackpipe writes starts so (gzip.compress(mtime=0)): how the end of a
# file finds its last member without inflating all the ones before it.
MEMBER_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00"
OUR_NAME_AFTER_PREFIX = r"-\d{8}T\d{6}\.\d{6}Z\.ndjson(\.gz)?"  # what _create names files
GZIP_WBITS = 16 + zlib.MAX_WBITS
CHUNK = 1 << 20  # how much of a file a repair reads (and inflates) at a time

log = logging.getLogger("trackpipe.file")


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
        await asyncio.to_thread(self._repair_cut_files)

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

    # -- at start, in a thread: the tails earlier runs left cut ---------------------

    def _repair_cut_files(self) -> None:
        """Cut back every file of ours that ends in part of a batch. Not just the newest:
        runs before this check existed may have left one each, a repair that met a disk
        error leaves one behind newer files, and a clock set back breaks name order.
        Each check reads only the end of a file (the last member, with gzip)."""
        directory = Path(self.settings.directory)
        name = re.compile(re.escape(self.settings.prefix) + OUR_NAME_AFTER_PREFIX)
        try:
            paths = sorted(p for p in directory.iterdir()
                           if name.fullmatch(p.name) and not p.is_symlink())
        except OSError:
            return  # no directory yet, or unreadable: each send reports it
        changed = False
        for path in paths:
            try:
                changed |= self._repair(path)
            except OSError as exc:
                log.warning("file destination %s: cannot check %s for a batch a crash cut:"
                            " %s", self.name, path, exc.strerror)
        if changed:
            try:
                _fsync_dir(directory)
            except OSError:
                pass  # the disk is failing; the next start checks again

    def _repair(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, IsADirectoryError):
            return False
        try:
            if not _lock(fd, wait=False) or not _is_at(path, fd):
                return False  # a live writer's file (or one renamed meanwhile)
            size = os.fstat(fd).st_size
            gzipped = path.suffix == ".gz"
            keep = _whole_members_end(fd, size) if gzipped else _whole_lines_end(fd, size)
            if keep is None:
                log.warning("file destination %s: %s holds something other than gzip members"
                            " (not one a crash cut short); left as it is", self.name, path)
                return False
            if keep == size > 0:
                return False
            self._cut_tail(path, fd, size, keep)
            return True
        finally:
            os.close(fd)

    def _cut_tail(self, path: Path, fd: int, size: int, keep: int) -> None:
        if keep == 0:  # (or empty all along: a crash between creating it and writing)
            os.unlink(path)
            log.warning("file destination %s: removed %s, which held no whole line, only"
                        " %d bytes of a batch a crash cut short; that batch is sent again",
                        self.name, path, size)
            return
        os.ftruncate(fd, keep)
        os.fsync(fd)
        log.warning("file destination %s: cut %d bytes (a batch a crash cut short) off the"
                    " end of %s, now %d bytes; that batch is sent again",
                    self.name, size - keep, path, keep)

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
        return _is_at(self._path, fd)  # False for a vanished directory: _create says so

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
            if not _lock(fd, wait=True) or not _is_at(path, fd):
                os.close(fd)  # a starting run's repair took it, still empty, for a crash's
                continue
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


def _lock(fd: int, wait: bool) -> bool:
    """flock: held by the writer from creation to rotation, and released by the kernel
    when the writer dies, so a repair skips exactly the files a live writer holds."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass  # a filesystem without locks: nothing to keep out, nothing to wait for
    return True


def _is_at(path: Path, fd: int) -> bool:
    # Holding the file open keeps its inode number from being reused: equal numbers
    # mean the very same file, not a new one created where ours was.
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _whole_lines_end(fd: int, size: int) -> int:
    """Where the last whole line ends: a crash cuts only the line being written."""
    end = size
    while end > 0:
        start = max(0, end - CHUNK)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _whole_members_end(fd: int, size: int) -> int | None:
    """Where the last whole gzip member ends (a complete deflate stream and trailer);
    None when the file holds something else than whole members and one cut short."""
    last = _last_member_start(fd, size)
    if last is not None and _members_end(fd, last, size) == size:
        return size  # the usual case: whole, and only its last member inflated
    return _members_end(fd, 0, size)


def _last_member_start(fd: int, size: int) -> int | None:
    end = size
    while end > 0:
        start = max(0, end - CHUNK)
        # Overlap the next chunk read so a header across the boundary is found too.
        window = os.pread(fd, min(size, end + len(MEMBER_HEADER) - 1) - start, start)
        found = window.rfind(MEMBER_HEADER)
        if found >= 0:
            return start + found
        end = start
    return None


def _members_end(fd: int, start: int, size: int) -> int | None:
    """Inflate members from `start`, keeping none of the output, and say where the last
    one that is whole ends. None when the data is not gzip (a crash cuts a member short;
    it does not garble one)."""
    end = offset = start
    member = zlib.decompressobj(GZIP_WBITS)
    while offset < size:
        data = os.pread(fd, min(CHUNK, size - offset), offset)
        if not data:
            break  # cut by someone meanwhile: what was read is what counts
        offset += len(data)
        while data:
            try:
                member.decompress(data, CHUNK)
            except zlib.error:
                return None
            data = member.unconsumed_tail
            if member.eof:
                rest = member.unused_data
                end = offset - len(rest)  # (data, the unconsumed tail, is empty at eof)
                member, data = zlib.decompressobj(GZIP_WBITS), rest
    return end


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
