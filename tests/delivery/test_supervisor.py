"""The server restarts a consumers process that dies, waiting longer after each crash."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx

from trackpipe import metrics
from trackpipe.config import load
from trackpipe.delivery import supervisor
from trackpipe.delivery.supervisor import ConsumersProcess

from support import descendants, wait_for, write_config


class ShortLived:
    """Alive through the first poll after its start (starting Python takes a while), dead
    by the next: a crash at start-up."""

    returncode = 1

    def __init__(self):
        self.polls = 0  # the supervisor's 0.5 s sleeps since the start

    def poll(self):
        return None if self.polls <= 1 else 1


def test_a_process_dying_at_every_start_is_restarted_ever_more_slowly(monkeypatch):
    consumers = ConsumersProcess(load(None, {}))
    waits: list[float] = []

    def start():
        consumers.started_at, consumers.proc = time.monotonic(), ShortLived()
        if consumers.restarts == 7:
            consumers._closing = True

    async def sleep(seconds):
        waits.append(seconds)
        consumers.proc.polls += 1

    monkeypatch.setattr(consumers, "start", start)
    monkeypatch.setattr(supervisor.asyncio, "sleep", sleep)
    start()
    before = sum(metrics.CONSUMERS_RESTARTS.counts.values())
    asyncio.run(consumers.supervise())
    # each round: a poll finding it alive, one finding it dead, then the wait before a start
    assert waits[2::3] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0], waits
    assert sum(metrics.CONSUMERS_RESTARTS.counts.values()) - before == 7



def test_ready_says_when_the_consumers_process_is_down(fresh_server, tmp_path):
    config = write_config(tmp_path / "trackpipe.toml",
                          [{"name": "out", "type": "file",
                            "settings": {"directory": str(tmp_path / "out")}}],
                          identity={"enabled": False})
    server = fresh_server(config=config).start()
    url = f"{server.url}/ready"
    wait_for(lambda: httpx.get(url).json()["consumers"] == "running", what="consumers up")
    [pid] = [p for p in descendants(server.proc.pid)
             if b"trackpipe.delivery.process" in Path(f"/proc/{p}/cmdline").read_bytes()]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: httpx.get(url).json()["consumers"].startswith("not running (exited with"),
             what="/ready to say the consumers are down")
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.json()["ready"] is True, "events still taken"
    wait_for(lambda: httpx.get(url).json()["consumers"] == "running (1 restarts)", 20,
             what="the consumers restarted")


def consumers_pid(server) -> int:
    [pid] = [p for p in descendants(server.proc.pid)
             if b"trackpipe.delivery.process" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return pid


def test_a_signal_to_the_whole_process_group_stops_the_server_without_a_restart(
        fresh_server, tmp_path):
    """Ctrl-C or `systemctl stop` signal every process of the group at once. The consumers
    process exited on it before the server began its shutdown, and was restarted with a
    warning; the server now stops it in order, as it does the log writer."""
    config = write_config(tmp_path / "trackpipe.toml",
                          [{"name": "out", "type": "file",
                            "settings": {"directory": str(tmp_path / "out")}}],
                          identity={"enabled": False})
    for sig in (signal.SIGTERM, signal.SIGINT):
        server = fresh_server(config=config, preexec_fn=os.setsid).start()  # its own group
        wait_for(lambda: httpx.get(f"{server.url}/ready").json()["consumers"] == "running",
                 what="consumers up")
        consumers = consumers_pid(server)
        os.killpg(server.proc.pid, sig)
        assert server.proc.wait(20) == 0
        wait_for(lambda: not Path(f"/proc/{consumers}").exists(), 10,
                 what="the consumers process gone")
        server.stop()  # closes its log file
        log = server.log_path.read_text(errors="replace")
        assert "exited with" not in log and "restarting" not in log, log[-2000:]


def test_the_consumers_process_outlives_a_signal_of_its_own_and_stops_with_the_server(
        fresh_server, tmp_path):
    config = write_config(tmp_path / "trackpipe.toml",
                          [{"name": "out", "type": "file",
                            "settings": {"directory": str(tmp_path / "out")}}],
                          identity={"enabled": False})
    server = fresh_server(config=config).start()
    wait_for(lambda: httpx.get(f"{server.url}/ready").json()["consumers"] == "running",
             what="consumers up")
    consumers = consumers_pid(server)
    os.kill(consumers, signal.SIGTERM)  # left to the server: it is not stopped by it
    time.sleep(1.5)
    assert httpx.get(f"{server.url}/ready").json()["consumers"] == "running"
    server.stop()
    assert server.proc.returncode == 0
    wait_for(lambda: not Path(f"/proc/{consumers}").exists(), 10, what="consumers gone")
