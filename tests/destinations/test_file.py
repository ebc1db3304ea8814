"""The file destination: NDJSON lines on disk, rotation, gzip members, and disk errors."""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trackpipe import config
from trackpipe.destinations import file as file_destination
from trackpipe.destinations.base import DestinationError, Event
from trackpipe.destinations.build import build_destination
from trackpipe.destinations.file import FileDestination, os_error_outcome
from trackpipe.errors import ConfigError

from destinations.sink_file import read_messages


def events(n: int, start: int = 0, pad: int = 0) -> list[Event]:
    return [Event(start + k, f"m-{start + k}",
                  {"type": "track", "event": "Tested", "messageId": f"m-{start + k}",
                   "userId": "u1", "properties": {"seq": start + k, "pad": "x" * pad}},
                  None, None, None) for k in range(n)]


def make(directory: Path, **settings) -> FileDestination:
    cfg = config.Destination(name="files", type="file",
                             settings={"directory": str(directory), **settings})
    return build_destination(cfg)


def run(dest: FileDestination, *batches: list[Event]) -> list:
    async def go():
        await dest.start()
        try:
            return [await dest.send(b) for b in batches]
        finally:
            await dest.close()
    return asyncio.run(go())


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith("events-"))


def ids(directory: Path) -> list[str]:
    return [m["messageId"] for p in files(directory) for m in read_messages(p)]


def test_writes_one_message_per_line_in_a_named_file(tmp_path):
    outcomes = run(make(tmp_path / "out"), events(3))
    assert [o.state for o in outcomes] == ["delivered"]
    [path] = files(tmp_path / "out")  # the directory was created at start
    assert re.fullmatch(r"events-\d{8}T\d{6}\.\d{6}Z\.ndjson", path.name)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["properties"]["seq"] for line in lines] == [0, 1, 2]


def test_later_batches_append_to_the_same_file(tmp_path):
    run(make(tmp_path), events(2), events(2, start=2))
    assert len(files(tmp_path)) == 1
    assert ids(tmp_path) == ["m-0", "m-1", "m-2", "m-3"]


def test_rotates_when_the_file_reaches_max_bytes(tmp_path):
    batches = [events(1, start=k, pad=520) for k in range(6)]
    run(make(tmp_path, max_bytes=1000), *batches)
    paths = files(tmp_path)
    assert len(paths) == 3  # ~600 bytes a batch: the second one reaches max_bytes
    assert all(p.stat().st_size < 1000 + 500 for p in paths)
    assert ids(tmp_path) == [f"m-{k}" for k in range(6)]  # names sort in writing order


def test_rotates_when_the_file_is_older_than_max_age(tmp_path):
    dest = make(tmp_path, max_age_seconds=0.2)

    async def go():
        await dest.start()
        await dest.send(events(1))
        await dest.send(events(1, start=1))
        await asyncio.sleep(0.3)
        await dest.send(events(1, start=2))
    asyncio.run(go())
    paths = files(tmp_path)
    assert [len(read_messages(p)) for p in paths] == [2, 1]


def test_a_new_run_starts_a_new_file(tmp_path):
    run(make(tmp_path), events(1))
    run(make(tmp_path), events(1, start=1))
    assert [len(read_messages(p)) for p in files(tmp_path)] == [1, 1]


def test_gzip_appends_one_member_per_batch(tmp_path):
    run(make(tmp_path, gzip=True), events(2), events(3, start=2))
    [path] = files(tmp_path)
    assert path.name.endswith(".ndjson.gz")
    raw = path.read_bytes()
    assert raw.count(b"\x1f\x8b\x08") >= 2  # two gzip members
    lines = gzip.decompress(raw).decode().splitlines()
    assert [json.loads(line)["messageId"] for line in lines] == [f"m-{k}" for k in range(5)]


