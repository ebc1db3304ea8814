"""Steps of the wall clock, so that a dedup window measures the time that passed.

receivedAt follows the wall clock (wire-protocol.md §4), and the dedup window
compares receivedAt values. A step of the system clock (an NTP correction after
boot, an operator's `date -s`) would otherwise expire every entry at once (a
step forward: SDK retries of events already stored are stored again) or keep
entries for longer (a step back). The log writer notices a step as a change in
the distance between the wall clock and the monotonic clock, and remembers it
with the log position it came at; a window check leaves out the steps since the
stored copy. Drifts and slews under STEP_MS are not steps (they move a 12-hour
window by less than a minute). The delivery framework watches for steps too
(StepWatch), and moves its pending retries with them (delivery/state.py). A
step while trackpipe is down cannot be seen: the monotonic clock starts anew
with the machine.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("trackpipe.clock")

STEP_MS = 60_000
KEEP = 100  # steps remembered: enough for any window (each is rare)


class StepWatch:
    """Tells how far the wall clock stepped since the last look (0 for less than STEP_MS)."""

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self._wall, self._monotonic = wall, monotonic
        self._offset = self._now_offset()

    def _now_offset(self) -> int:
        return int((self._wall() - self._monotonic()) * 1000)

    def step(self) -> int:
        offset = self._now_offset()
        step, self._offset = offset - self._offset, offset
        return step if abs(step) >= STEP_MS else 0


class ClockSteps:
    def __init__(self, path: Path | None = None, *, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.path = path
        self._steps: list[tuple[int, int]] = self._load()  # (position, step in ms)
        self._watch = StepWatch(wall, monotonic)

    def observe(self, position: int) -> None:
        """Called before each commit; `position` is the first the commit may append."""
        step = self._watch.step()
        if step:
            self._steps = (self._steps + [(position, step)])[-KEEP:]
            self._save()
            log.warning("the wall clock stepped %+.0f s; dedup windows count the time that"
                        " passed, receivedAt follows the clock", step / 1000)

    def since(self, position: int) -> int:
        """How far the wall clock stepped after the event at `position` came (ms)."""
        if not self._steps:
            return 0
        return sum(step for at, step in self._steps if at > position)

    def _load(self) -> list[tuple[int, int]]:
        if self.path is None:
            return []
        try:
            return [(int(p), int(s)) for p, s in json.loads(self.path.read_text())][-KEEP:]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError) as exc:  # unreadable: windows as the clock says
            log.warning("ignoring %s: %s", self.path, exc)
            return []

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            temporary = self.path.with_name(self.path.name + ".tmp")
            with open(temporary, "w") as f:
                json.dump(self._steps, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:  # a full disk: remembered until the writer restarts
            log.warning("could not record the clock step in %s: %s", self.path, exc)
