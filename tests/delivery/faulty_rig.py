"""A real trackpipe server delivering to the fault-injecting destination (tests/destinations/faulty.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from support import ServerProcess, wait_for, write_config

TESTS = Path(__file__).resolve().parents[1]
FAULTY = "destinations.faulty:FaultyDestination"


class Faulty:
    """One faulty destination's control file and attempt log."""

    def __init__(self, directory: Path, name: str):
        self.dir, self.name = directory, name
        directory.mkdir(parents=True, exist_ok=True)

    def table(self, **overrides) -> dict:
        return {"name": self.name, "type": FAULTY, "retry_initial_seconds": 0.1,
                "settings": {"directory": str(self.dir), "token": "s3cret-token"}, **overrides}

    def control(self, **control) -> None:
        (self.dir / "control.json").write_text(json.dumps(control))

    def attempts(self) -> list[dict]:
        try:
            lines = (self.dir / "attempts.ndjson").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def delivered(self) -> list[str]:
        return [a["id"] for a in self.attempts() if a["state"] == "delivered"]

    def wait_delivered(self, ids, timeout: float = 30.0) -> list[str]:
        want = set(ids)
        return wait_for(lambda: want <= set(self.delivered()) and self.delivered(), timeout,
                        what=f"{len(want)} events delivered to {self.name}")


def start(fresh_server, tmp_path: Path, tables: list[dict], identity: bool = False,
          **sections) -> ServerProcess:
    path = write_config(tmp_path / f"trackpipe-{uuid.uuid4().hex[:6]}.toml", tables,
                        identity={"enabled": identity}, **sections)
    return fresh_server(config=path, env={"PYTHONPATH": str(TESTS)}).start()


def new_ids(n: int) -> list[str]:
    return [f"m-{uuid.uuid4().hex}" for _ in range(n)]


def send(server: ServerProcess, n: int, user: str = "u", ids: list[str] | None = None,
         **extra) -> list[str]:
    """n track events in one batch; returns their messageIds (`ids` when given: a test
    that injects a fault for some ids sets it up before they can be delivered)."""
    ids = ids or new_ids(n)
    batch = [{"type": "track", "event": "Tested", "userId": user, "messageId": i,
              "properties": {"seq": k}, **extra} for k, i in enumerate(ids)]
    for start_at in range(0, n, 500):
        r = server.post("/v1/batch", {"batch": batch[start_at:start_at + 500]})
        assert r.status_code == 200, r.text
    return ids


def cli(server: ServerProcess, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    """Run `trackpipe ARGS` on the server's data dir and config, able to load test destinations."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run(
        [sys.executable, "-m", "trackpipe", *args, "--config", str(config or server.config),
         "--data-dir", str(server.data_dir)], capture_output=True, text=True, timeout=60, env=env)


def api(server: ServerProcess, path: str, method: str = "GET", **kwargs) -> httpx.Response:
    with server.admin() as client:
        return client.request(method, path, **kwargs)
