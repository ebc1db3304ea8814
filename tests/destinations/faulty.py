"""A fault-injecting destination for the framework's tests (type = "faulty:FaultyDestination").

It keeps nothing in memory that a test must reach: a JSON control file says how
to fail, and every attempt is appended to an NDJSON file, so tests drive and
observe it across the server's processes, restarts and kills.

Control file keys (all optional):
  fail_status: int        every send fails with this HTTP-like status ...
  fail_times: int         ... for this many sends (then succeeds); absent = forever
  retry_after: float      seconds, given with a retryable failure
  fail_ids: [str]         these messageIds fail for good (status 400), the rest deliver
  retry_ids: {id: n}      these messageIds fail retryably (503) for their first n attempts
  delay: float            seconds each send takes
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import msgspec

from trackpipe.destinations.base import DELIVERED, Destination, classify_http, fail, retry


class FaultyDestination(Destination):
    kind = "faulty"
    default_batch_size = 50
    uses_profiles = True  # it records each event's profile id for the tests

    class Settings(msgspec.Struct, forbid_unknown_fields=True):
        directory: str
        token: str = ""

    secret_fields = ("token",)

    def _paths(self) -> tuple[Path, Path]:
        d = Path(self.settings.directory)
        return d / "control.json", d / "attempts.ndjson"

    async def send(self, batch):
        control_path, attempts_path = self._paths()
        try:
            control = json.loads(control_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            control = {}
        if control.get("delay"):
            await asyncio.sleep(control["delay"])
        sends = control.get("sends", 0)
        failing = control.get("fail_status") and (
            control.get("fail_times") is None or sends < control["fail_times"])
        if control.get("fail_times") is not None:
            control["sends"] = sends + 1
            control_path.write_text(json.dumps(control))
        if failing:
            headers = {"retry-after": str(control["retry_after"])} if "retry_after" in control else {}
            outcomes = [classify_http(control["fail_status"], "injected failure", headers)] * len(batch)
        else:
            bad = set(control.get("fail_ids", ()))
            flaky = control.get("retry_ids", {})
            outcomes = []
            for e in batch:
                if e.message_id in bad:
                    outcomes.append(fail(400, "injected terminal failure"))
                elif flaky.get(e.message_id, 0) > 0:
                    flaky[e.message_id] -= 1
                    outcomes.append(retry(503, "injected retryable failure"))
                else:
                    outcomes.append(DELIVERED)
            if flaky:
                control_path.write_text(json.dumps(control))
        with open(attempts_path, "a") as f:
            for e, o in zip(batch, outcomes):
                f.write(json.dumps({"id": e.message_id, "at": time.time(), "state": o.state,
                                    "profile": e.profile_id, "options": e.options,
                                    "action": e.action, "message": e.message}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return outcomes
