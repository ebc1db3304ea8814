"""The consumers process (identity, destinations) runs below the collector in CPU priority."""

import os
import time
from pathlib import Path

import pytest
from support import descendants


def consumers_pid(server_pid: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(server_pid):
            try:
                if b"trackpipe.delivery.process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue  # it ended meanwhile
        time.sleep(0.1)
    raise AssertionError("no consumers process under the server")


def thread_nice_values(pid: int) -> list[int]:
    """Linux keeps a nice value per thread: field 19 of each thread's stat."""
    values = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            values.append(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return values


@pytest.mark.parametrize("env, increment", [({}, 10), ({"TRACKPIPE_SERVER_CONSUMERS_NICE": "3"}, 3),
                                            ({"TRACKPIPE_SERVER_CONSUMERS_NICE": "0"}, 0)])
def test_consumers_run_below_the_collector_by_the_configured_increment(fresh_server, env, increment):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base + increment > 19:
        pytest.skip(f"the tests run at nice {base}: {base} + {increment} would pass the cap of 19")
    server = fresh_server(env=env).start()
    pid = consumers_pid(server.proc.pid)
    # The nice value is set before the first thread starts; wait for the threads that
    # identity starts (its pool), so that they are checked too.
    deadline = time.monotonic() + 20
    while len(thread_nice_values(pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    values = thread_nice_values(pid)
    assert len(values) >= 2, "the consumers process did not start its threads"
    server_nice = os.getpriority(os.PRIO_PROCESS, server.proc.pid)
    assert values == [server_nice + increment] * len(values)
