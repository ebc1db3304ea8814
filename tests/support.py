"""Running a real trackpipe server process for tests, the way a user starts it."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ADMIN_TOKEN = "tpa_test_admin_token"
WRITE_KEY = "WK"

# With this set (CI does), a test that needs a real service or tool fails instead of skipping.
REQUIRE_SERVICES = os.environ.get("TRACKPIPE_REQUIRE_SERVICES") == "1"
# The default suite keeps its property tests short; TRACKPIPE_FUZZ_SCALE=10 runs ten times
# the examples (before a release, or after changing what they cover).
FUZZ_SCALE = float(os.environ.get("TRACKPIPE_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    """How many examples a hypothesis test runs: `n`, times TRACKPIPE_FUZZ_SCALE."""
    return max(1, round(n * FUZZ_SCALE))


def in_loop(test):
    """Runs an async test function in a fresh event loop."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_source(data_dir: Path, name: str, write_key: str | None = None,
               strict: bool = False) -> str:
    from trackpipe.sources.catalog import Catalog

    catalog = Catalog(data_dir)
    try:
        existing = {s.name: s for s in catalog.sources()}
        if name in existing:
            return existing[name].write_key
        return catalog.add_source(name, write_key, strict).write_key
    finally:
        catalog.close()


class ServerProcess:
    """`trackpipe serve` in a subprocess, with a data dir that outlives restarts."""

    def __init__(self, data_dir: Path, *, env: dict | None = None, config: Path | None = None,
                 preexec_fn=None):
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self.config = config
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None
        self.write_key = add_source(self.data_dir, "default", WRITE_KEY)
        self.admin_token = ADMIN_TOKEN
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 20) -> "ServerProcess":
        cmd = [sys.executable, "-m", "trackpipe", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir)]
        if self.config:
            cmd += ["--config", str(self.config)]
        env = {**os.environ, "TRACKPIPE_ADMIN_TOKEN": ADMIN_TOKEN, **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trackpipe exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("trackpipe did not become healthy in time:\n"
                           + self.log_path.read_text(errors="replace")[-3000:])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.start()

    # -- what tests ask of a running server -------------------------------------

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10,
                            headers={"authorization": f"Bearer {self.admin_token}"})

    def add_source(self, name: str, write_key: str | None = None, strict: bool = False) -> str:
        key = add_source(self.data_dir, name, write_key, strict)
        deadline = time.monotonic() + 5  # the server reloads its catalog within a second
        with self.admin() as client:
            while time.monotonic() < deadline:
                keys = {s["writeKey"] for s in client.get("/api/v1/sources").json()["sources"]}
                if key in keys:
                    return key
                time.sleep(0.1)
        raise RuntimeError(f"source {name} never appeared on the server")

    def events(self, **filters) -> list[dict]:
        """Every stored event matching the filters, oldest first."""
        found: list[dict] = []
        params = {**filters, "order": "asc", "limit": 1000}
        with self.admin() as client:
            cursor = None
            while True:
                if cursor is not None:
                    params["cursor"] = cursor
                page = client.get("/api/v1/events", params=params)
                page.raise_for_status()
                body = page.json()
                found += body["events"]
                cursor = body["next"]
                if cursor is None:
                    return found

    def status(self, message_id: str) -> httpx.Response:
        with self.admin() as client:
            return client.get(f"/api/v1/messages/{message_id}/status")

    def discards(self, **filters) -> list[dict]:
        with self.admin() as client:
            return client.get("/api/v1/discards", params={**filters, "limit": 1000}).json()[
                "discards"]

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def post(self, path: str, body=None, *, content: bytes | None = None, auth=True,
             headers: dict | None = None) -> httpx.Response:
        h = dict(headers or {})
        if auth is True:
            h.setdefault("authorization", basic(self.write_key))
        if content is None:
            import json
            content = json.dumps(body).encode()
        return httpx.post(f"{self.url}{path}", content=content, headers=h, timeout=10)


def basic(key: str, colon: bool = True) -> str:
    import base64
    raw = f"{key}:" if colon else key
    return "Basic " + base64.b64encode(raw.encode()).decode()


def toml_value(value) -> str:
    import json
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def write_config(path: Path, destinations: list[dict] = (), **sections) -> Path:
    """A trackpipe.toml with [[destinations]] tables and other sections ({"identity": {...}})."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for dest in destinations:
        lines.append("[[destinations]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in dest.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    """Poll until predicate() returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (the writer, the consumers process, ...), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


class MachineClocks:
    """A machine's wall and monotonic clocks for tests: `wait` moves both, `step` only the
    wall clock (an NTP correction, `date -s`)."""

    def __init__(self):
        self.mono, self.offset = 1_000.0, 1_700_000_000.0

    def wall(self) -> float:
        return self.mono + self.offset

    def monotonic(self) -> float:
        return self.mono

    def wait(self, seconds: float) -> None:
        self.mono += seconds

    def step(self, seconds: float) -> None:
        self.offset += seconds
