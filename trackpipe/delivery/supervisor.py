"""The server's side of the consumers process: start it, restart it if it dies, stop it."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time

import msgspec

from trackpipe import config, metrics
from trackpipe.pipeline.writer_process import _die_with_parent

log = logging.getLogger("trackpipe.consumers")

MAX_BACKOFF = 30.0
# Up this long, a process has outlived its crash: the next one waits the shortest time
# again. (Checking that it is alive at the next poll was no proof: starting Python takes
# longer than a poll, so a process that died on every start was restarted every second.)
STABLE_SECONDS = 60.0


def _in_child() -> None:
    """Before the consumers process runs: it dies with the server, and ignores Ctrl-C and
    SIGTERM sent to the whole group from its first instruction (an ignored signal stays
    ignored across exec); the server stops it by closing its stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()


class ConsumersProcess:
    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0
        self._closing = False

    @property
    def needed(self) -> bool:
        return (self.settings.identity.enabled or self.settings.log.retention_seconds > 0
                or any(d.enabled for d in self.settings.destinations))

    def start(self) -> None:
        """Call on the main thread (PR_SET_PDEATHSIG follows the forking thread)."""
        if not self.needed:
            return
        self.started_at = time.monotonic()
        if self.proc is not None:
            self.proc.stdin.close()  # the one before, dead
        self.proc = subprocess.Popen([sys.executable, "-m", "trackpipe.delivery.process"],
                                     stdin=subprocess.PIPE, preexec_fn=_in_child)
        # Its settings as one line; closing stdin later is how the process is told to stop
        # (it leaves signals to the whole process group to the server).
        self.proc.stdin.write(msgspec.json.encode(self.settings) + b"\n")
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> str:
        """For /ready: whether deliveries, identity and retention are running. (Not a
        reason to be unready: the collector takes events without them.)"""
        if not self.needed:
            return "not needed (no destinations, identity or retention)"
        restarts = f" ({self.restarts} restarts)" if self.restarts else ""
        if self.alive():
            return "running" + restarts
        code = None if self.proc is None else self.proc.returncode
        return f"not running (exited with {code}; restarting){restarts}"

    async def supervise(self) -> None:
        backoff = 0.5
        while not self._closing and self.proc is not None:
            await asyncio.sleep(0.5)
            if self._closing or self.proc.poll() is None:
                if time.monotonic() - self.started_at >= STABLE_SECONDS:
                    backoff = 0.5
                continue
            log.warning("the consumers process exited with %s; restarting in %.1f s",
                        self.proc.returncode, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            if not self._closing:
                self.restarts += 1
                metrics.CONSUMERS_RESTARTS.add()
                self.start()

    def close(self, timeout: float = 15.0) -> None:
        self._closing = True
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()  # its signal to stop (see start)
        except OSError:
            pass  # it is gone already
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