def test_gzip_file_cut_mid_batch_keeps_the_earlier_batches(tmp_path):
    run(make(tmp_path, gzip=True), events(2), events(2, start=2))
    [path] = files(tmp_path)
    raw = path.read_bytes()
    second = raw.index(b"\x1f\x8b\x08", 10)
    path.write_bytes(raw[:second + (len(raw) - second) // 2])  # a crash mid second batch
    assert [m["messageId"] for m in read_messages(path)] == ["m-0", "m-1"]


def strict_ids(path: Path) -> list[str]:
    """The file read as jq, DuckDB and zcat read it: a cut line or gzip member fails."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    assert raw.endswith(b"\n")
    return [json.loads(line)["messageId"] for line in raw.split(b"\n")[:-1]]


def crash_mid_write(path: Path, batch: list[Event]) -> int:
    """Append part of `batch` as a write killed half way leaves it (half its first line,
    half its gzip member); the size the file had before."""
    size = path.stat().st_size
    data = b"".join(e.json + b"\n" for e in batch)
    cut = len(batch[0].json) // 2
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
        cut = len(data) // 2
    with open(path, "ab") as f:
        f.write(data[:cut])
    return size


@pytest.mark.parametrize("chunk", [1 << 20, 7])  # 7: lines and members across reads
@pytest.mark.parametrize("gz", [False, True])
def test_a_batch_a_crash_cut_is_cut_back_at_the_next_start(tmp_path, monkeypatch, caplog,
                                                           gz, chunk):
    # The cut line (or gzip member) stayed for good: the next run started a new file, and
    # jq, DuckDB's read_ndjson over the directory and zcat failed on the old one forever.
    monkeypatch.setattr(file_destination, "CHUNK", chunk, raising=False)
    run(make(tmp_path, gzip=gz), events(2), events(2, start=2))
    [crashed] = files(tmp_path)
    whole = crash_mid_write(crashed, events(3, start=4, pad=300))
    outcomes = run(make(tmp_path, gzip=gz), events(3, start=4))  # the batch goes again
    assert [o.state for o in outcomes] == ["delivered"]
    assert crashed.stat().st_size == whole
    assert [strict_ids(p) for p in files(tmp_path)] == [["m-0", "m-1", "m-2", "m-3"],
                                                        ["m-4", "m-5", "m-6"]]
    assert f"off the end of {crashed}, now {whole} bytes" in caplog.text


@pytest.mark.parametrize("gz", [False, True])
def test_every_file_earlier_runs_left_cut_is_cut_back(tmp_path, gz):
    # Runs before the repair existed could each leave one, not only the newest file.
    for k in range(3):
        run(make(tmp_path, gzip=gz), events(2, start=10 * k))
    sizes = [crash_mid_write(p, events(2, start=100)) for p in files(tmp_path)]
    run(make(tmp_path, gzip=gz), events(1, start=30))
    paths = files(tmp_path)
    assert [p.stat().st_size for p in paths[:3]] == sizes
    assert [strict_ids(p) for p in paths] == [["m-0", "m-1"], ["m-10", "m-11"],
                                              ["m-20", "m-21"], ["m-30"]]


@pytest.mark.parametrize("gz", [False, True])
def test_a_file_a_crash_cut_in_its_first_batch_is_removed(tmp_path, caplog, gz):
    run(make(tmp_path, gzip=gz), events(1, pad=300))
    [crashed] = files(tmp_path)
    os.truncate(crashed, crashed.stat().st_size // 2)  # no whole line, or member, left
    run(make(tmp_path, gzip=gz), events(1))
    [again] = files(tmp_path)
    assert again != crashed and strict_ids(again) == ["m-0"]
    assert f"removed {crashed}" in caplog.text


def test_files_not_this_destinations_or_not_cut_by_a_crash_are_left_alone(tmp_path):
    cut = b'{"messageId":"a"}\n{"messageId":"b'
    theirs = {"other-20261207T100000.000000Z.ndjson": cut,  # another destination's prefix
              "events-notes.ndjson": cut,  # a user's
              "events-20261207T100000.000000Z.ndjson.bak": cut,
              "events-20261207T100000.000000Z.ndjson.gz": b"not gzip at all\n"}  # damaged
    for name, data in theirs.items():
        (tmp_path / name).write_bytes(data)
    run(make(tmp_path, gzip=True), events(1))
    assert {name: (tmp_path / name).read_bytes() for name in theirs} == theirs


def test_the_file_a_live_writer_holds_is_left_alone(tmp_path):
    # `trackpipe check` (or a second node on a shared directory) starts a destination
    # while the server writes: the half-written batch in its file is not a crash's.
    live = make(tmp_path)

    async def go():
        await live.start()
        await live.send(events(2))
        [path] = files(tmp_path)
        crash_mid_write(path, events(2, start=2))  # its next write, under way
        size = path.stat().st_size
        await make(tmp_path).start()
        during = path.stat().st_size
        await live.close()
        return path, size, during
    path, size, during = asyncio.run(go())
    assert during == size
    run(make(tmp_path), events(1, start=2))  # its writer gone, it is cut back
    assert [strict_ids(p) for p in files(tmp_path)] == [["m-0", "m-1"], ["m-2"]]


KILLED_MID_WRITE = """
import asyncio, os, sys, time
from trackpipe import config
from trackpipe.destinations import file
from trackpipe.destinations.base import Event
from trackpipe.destinations.build import build_destination

dest = build_destination(config.Destination(name="files", type="file", settings={
    "directory": sys.argv[1], "gzip": sys.argv[2] == "gzip"}))

def batch(start):
    return [Event(k, f"m-{k}", {"type": "track", "messageId": f"m-{k}",
                                "properties": {"pad": os.urandom(2000).hex()}},
                  None, None, None) for k in range(start, start + 100)]

def half_then_hang(fd, payload):
    os.write(fd, payload[:len(payload) // 2 + 7])  # (+7: not at a line's end)
    print("writing", flush=True)
    time.sleep(60)

async def go():
    await dest.start()
    await dest.send(batch(0))
    file._write_all = half_then_hang
    await dest.send(batch(100))

asyncio.run(go())
"""


@pytest.mark.parametrize("gz", [False, True])
def test_a_writer_killed_mid_write_leaves_files_that_read_whole_after_the_next_start(
        tmp_path, gz):
    with subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path),
                           "gzip" if gz else "plain"], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout.readline() == b"writing\n"
        finally:
            child.kill()  # SIGKILL; its flock goes with it
    [crashed] = files(tmp_path)
    with pytest.raises(EOFError if gz else AssertionError):  # (a cut member, a cut line)
        strict_ids(crashed)
    run(make(tmp_path, gzip=gz), events(1, start=200))  # (the batch again, in short)
    kept = strict_ids(crashed)  # a plain file keeps the lines written whole before the kill
    assert kept == [f"m-{k}" for k in range(len(kept))]
    assert len(kept) == 100 if gz else 100 < len(kept) < 200
    assert [strict_ids(p) for p in files(tmp_path)][1:] == [["m-200"]]


def fsync_fails(code: int):
    def fsync(fd: int, *args) -> None:  # (os.write's stand-in too)
        raise OSError(code, os.strerror(code))
    return fsync


async def send_on_a_full_disk(dest, monkeypatch, batch):
    """Send `batch` while every fsync fails with ENOSPC; fsync works again afterwards."""
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", fsync_fails(errno.ENOSPC))
    try:
        return await dest.send(batch)
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)


def test_disk_full_is_retried_and_the_next_batch_goes_to_a_new_file(tmp_path, monkeypatch):
    dest = make(tmp_path)

    async def go():
        await dest.start()
        first = await dest.send(events(1))
        full = await send_on_a_full_disk(dest, monkeypatch, events(1, start=1))
        after = await dest.send(events(1, start=2))
        await dest.close()
        return first, full, after
    first, full, after = asyncio.run(go())
    assert first.state == "delivered" and after.state == "delivered"
    assert full.state == "retry"
    assert "ENOSPC" in full.detail and "Free disk space" in full.detail
    assert [len(read_messages(p)) for p in files(tmp_path)] == [1, 1]
    assert ids(tmp_path) == ["m-0", "m-2"]  # the failed batch was cut back out


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_retries_while_the_disk_is_full_leave_no_empty_files(tmp_path, monkeypatch, failing):
    # Each retry created a file for its batch and kept it, empty, once the write (or the
    # fsync of the directory, of the file) failed: 50 retries, 50 empty files.
    dest = make(tmp_path)
    real = getattr(os, failing)

    async def go():
        await dest.start()
        monkeypatch.setattr(os, failing, fsync_fails(errno.ENOSPC))
        full = [await dest.send(events(1)) for _ in range(5)]
        during = files(tmp_path)
        monkeypatch.setattr(os, failing, real)
        after = await dest.send(events(1))
        await dest.close()
        return full, during, after
    full, during, after = asyncio.run(go())
    assert [o.state for o in full] == ["retry"] * 5 and "ENOSPC" in full[0].detail
    assert during == [] and after.state == "delivered"
    assert len(list(tmp_path.iterdir())) == 1 and ids(tmp_path) == ["m-0"]


def test_a_timed_out_write_that_fails_later_cuts_back_only_its_own_lines(tmp_path, monkeypatch):
    # Batch A's fsync stalls, so the worker's timeout cancels its send while the write
    # thread goes on; A then fails. Batch B, sent meanwhile, must neither write beside A
    # nor lose its lines to A's cut back.
    dest = make(tmp_path)
    real_fsync = os.fsync
    b_wrote = threading.Event()
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:  # A's: it fails once B has written, or after a while
            b_wrote.wait(timeout=0.5)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        b_wrote.set()
        real_fsync(fd)

    async def go():
        await dest.start()
        await dest.send(events(2))
        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(dest.send(events(3, start=100)), 0.1)
        b = await dest.send(events(3, start=200))
        monkeypatch.setattr(os, "fsync", real_fsync)
        a_again = await dest.send(events(3, start=100))
        await dest.close()
        return b, a_again
    b, a_again = asyncio.run(go())
    assert b.state == "delivered" and a_again.state == "delivered"
    assert ids(tmp_path) == ["m-0", "m-1", "m-200", "m-201", "m-202",
                             "m-100", "m-101", "m-102"]


def test_a_file_moved_away_is_not_recreated_and_a_failed_write_leaves_no_padding(
        tmp_path, monkeypatch):
    dest = make(tmp_path / "out")

    async def go():
        await dest.start()
        await dest.send(events(5, pad=200))
        [active] = files(tmp_path / "out")
        (tmp_path / "shipped").mkdir()
        active.rename(tmp_path / "shipped" / active.name)  # a shipper takes the file
        moved = await dest.send(events(1, start=10))
        full = await send_on_a_full_disk(dest, monkeypatch, events(1, start=20))
        again = await dest.send(events(1, start=20))
        await dest.close()
        return active.name, moved, full, again
    name, moved, full, again = asyncio.run(go())
    assert [moved.state, full.state, again.state] == ["delivered", "retry", "delivered"]
    assert all(b"\0" not in p.read_bytes() for p in files(tmp_path / "out"))
    assert ids(tmp_path / "out") == ["m-10", "m-20"]
    assert ids(tmp_path / "shipped") == [f"m-{k}" for k in range(5)]
    assert name not in [p.name for p in files(tmp_path / "out")]  # a new name, not its own


def test_a_file_emptied_under_trackpipe_gets_no_padding_from_a_failed_write(
        tmp_path, monkeypatch):
    dest = make(tmp_path)

    async def go():
        await dest.start()
        await dest.send(events(5, pad=200))
        [active] = files(tmp_path)
        os.truncate(active, 0)  # logrotate's copytruncate: same file, emptied
        full = await send_on_a_full_disk(dest, monkeypatch, events(1, start=10))
        again = await dest.send(events(1, start=10))
        await dest.close()
        return active, full, again
    active, full, again = asyncio.run(go())
    assert full.state == "retry" and again.state == "delivered"
    assert active.read_bytes() == b""
    assert ids(tmp_path) == ["m-10"]


def test_a_file_replaced_under_trackpipe_is_left_alone(tmp_path):
    dest = make(tmp_path)

    async def go():
        await dest.start()
        await dest.send(events(1))
        [active] = files(tmp_path)
        active.unlink()
        active.write_bytes(b"someone else's file\n")
        after = await dest.send(events(1, start=1))
        await dest.close()
        return active, after
    active, after = asyncio.run(go())
    assert after.state == "delivered"
    assert active.read_bytes() == b"someone else's file\n"
    [new] = [p for p in files(tmp_path) if p != active]
    assert [m["messageId"] for m in read_messages(new)] == ["m-1"]


def test_a_vanished_directory_is_retried(tmp_path):
    dest = make(tmp_path / "mount")

    async def go():
        await dest.start()
        await dest.send(events(1))
        (tmp_path / "mount").rename(tmp_path / "moved")
        gone = await dest.send(events(1, start=1))
        (tmp_path / "moved").rename(tmp_path / "mount")
        back = await dest.send(events(1, start=2))
        return gone, back
    gone, back = asyncio.run(go())
    assert gone.state == "retry" and "ENOENT" in gone.detail
    assert back.state == "delivered"
    assert ids(tmp_path / "mount") == ["m-0", "m-2"]


def test_not_a_directory_fails_for_good(tmp_path):
    target = tmp_path / "plain-file"
    target.write_text("")
    [outcome] = run(make(target), events(1))
    assert outcome.state == "failed"
    assert "ENOTDIR" in outcome.detail and "replay" in outcome.detail


@pytest.mark.parametrize("code,state", [(errno.EACCES, "failed"), (errno.EPERM, "failed"),
                                        (errno.EROFS, "failed"), (errno.ENOSPC, "retry"),
                                        (errno.EIO, "retry"), (errno.EDQUOT, "retry")])
def test_os_errors_are_classified(code, state):
    outcome = os_error_outcome(OSError(code, os.strerror(code), "/data/x.ndjson"), "/data")
    assert outcome.state == state
    assert "/data/x.ndjson" in outcome.detail and errno.errorcode[code] in outcome.detail


def test_check_reports_a_writable_directory_and_refuses_a_file(tmp_path):
    assert str(tmp_path) in asyncio.run(make(tmp_path).check())
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(DestinationError, match="cannot write in .*blocker"):
        asyncio.run(make(blocker).check())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trackpipe-check")]


@pytest.mark.parametrize("settings", [{"prefix": "../escape"}, {"max_bytes": 0},
                                      {"max_age_seconds": -1}, {"compress": True}])
def test_bad_settings_are_config_errors(tmp_path, settings):
    with pytest.raises(ConfigError, match="invalid settings"):
        make(tmp_path, **settings)


def test_an_old_file_keeps_its_timestamped_name_order(tmp_path):
    run(make(tmp_path, max_bytes=1), events(1), events(1, start=1), events(1, start=2))
    names = [p.name for p in files(tmp_path)]
    assert names == sorted(names) and len(set(names)) == 3
    assert time.time() - files(tmp_path)[0].stat().st_mtime < 60
