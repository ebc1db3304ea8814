"""The consumers process (identity, destinations) runs below the collector in CPU priority."""

import os
import time
from pathlib import Path

import pytest


def consumers_pid(server_pid: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{server_pid}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                try:
                    if b"trackpipe.delivery.process" in Path(f"/proc/{child}/cmdline").read_bytes():
                        return child
                except OSError:
                    continue
        time.sleep(0.1)
    raise AssertionError("no consumers process under the server")


def niceness(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


@pytest.mark.parametrize("env, increment", [({}, 10), ({"TRACKPIPE_SERVER_CONSUMERS_NICE": "3"}, 3),
                                            ({"TRACKPIPE_SERVER_CONSUMERS_NICE": "0"}, 0)])
def test_consumers_run_below_the_collector_by_the_configured_increment(fresh_server, env, increment):
    server = fresh_server(env=env).start()
    pid = consumers_pid(server.proc.pid)
    deadline = time.monotonic() + 10
    while niceness(pid) == niceness(server.proc.pid) and increment and time.monotonic() < deadline:
        time.sleep(0.05)  # it sets its priority once it has read its settings
    assert niceness(pid) - niceness(server.proc.pid) == increment
    # Every thread of it: Linux keeps a nice value per thread.
    for task in Path(f"/proc/{pid}/task").glob("*"):
        nice = int(Path(task / "stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice - niceness(server.proc.pid) == increment
