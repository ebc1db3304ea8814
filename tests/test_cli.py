"""The `trackpipe` command as scripts use it: serve, sources, send, events.

Every test runs the CLI as a real subprocess (`python -m trackpipe ...`) against
a real server; scripts outside the test suite rely on this contract.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest

from support import ADMIN_TOKEN, WRITE_KEY, add_source, free_port, wait_for, write_config

TIMEOUT = 30


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any TRACKPIPE_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKPIPE_")}
    return {**env, **extra}


def cli(*args: str, env: dict | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trackpipe", *args], capture_output=True,
                          text=True, env=clean_env() if env is None else env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class LineReader:
    """A CLI subprocess whose stdout lines are read in a thread, so reads can time out."""

    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "trackpipe", *args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self.threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._drain_stderr, daemon=True)]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, q) -> None:
        for line in stream:
            q.put(line.rstrip("\n"))
        q.put(None)

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def readline(self, timeout: float) -> str | None:
        """The next line, or None at EOF or when nothing came within `timeout`."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def read_until(self, pattern: str, timeout: float = TIMEOUT) -> list[str]:
        """Lines up to and including the first that matches `pattern`."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.readline(max(0.01, deadline - time.monotonic()))
            if line is None:
                if self.proc.poll() is not None:
                    break
                continue
            got.append(line)
            if re.search(pattern, line):
                return got
        raise AssertionError(f"no line matching {pattern!r}; got {got!r}; "
                             f"exit {self.proc.poll()}; stderr {''.join(self.stderr)[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        for t in self.threads:
            t.join(10)  # EOF once the process (and any child holding the pipes) is gone
        if not any(t.is_alive() for t in self.threads):
            self.proc.stdout.close()
            self.proc.stderr.close()


def wait_healthy(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} never became healthy")


def track(url: str, key: str, **body) -> httpx.Response:
    body.setdefault("userId", "cli-user")
    body.setdefault("event", "CLI Test")
    return httpx.post(f"{url}/v1/track", json=body, auth=(key, ""), timeout=10)


# -- serve ------------------------------------------------------------------------


def test_serve_first_start_prints_key_token_url_and_curl_once(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--port", str(port), "--data-dir", str(data)]

    first = LineReader(args, clean_env())
    try:
        out = first.read_until(r"curl ")
        wait_healthy(url)
    finally:
        first.stop()
    text = "\n".join(out)
    key = re.search(r"^Created source 'default' with write key: (\S+)$", text, re.M)
    token = re.search(r"^Admin token \(shown once; keep it\): (tpa_\S+)$", text, re.M)
    assert key and token, text
    key, token = key.group(1), token.group(1)
    assert f"trackpipe listening on {url}" in text
    assert str(data.resolve()) in text
    curl = out[-1].strip()
    assert curl.startswith(f"curl -u '{key}:'") and curl.endswith(f"{url}/v1/track"), curl
    assert text.count(token) == 1 and text.count(key) == 2  # creation line + curl line
    assert (data / "format").read_text() == "2\n"  # the data dir's format (data_format.py)

    second = LineReader(args, clean_env())
    try:
        out2 = second.read_until(r"curl ")
        wait_healthy(url)
        text2 = "\n".join(out2)
        assert "Created source" not in text2, text2
        assert "Admin token" not in text2 and "tpa_" not in text2, text2
        assert f"curl -u '{key}:'" in text2  # the same default source
        # The key and token printed on the first start still work.
        assert track(url, key).json() == {"success": True}
        r = httpx.get(f"{url}/api/v1/sources", headers={"authorization": f"Bearer {token}"},
                      timeout=10)
        assert r.status_code == 200
        assert [s["writeKey"] for s in r.json()["sources"]] == [key]
        bad = httpx.get(f"{url}/api/v1/sources", headers={"authorization": "Bearer nope"},
                        timeout=10)
        assert bad.status_code == 401
    finally:
        second.stop()
    assert second.proc.returncode == 0, "".join(second.stderr)[-2000:]


def test_serve_admin_token_from_environment_is_used_and_not_printed(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token = f"tpa_env_{uuid.uuid4().hex}"
    proc = LineReader(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
                      clean_env(TRACKPIPE_ADMIN_TOKEN=token))
    try:
        out = proc.read_until(r"curl ")
        wait_healthy(url)
        text = "\n".join(out)
        assert "Created source 'default' with write key: " in text
        assert "Admin token" not in text and token not in text, text
        r = httpx.get(f"{url}/api/v1/sources", headers={"authorization": f"Bearer {token}"},
                      timeout=10)
        assert r.status_code == 200
    finally:
        proc.stop()


# -- sources ----------------------------------------------------------------------


def test_sources_add_list_and_duplicate(tmp_path):
    data = str(tmp_path / "data")
    r = cli("sources", "add", "web", "--data-dir", data)
    assert r.returncode == 0, r.stderr
    web_key = r.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", web_key), r.stdout

    r = cli("sources", "add", "backend", "--write-key", "sk_us_mykey", "--strict",
            "--data-dir", data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sk_us_mykey"

    dup = cli("sources", "add", "web", "--data-dir", data)
    assert dup.returncode != 0
    assert dup.stdout == ""
    assert "'web'" in dup.stderr and "already exists" in dup.stderr
    assert "trackpipe sources list" in dup.stderr

    dup_key = cli("sources", "add", "other", "--write-key", "sk_us_mykey", "--data-dir", data)
    assert dup_key.returncode != 0 and "already exists" in dup_key.stderr

    ls = cli("sources", "list", "--data-dir", data)
    assert ls.returncode == 0, ls.stderr
    lines = ls.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ID", "ENABLED", "STRICT", "WRITE", "KEY"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"web", "backend"}  # the failed adds left nothing behind
    assert rows["web"][2:] == ["True", "False", web_key]
    assert rows["backend"][2:] == ["True", "True", "sk_us_mykey"]
    assert rows["web"][1].startswith("src_")


def test_sources_add_refuses_an_empty_name_and_keys_basic_auth_cannot_carry(tmp_path):
    data = str(tmp_path / "data")
    r = cli("sources", "add", " ", "--data-dir", data)
    assert r.returncode == 1 and "name" in r.stderr, r.stderr
    for key in ("ab:cd", "kéy", " "):  # Basic auth splits at the first colon
        r = cli("sources", "add", "web", "--write-key", key, "--data-dir", data)
        assert r.returncode == 1 and "no colon" in r.stderr, (key, r.stderr)
    assert cli("sources", "list", "--data-dir", data).stdout.count("\n") == 1  # the header


def test_bad_port_and_a_data_dir_that_is_a_file_exit_2_with_a_message(tmp_path):
    for port in ("99999", "-5", "0", "http"):
        r = cli("serve", "--port", port, "--data-dir", str(tmp_path / "data"))
        assert r.returncode == 2 and "is not a TCP port" in r.stderr, (port, r.stderr)
    afile = tmp_path / "afile"
    afile.write_text("")
    for args in (("serve",), ("sources", "list")):
        r = cli(*args, "--data-dir", str(afile))
        assert r.returncode == 2 and "is a file, not a directory" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_sources_add_is_picked_up_by_a_running_server(server):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    r = cli("sources", "add", name, "--data-dir", str(server.data_dir))
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    deadline = time.monotonic() + 5  # "within a second"
    while True:
        resp = track(server.url, key)
        if resp.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert resp.status_code == 200, resp.text


# -- send -------------------------------------------------------------------------


def test_send_prints_message_id_and_the_event_is_stored(server):
    event = f"CLI Send {uuid.uuid4().hex[:8]}"
    r = cli("send", "--write-key", server.write_key, "--url", server.url, "--event", event)
    assert r.returncode == 0, r.stdout + r.stderr
    status = r.stdout.splitlines()[0]
    assert status.startswith("200 ") and json.loads(status[4:]) == {"success": True}
    m = re.search(r"^messageId (\S+)$", r.stdout, re.M)
    assert m, r.stdout
    stored = server.events(message_id=m.group(1))
    assert [(e["type"], e["event"], e["userId"]) for e in stored] == \
        [("track", event, "test-user")]


def test_send_with_unknown_key_or_unreachable_server_fails(server):
    r = cli("send", "--write-key", f"nope-{uuid.uuid4().hex}", "--url", server.url)
    assert r.returncode != 0
    assert r.stdout.startswith("401 ") and "invalid_write_key" in r.stdout
    assert "messageId" not in r.stdout

    r = cli("send", "--write-key", server.write_key, "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode != 0
    assert "could not reach" in r.stderr


# -- events -----------------------------------------------------------------------


def test_events_table_json_and_filters(server):
    run = uuid.uuid4().hex[:8]
    a, b = f"CLI A {run}", f"CLI B {run}"
    sent = [(a, f"u1-{run}"), (a, f"u2-{run}"), (b, f"u1-{run}")]
    ids = []
    for event, user in sent:
        mid = f"cli-ev-{uuid.uuid4()}"
        assert track(server.url, server.write_key, event=event, userId=user,
                     messageId=mid).status_code == 200
        ids.append(mid)
    base = ["events", "--admin-token", ADMIN_TOKEN, "--url", server.url]

    r = cli(*base, "--json", "--event", a)
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["messageId"] for e in got] == ids[:2]  # oldest first
    assert all(e["type"] == "track" and e["event"] == a for e in got)

    r = cli(*base, "--json", "--event", a, "--limit", "1")
    assert [json.loads(line)["messageId"] for line in r.stdout.splitlines()] == [ids[1]]

    r = cli(*base, "--json", "--user-id", f"u1-{run}", "--type", "track")
    assert [json.loads(line)["messageId"] for line in r.stdout.splitlines()] == [ids[0], ids[2]]

    r = cli(*base, "--json", "--user-id", f"u1-{run}", "--type", "identify")
    assert r.returncode == 0 and r.stdout == ""

    # The table: a header, then one readable row per event; the token may come from the env.
    r = cli("events", "--url", server.url, "--event", a,
            env=clean_env(TRACKPIPE_ADMIN_TOKEN=ADMIN_TOKEN))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["RECEIVED", "AT", "TYPE", "EVENT", "/", "NAME", "USER",
                                "MESSAGE", "ID"]
    assert len(lines) == 3
    for line, mid, (_, user) in zip(lines[1:], ids[:2], sent[:2]):
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\s+track\s+", line), line
        assert a in line and user in line and line.endswith(mid)


def test_events_needs_a_valid_admin_token(server):
    r = cli("events", "--url", server.url)
    assert r.returncode == 2 and "--admin-token" in r.stderr
    r = cli("events", "--url", server.url, "--admin-token", "wrong")
    assert r.returncode != 0 and "401" in r.stderr


def test_admin_commands_explain_a_token_or_an_answer_they_cannot_use(server):
    for args in (("events",), ("profile", "someone"), ("privacy", "suppress", "someone")):
        r = cli(*args, "--url", server.url, "--admin-token", "pässwort")
        assert r.returncode == 2 and "printable ASCII" in r.stderr, r.stderr
    for args in (("events",), ("profile", "someone")):
        # a 200 that is not the admin API's JSON, as a proxy's page would be
        r = cli(*args, "--url", f"{server.url}/metrics?", "--admin-token", server.admin_token)
        assert r.returncode == 1 and "did not answer like trackpipe's admin API" in r.stderr, \
            r.stderr
        assert "Traceback" not in r.stderr


def test_events_follow_streams_new_events_once(server):
    event = f"CLI Follow {uuid.uuid4().hex[:8]}"
    before = f"cli-before-{uuid.uuid4()}"
    assert track(server.url, server.write_key, event=event, messageId=before).status_code == 200
    follow = LineReader(["events", "--follow", "--json", "--event", event,
                         "--admin-token", ADMIN_TOKEN, "--url", server.url], clean_env())
    try:
        # The initial listing shows the event sent before the start...
        first = follow.readline(TIMEOUT)
        assert first is not None, "".join(follow.stderr)
        assert json.loads(first)["messageId"] == before
        time.sleep(0.5)  # ...then it polls from the log head it read before listing

        new = [f"cli-follow-{i}-{uuid.uuid4()}" for i in range(2)]
        for mid in new:
            assert track(server.url, server.write_key, event=event,
                         messageId=mid).status_code == 200
        got = []
        for _ in range(2):
            line = follow.readline(10)
            assert line is not None, f"follow printed only {got!r}; {''.join(follow.stderr)}"
            got.append(json.loads(line))
        assert [e["messageId"] for e in got] == new
        assert all(e["event"] == event and e["type"] == "track" for e in got)

        # Nothing more arrives, so nothing more is printed (the poll runs every 0.5 s).
        extra = []
        deadline = time.monotonic() + 1.5
        while (left := deadline - time.monotonic()) > 0 and len(extra) < 5:
            line = follow.readline(left)
            if line is not None:
                extra.append(json.loads(line)["messageId"])
        assert extra == [], f"events printed again after they were shown: {extra}"
        assert follow.proc.poll() is None
    finally:
        follow.kill()


def test_second_server_on_the_same_data_dir_is_refused(tmp_path):
    """Two servers would run two log writers on one log."""
    from support import ServerProcess, free_port

    first = ServerProcess(tmp_path / "data").start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "trackpipe", "serve", "--port", str(free_port()),
             "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "TRACKPIPE_ADMIN_TOKEN": "x"})
        assert proc.returncode == 2
        assert "Another trackpipe is already serving" in proc.stderr
        assert httpx.get(f"{first.url}/health", timeout=5).status_code == 200
    finally:
        first.stop()


def test_profile_prints_the_person_and_privacy_suppresses_and_deletes(server):
    run = uuid.uuid4().hex[:8]
    person, anon = f"cli-user-{run}", f"cli-anon-{run}"
    assert server.post("/v1/page", {"anonymousId": anon, "name": "Pricing"}).status_code == 200
    assert server.post("/v1/identify", {"userId": person, "anonymousId": anon,
                                        "traits": {"plan": "pro"}}).status_code == 200
    auth = ("--url", server.url, "--admin-token", server.admin_token)

    def shown():
        r = cli("profile", anon, *auth)
        return r if r.returncode == 0 and person in r.stdout else None
    r = wait_for(shown, what="the profile at the CLI")
    assert f"userIds:       {person}" in r.stdout and f"anonymousIds:  {anon}" in r.stdout
    assert '"plan": "pro"' in r.stdout and "Pricing" in r.stdout and "merge" in r.stdout
    as_json = json.loads(cli("profile", person, "--json", *auth).stdout)
    assert [e["type"] for e in as_json["events"]] == ["page", "identify"]

    r = cli("privacy", "suppress", person, *auth)
    assert r.returncode == 0 and "Suppressed 2 identifier(s)" in r.stdout, r.stderr
    r = cli("privacy", "delete", person, *auth)
    assert r.returncode == 0 and "Deleted: 2 events, 1 profile(s)" in r.stdout, r.stdout + r.stderr
    r = cli("profile", person, *auth)
    assert r.returncode == 1 and "not_found" in r.stderr
    r = cli("privacy", "unsuppress", person, *auth)
    assert r.returncode == 0 and "Unsuppressed 1 identifier(s)" in r.stdout, r.stdout + r.stderr
    r = cli("privacy", "delete", person, "--url", server.url, "--admin-token", "wrong")
    assert r.returncode == 1 and "admin" in r.stderr.lower()


# -- what the audit of the CLI found ------------------------------------------------


def test_events_follow_shows_every_event_once_while_sends_go_on(server):
    """The listing and the following meet at one position: an event stored while the
    follower starts is neither skipped nor shown twice."""
    run = uuid.uuid4().hex[:8]
    event = f"CLI Race {run}"
    stop, counter, failures = threading.Event(), itertools.count(), []

    def sender() -> None:
        with httpx.Client(base_url=server.url, auth=(server.write_key, ""), timeout=10) as c:
            while not stop.is_set():
                batch = [{"type": "track", "userId": "r", "event": event,
                          "messageId": f"{run}-{next(counter)}"} for _ in range(10)]
                r = c.post("/v1/batch", json={"batch": batch})
                if r.status_code != 200:
                    failures.append(r.text)
                    return

    senders = [threading.Thread(target=sender) for _ in range(4)]
    for t in senders:
        t.start()
    follow = None
    try:
        time.sleep(0.3)
        follow = LineReader(["events", "--follow", "--json", "--limit", "1000", "--event", event,
                             "--admin-token", ADMIN_TOKEN, "--url", server.url], clean_env())
        first = follow.readline(TIMEOUT)
        assert first is not None, "".join(follow.stderr)
        shown = [json.loads(first)["messageId"]]
        time.sleep(1.5)  # the sends go on while the follower lists and starts following
    finally:
        stop.set()
        for t in senders:
            t.join()
    try:
        assert not failures, failures[:1]
        stored = [e["messageId"] for e in server.events(event=event)]  # the log's order
        while shown[-1] != stored[-1]:
            line = follow.readline(TIMEOUT)
            assert line is not None, f"the follower stopped at {shown[-1]}; {follow.stderr}"
            shown.append(json.loads(line)["messageId"])
    finally:
        follow.kill()
    expected = stored[stored.index(shown[0]):]
    missing = set(expected) - set(shown)
    assert shown == expected, (f"{len(missing)} stored events not shown, "
                               f"{len(shown) - len(set(shown))} shown twice")


@contextlib.contextmanager
def server_with_scan_window(tmp_path, scan: int):
    """A server whose log queries scan `scan` positions per call instead of 200,000, so
    that a few hundred events put a match beyond one call's reach."""
    data = tmp_path / "data"
    add_source(data, "default", WRITE_KEY)
    url = f"http://127.0.0.1:{free_port()}"
    code = ("import sys; from trackpipe.log.sqlite import SQLiteLog; "
            f"SQLiteLog.query.__kwdefaults__['scan'] = {scan}; "
            "from trackpipe.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["serve", "--port", url.rsplit(":", 1)[1], "--data-dir", str(data)]
    proc = subprocess.Popen([sys.executable, "-c", code, *args],
                            env=clean_env(TRACKPIPE_ADMIN_TOKEN=ADMIN_TOKEN),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_events_filter_finds_matches_beyond_one_scan_window(tmp_path):
    with server_with_scan_window(tmp_path, scan=100) as url:
        needles = []
        with httpx.Client(base_url=url, auth=(WRITE_KEY, ""), timeout=10) as c:
            for i in range(3):
                needles.append(f"needle-{i}-{uuid.uuid4()}")
                assert c.post("/v1/track", json={"userId": "u", "event": "Needle",
                                                 "messageId": needles[-1]}).status_code == 200
                hay = [{"type": "track", "userId": "u", "event": "Hay"}] * 250
                assert c.post("/v1/batch", json={"batch": hay}).status_code == 200
        page = httpx.get(f"{url}/api/v1/events", params={"event": "Needle"}, timeout=10,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        assert page["events"] == [] and page["next"] is not None  # what the CLI must page past

        base = ["events", "--url", url, "--admin-token", ADMIN_TOKEN, "--event", "Needle"]
        r = cli(*base, "--json")
        assert r.returncode == 0, r.stderr
        assert [json.loads(line)["messageId"] for line in r.stdout.splitlines()] == needles
        r = cli(*base, "--json", "--limit", "2")
        assert [json.loads(line)["messageId"] for line in r.stdout.splitlines()] == needles[1:]
        r = cli(*base)
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 4, r.stdout  # header + 3


@pytest.mark.parametrize("url", ["http://127.0.0.1:18601x", "http://[::1"])
def test_a_malformed_url_is_a_one_line_message(url):
    for args in (("events", "--admin-token", "x"), ("profile", "p", "--admin-token", "x"),
                 ("privacy", "delete", "p", "--admin-token", "x"), ("send", "--write-key", "k")):
        r = cli(*args, "--url", url)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith(f"trackpipe: --url {url!r} is not a valid URL: "), r.stderr
        assert r.stderr.count("\n") == 1 and r.stdout == "", (args, r.stderr)


@pytest.mark.parametrize("args", [(), ("--json", "--follow")])
def test_events_into_a_closed_pipe_exit_quietly(server, args):
    """`trackpipe events | head -1`: the reader is gone; no traceback, status 141."""
    assert track(server.url, server.write_key).status_code == 200
    read, write = os.pipe()
    os.close(read)  # as `head` does once it has its line
    try:
        proc = subprocess.run([sys.executable, "-m", "trackpipe", "events", "--limit", "1",
                               "--url", server.url, "--admin-token", ADMIN_TOKEN, *args],
                              stdin=subprocess.DEVNULL, stdout=write, stderr=subprocess.PIPE,
                              text=True, env=clean_env(), timeout=TIMEOUT)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_send_fails_for_an_event_the_server_would_not_store(server):
    r = cli("send", "--write-key", server.write_key, "--url", server.url, "--properties", "[1,2]")
    assert r.returncode == 2 and r.stdout == ""
    assert "--properties must be a JSON object" in r.stderr and "[1,2]" in r.stderr

    r = cli("send", "--write-key", server.write_key, "--url", server.url, "--event", "")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith("400 ") and "messageId" not in r.stdout
    assert "not stored" in r.stderr and "event_not_defined" in r.stderr, r.stderr


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_serve_brackets_an_ipv6_host_in_the_urls_it_prints(tmp_path):
    port = free_port()
    url = f"http://[::1]:{port}"
    proc = LineReader(["serve", "--host", "::1", "--port", str(port),
                       "--data-dir", str(tmp_path / "data")], clean_env())
    try:
        out = proc.read_until(r"curl ")
        wait_healthy(url)
        text = "\n".join(out)
        assert f"trackpipe listening on {url}  " in text, text
        assert out[-1].endswith(f" '{url}/v1/track'"), out[-1]  # quoted: [ ] is a zsh glob
        key = re.search(r"write key: (\S+)$", text, re.M).group(1)
        assert track(url, key).json() == {"success": True}
    finally:
        proc.stop()


def test_serve_on_a_port_in_use_says_so_and_never_listening(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                env=clean_env(TRACKPIPE_ADMIN_TOKEN=ADMIN_TOKEN))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "listening" not in r.stdout, r.stdout
    assert f"cannot listen on http://127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # one line, with the remedy
    assert "--port, or `[server] port` in the config file" in r.stderr, r.stderr


@pytest.mark.parametrize("damaged", ["catalog.db", "log.db"])
def test_serve_on_a_damaged_data_file_says_so_without_a_traceback(tmp_path, damaged):
    data = tmp_path / "data"
    data.mkdir()
    (data / damaged).write_bytes(b"not a database " * 400)
    r = cli("serve", "--port", "1", "--data-dir", str(data),
            env=clean_env(TRACKPIPE_ADMIN_TOKEN=ADMIN_TOKEN))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert f"cannot start on the data in {data}" in r.stderr
    assert "file is not a database" in r.stderr


def test_serve_on_a_log_damaged_inside_refuses_to_start(tmp_path):
    """R20: bytes flipped in the middle of log.db. trackpipe started, answered 200 to new
    events and 500 to reads of the log."""
    from trackpipe.log.base import Record
    from trackpipe.log.sqlite import SQLiteLog

    data = tmp_path / "data"
    data.mkdir()
    log = SQLiteLog(data / "log.db")
    body = json.dumps({"type": "track", "event": "E", "properties": {"pad": "x" * 900}})
    for start in range(0, 3000, 500):
        log.append([Record(f"m{n}", 1_700_000_000_000 + n, "track", "E", "u", None, "s",
                           body.encode()) for n in range(start, start + 500)])
    log.close()
    size = (data / "log.db").stat().st_size
    with open(data / "log.db", "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 8192)
    r = cli("serve", "--port", "1", "--data-dir", str(data),
            env=clean_env(TRACKPIPE_ADMIN_TOKEN=ADMIN_TOKEN))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "listening" not in r.stdout
    assert f"{data / 'log.db'} is damaged" in r.stderr and ".recover" in r.stderr


def snapshot(data) -> dict:
    """Every file of a data dir, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(data.iterdir())}


def test_serve_upgrades_a_data_dir_from_before_the_format_marker(tmp_path):
    """A data dir an older trackpipe wrote has no marker (format 1): marked 2 on start, so an
    older version that knows the marker refuses it from now on."""
    from support import ServerProcess

    server = ServerProcess(tmp_path / "data")  # its source, added as an older version would
    assert not (server.data_dir / "format").exists()
    server.start()
    try:
        assert (server.data_dir / "format").read_text() == "2\n"
        assert track(server.url, server.write_key).json() == {"success": True}
    finally:
        server.stop()


def test_sources_add_marks_the_data_dir_it_makes(tmp_path):
    data = tmp_path / "data"
    assert cli("sources", "add", "web", "--data-dir", str(data)).returncode == 0
    assert (data / "format").read_text() == "2\n"


def test_a_data_dir_a_newer_trackpipe_wrote_is_refused_and_left_as_it_was(tmp_path):
    """The older version started on it answered 500 for profiles of a new shape and wrote
    delivery rows the newer one misread later: every command that opens it stops first."""
    from trackpipe.log.sqlite import SQLiteLog

    data = tmp_path / "data"
    add_source(data, "default", WRITE_KEY)
    SQLiteLog(data / "log.db").close()
    (data / "format").write_text("99\n")
    data.chmod(0o755)  # a mode a start would tighten: a refused one does not
    before = snapshot(data)
    env = clean_env(TRACKPIPE_ADMIN_TOKEN=ADMIN_TOKEN)
    for args in (("serve", "--port", str(free_port())), ("sources", "list"),
                 ("sources", "add", "web"), ("destinations",),
                 ("replay", "--destination", "archive", "--failed-only")):
        r = cli(*args, "--data-dir", str(data), env=env)
        assert r.returncode == 1, (args, r.stdout + r.stderr)
        assert "Traceback" not in r.stderr and "listening" not in r.stdout, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert ("this data dir was written by a newer trackpipe (format 99; this one reads up"
                " to 2): run that version, or restore a backup taken before the upgrade"
                in r.stderr), (args, r.stderr)
    assert snapshot(data) == before
    assert data.stat().st_mode & 0o777 == 0o755


def test_a_format_file_that_holds_no_number_stops_the_start_in_one_line(tmp_path):
    data = tmp_path / "data"
    add_source(data, "default", WRITE_KEY)
    (data / "format").write_text("two\n")
    r = cli("serve", "--port", str(free_port()), "--data-dir", str(data),
            env=clean_env(TRACKPIPE_ADMIN_TOKEN=ADMIN_TOKEN))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "holds 'two', not the data dir's format" in r.stderr
    assert (data / "format").read_text() == "two\n"


def test_the_format_file_is_its_dirs_owners_whoever_writes_it(tmp_path):
    """Root running a CLI command on a service user's data dir (umask 077) wrote `format`
    as root, 0600: that user's trackpipe could then not read it, and refused to start."""
    from trackpipe.sources.catalog import Catalog

    data = tmp_path / "data"
    add_source(data, "default", WRITE_KEY)
    (data / "format").unlink(missing_ok=True)  # a dir from before the marker
    if os.geteuid() == 0:
        os.chown(data, 65534, 65534)
    with umask(0o077):
        r = cli("sources", "list", "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    marker = (data / "format").stat()
    assert marker.st_mode & 0o777 == 0o644 and (data / "format").read_text() == "2\n"
    assert (marker.st_uid, marker.st_gid) == (data.stat().st_uid, data.stat().st_gid)

    # Only a start tightens the dir: opening the catalog (each privacy request) does not.
    data.chmod(0o750)
    Catalog(data).close()
    assert data.stat().st_mode & 0o777 == 0o750


def test_replay_refuses_an_empty_time(tmp_path):
    from trackpipe.log.sqlite import SQLiteLog

    data = tmp_path / "data"
    data.mkdir()
    SQLiteLog(data / "log.db").close()
    config = write_config(tmp_path / "trackpipe.toml", [
        {"name": "archive", "type": "file", "settings": {"directory": str(tmp_path / "out")}}])
    for flag in ("--since", "--until"):  # e.g. an unset shell variable
        r = cli("replay", "--config", str(config), "--data-dir", str(data),
                "--destination", "archive", flag, "")
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stdout == "" and "must be an ISO-8601 time" in r.stderr, r.stderr


HOSTILE = "\x1b[31mRED\x1b[0m\nFAKE ROW\r\u202e"


def test_table_output_escapes_control_characters_json_keeps_them(server):
    run = uuid.uuid4().hex[:8]
    # (the user has no CR/LF: the admin API cannot route a profile id holding them)
    event, user = f"{HOSTILE} {run}", f"cli-\x1b[31mRED\u202e-{run}"
    assert track(server.url, server.write_key, event=event, userId=user).status_code == 200
    base = ["--url", server.url, "--admin-token", ADMIN_TOKEN]

    r = cli("events", "--event", event, *base)
    assert r.returncode == 0, r.stderr
    assert not re.search("[\x00-\x1f\x7f\u202e]", r.stdout.replace("\n", "")), repr(r.stdout)
    assert len(r.stdout.splitlines()) == 2  # the header and one row
    assert "\\x1b[31mRED\\x1b[0m\\nFAKE" in r.stdout, r.stdout
    assert "cli-\\x1b[31mRED" in r.stdout, r.stdout

    r = cli("events", "--event", event, "--json", *base)
    assert json.loads(r.stdout)["event"] == event  # --json is for programs: the exact value

    shown = wait_for(lambda: (p := cli("profile", user, *base)).returncode == 0 and p,
                     what="the profile at the CLI")
    assert not re.search("[\x00-\x1f\x7f\u202e]", shown.stdout.replace("\n", "")), \
        repr(shown.stdout)
    assert f"userIds:       cli-\\x1b[31mRED\\u202e-{run}" in shown.stdout, shown.stdout
    assert "\\x1b[31mRED\\x1b[0m\\nFAKE ROW" in shown.stdout  # the timeline's event


def test_profile_of_the_ids_dot_and_dot_dot(server):
    """"." and ".." are ids like any other, not path steps."""
    run = uuid.uuid4().hex[:8]
    for user in (".", ".."):
        assert track(server.url, server.write_key, userId=user,
                     event=f"Dots {run}").status_code == 200
    for user in (".", ".."):
        r = wait_for(lambda: (p := cli("profile", user, "--url", server.url, "--admin-token",
                                       ADMIN_TOKEN)).returncode == 0 and f"Dots {run}" in p.stdout
                     and p, what=f"the profile of {user!r}")
        assert f"userIds:       {user}\n" in r.stdout, r.stdout


# -- the data dir's permissions ---------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int):
    """The usual 022 for the commands started inside, whatever the test runner's is."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_data_dir_is_private_and_the_catalog_0600(tmp_path):
    data = tmp_path / "new" / "data"
    with umask(0o022):
        r = cli("sources", "add", "web", "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / "catalog.db").stat().st_mode & 0o777 == 0o600  # the keys live there
    assert "0700" not in r.stderr, r.stderr  # nothing to tighten


def test_an_open_data_dir_is_made_0700_at_start_with_one_line(tmp_path):
    from support import ServerProcess

    server = ServerProcess(tmp_path / "data")
    server.data_dir.chmod(0o755)  # made by hand, or by a trackpipe that did not set a mode
    with umask(0o022):
        server.start()
    try:
        assert server.data_dir.stat().st_mode & 0o777 == 0o700
        assert track(server.url, server.write_key).json() == {"success": True}
    finally:
        server.stop()
    said = [line for line in server.log_path.read_text().splitlines() if "0700" in line]
    assert len(said) == 1 and "was mode 755" in said[0], said

    server.data_dir.chmod(0o750)  # the CLI commands that open the data dir do the same
    r = cli("sources", "list", "--data-dir", str(server.data_dir))
    assert r.returncode == 0, r.stderr
    assert server.data_dir.stat().st_mode & 0o777 == 0o700
    assert "was mode 750" in r.stderr and "made it 0700" in r.stderr, r.stderr


def test_sources_add_refuses_keys_a_documented_form_cannot_carry(tmp_path):
    data = str(tmp_path / "data")
    for key, rule in ((" sk", "no space at either end"), ("sk ", "no space at either end"),
                      ("sk?a", "'?' or '#'"), ("sk#a", "'?' or '#'"),
                      ("k" * 300, "over 256")):
        r = cli("sources", "add", "web", "--write-key", key, "--data-dir", data)
        assert r.returncode == 1 and rule in r.stderr, (key[:20], r.stderr)
        assert r.stdout == "" and "Traceback" not in r.stderr
    assert cli("sources", "list", "--data-dir", data).stdout.count("\n") == 1  # the header
    r = cli("sources", "add", "web", "--write-key", "team/web%2F", "--data-dir", data)
    assert r.returncode == 0 and r.stdout.strip() == "team/web%2F", r.stderr


def poll_status(url: str, key: str, wanted: int, timeout: float) -> int:
    """The status of a track call once it is `wanted`, or the last one after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        status = track(url, key).status_code
        if status == wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_sources_disable_revokes_a_write_key_on_a_running_server_and_enable_restores_it(
        fresh_server):
    server = fresh_server().start()
    data = str(server.data_dir)
    key = server.add_source("leaky")
    assert track(server.url, key).status_code == 200

    r = cli("sources", "disable", "leaky", "--data-dir", data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("Disabled source 'leaky': its write key is refused (401)"
                                " within a second.")
    assert r.stderr == ""  # the server has run here: no note about the data dir
    assert poll_status(server.url, key, 401, timeout=2) == 401
    assert track(server.url, key).json()["code"] == "invalid_write_key"
    assert track(server.url, server.write_key).status_code == 200  # only that source
    rows = {line.split()[0]: line.split() for line in
            cli("sources", "list", "--data-dir", data).stdout.splitlines()[1:]}
    assert rows["leaky"][2] == "False" and rows["default"][2] == "True"

    r = cli("sources", "enable", "leaky", "--data-dir", data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Enabled source 'leaky': its write key is accepted again."
    assert poll_status(server.url, key, 200, timeout=2) == 200


def test_sources_disable_or_enable_of_an_unknown_name_exits_2_listing_the_names(tmp_path):
    data = tmp_path / "data"
    add_source(data, "web")
    add_source(data, "backend")
    for action in ("disable", "enable"):
        r = cli("sources", action, "wbe", "--data-dir", str(data))
        assert r.returncode == 2, r.stderr
        assert r.stdout == "" and "Traceback" not in r.stderr
        assert "no source named 'wbe'" in r.stderr and "'web', 'backend'" in r.stderr, r.stderr
    assert all(s.split()[2] == "True" for s in
               cli("sources", "list", "--data-dir", str(data)).stdout.splitlines()[1:])


def test_sources_list_disable_enable_on_a_missing_data_dir_exit_2_and_make_nothing(tmp_path):
    """A typo'd --data-dir (or another working dir) once made an empty data dir in silence."""
    typo = tmp_path / "trackpipe-dta"
    for action in ("list", "disable", "enable"):
        args = ("sources", action) + (("web",) if action != "list" else ())
        r = cli(*args, "--data-dir", str(typo))
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert f"There is no trackpipe data dir at {typo}" in r.stderr, r.stderr
        assert not typo.exists()  # nothing made

    # A dir that exists but is no trackpipe's (`--data-dir ~`): nothing made or chmodded.
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    home.chmod(0o755)
    for args in (("list",), ("disable", "web"), ("add", "web")):
        r = cli("sources", *args, "--data-dir", str(home))
        assert r.returncode == 2 and r.stdout == "", (args, r.stderr)
        assert sorted(p.name for p in home.iterdir()) == ["notes.txt"], args
        assert home.stat().st_mode & 0o777 == 0o755, args


def test_serve_prints_no_curl_line_with_a_disabled_key(tmp_path):
    data = tmp_path / "data"
    add_source(data, "default", WRITE_KEY)
    add_source(data, "web", "wk_enabled_one")
    assert cli("sources", "disable", "default", "--data-dir", str(data)).returncode == 0
    port = free_port()
    proc = LineReader(["serve", "--port", str(port), "--data-dir", str(data)],
                      clean_env(TRACKPIPE_ADMIN_TOKEN=ADMIN_TOKEN))
    try:
        out = proc.read_until(r"curl ")
    finally:
        proc.stop()
    assert "curl -u 'wk_enabled_one:'" in out[-1] and WRITE_KEY not in "".join(out), out


def test_sources_add_on_a_data_dir_no_trackpipe_has_run_in_says_so(tmp_path):
    """Allowed (sources may be added before the first serve), but said on stderr: the key
    printed is one a server running on another data dir never sees."""
    typo = tmp_path / "trackpipe-dta"
    r = cli("sources", "add", "web", "--data-dir", str(typo))
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    note = r.stderr.splitlines()
    assert len(note) == 1 and str(typo.resolve()) in note[0], r.stderr
    assert "no trackpipe has run" in note[0]
    assert add_source(typo, "web") == r.stdout.strip()  # the key was stored there


def test_serve_first_start_says_to_export_the_admin_token_not_pass_it_as_a_flag(tmp_path):
    port = free_port()
    proc = LineReader(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
                      clean_env())
    try:
        out = proc.read_until(r"curl ")
    finally:
        proc.stop()
    token_line = next(i for i, line in enumerate(out) if line.startswith("Admin token"))
    hint = out[token_line + 1]
    assert "export TRACKPIPE_ADMIN_TOKEN=" in hint, out
    assert "tpa_" not in hint  # the token itself is still printed only once


# -- what a new user walking through the README ran into --------------------------------


def data_dir_with_a_log(tmp_path):
    """A data dir a server has run in (it holds the log), with no destination's state."""
    from trackpipe.log.sqlite import SQLiteLog

    data = tmp_path / "data"
    data.mkdir()
    SQLiteLog(data / "log.db").close()
    return data


def test_destinations_check_and_replay_without_config_say_to_pass_the_servers(tmp_path):
    """Without --config they said "No destinations configured" or "config ok: 0
    destination(s)" and exited 0, while the server ran with destinations."""
    data = str(data_dir_with_a_log(tmp_path))
    for args in (("destinations",), ("destinations", "--json"), ("check",),
                 ("replay", "--destination", "hook")):
        r = cli(*args, "--data-dir", data)
        # check finds the settings valid (a TRACKPIPE_*-only deployment may run it as is)
        assert r.returncode == (0 if args == ("check",) else 2), (args, r.stdout + r.stderr)
        assert r.stdout == "", (args, r.stdout)
        assert "No --config was given" in r.stderr, (args, r.stderr)
        assert "--config FILE" in r.stderr and "the server runs with" in r.stderr, r.stderr
        assert "TRACKPIPE_*" in r.stderr, r.stderr  # they cannot name destinations
        assert "none configured" not in r.stderr and "Traceback" not in r.stderr

    # With a config file, what they said before stands.
    empty = write_config(tmp_path / "empty.toml")
    r = cli("destinations", "--config", str(empty), "--data-dir", data)
    assert r.returncode == 0 and r.stdout.strip() == ("No destinations configured; add"
                                                      " [[destinations]] tables to the config"
                                                      " file."), r.stdout + r.stderr
    r = cli("check", "--config", str(empty), "--data-dir", data)
    assert r.returncode == 0 and r.stdout == "config ok: 0 destination(s)\n", r.stdout + r.stderr
    archive = write_config(tmp_path / "archive.toml", [
        {"name": "archive", "type": "file", "settings": {"directory": str(tmp_path / "out")}}])
    r = cli("replay", "--destination", "hook", "--config", str(archive), "--data-dir", data)
    assert r.returncode == 2 and "No destination is named 'hook' (known: archive)." in r.stderr


def test_replay_echoes_an_empty_range_as_given(tmp_path):
    """It said "`since` (1796688000000) must be before `until` (1796601600000, exclusive)"."""
    data = str(data_dir_with_a_log(tmp_path))
    config = write_config(tmp_path / "trackpipe.toml", [
        {"name": "archive", "type": "file", "settings": {"directory": str(tmp_path / "out")}}])
    r = cli("replay", "--config", str(config), "--data-dir", data, "--destination", "archive",
            "--since", "2026-12-08T00:00:00Z", "--until", "2026-12-07T00:00:00Z")
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert ("`since` (2026-12-08T00:00:00Z) must be before `until` (2026-12-07T00:00:00Z,"
            " exclusive): the range holds no event.") in r.stderr, r.stderr
    assert "1796688000000" not in r.stderr


def test_destinations_and_replay_on_a_missing_data_dir_say_what_sources_says(tmp_path):
    """They said only "... holds no trackpipe log; pass --data-dir."."""
    config = write_config(tmp_path / "trackpipe.toml", [
        {"name": "archive", "type": "file", "settings": {"directory": str(tmp_path / "out")}}])
    typo = tmp_path / "trackpipe-dta"
    for args in (("destinations",), ("replay", "--destination", "archive", "--failed-only"),
                 ("sources", "list")):
        r = cli(*args, "--config", str(config), "--data-dir", str(typo))
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout + r.stderr)
        assert r.stderr == (f"trackpipe: There is no trackpipe data dir at {typo}: pass the"
                            " --data-dir the server uses (`trackpipe serve` prints it at"
                            " start).\n"), (args, r.stderr)
        assert not typo.exists()


def test_a_data_dir_with_sources_but_no_events_says_no_server_has_run_there(tmp_path):
    config = write_config(tmp_path / "trackpipe.toml", [
        {"name": "archive", "type": "file", "settings": {"directory": str(tmp_path / "out")}}])
    data = tmp_path / "data"
    assert cli("sources", "add", "web", "--data-dir", str(data)).returncode == 0
    for args in (("destinations",), ("replay", "--destination", "archive", "--failed-only")):
        r = cli(*args, "--config", str(config), "--data-dir", str(data))
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout + r.stderr)
        assert f"The trackpipe data dir at {data} holds no events yet" in r.stderr, r.stderr
        assert "no server has run on it" in r.stderr, r.stderr


def test_serve_on_a_host_it_cannot_listen_on_points_at_the_host_not_the_port(tmp_path):
    r = cli("serve", "--host", "192.0.2.1", "--port", "8080", "--data-dir",
            str(tmp_path / "data"), env=clean_env(TRACKPIPE_ADMIN_TOKEN=ADMIN_TOKEN))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Cannot assign requested address" in r.stderr, r.stderr
    assert "check --host, or `[server] host`" in r.stderr and "--port" not in r.stderr


def help_entries(text: str) -> dict[str, str]:
    """The options and arguments of an argparse --help page, each with its description."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if re.match(r"^  \S", line):  # "  --limit LIMIT   text" or "  name" alone
            invocation, _, description = line.strip().partition("  ")
            current = invocation.split()[0].rstrip(",")  # "--follow, -f": "--follow"
            entries[current] = description.strip()
        elif current and re.match(r"^ {4,}\S", line):  # the description's next lines
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    return entries


def subcommands(*parents: str) -> list[str]:
    """The subcommand names in the {a,b,c} line of `trackpipe PARENTS --help`."""
    text = cli(*parents, "--help").stdout
    return re.search(r"\{([a-z,]+)\}", text).group(1).split(",")


def test_every_option_of_every_subcommand_has_a_description():
    commands = []
    for name in subcommands():
        commands += ([(name, action) for action in subcommands(name)] if name == "sources"
                     else [(name,)])
    assert ("events",) in commands and ("sources", "add") in commands, commands
    bare = {}
    for command in commands:
        r = cli(*command, "--help")
        assert r.returncode == 0, (command, r.stderr)
        entries = help_entries(r.stdout)
        assert "-h" in entries or "--help" in entries, (command, r.stdout)
        missing = [option for option, text in entries.items() if not text]
        if missing:
            bare[" ".join(command)] = missing
    assert not bare, f"options without a description: {bare}"


def test_events_help_says_the_order_and_the_default_limit_and_keeps_the_token_secret():
    token = f"tpa_secret_{uuid.uuid4().hex}"
    r = cli("events", "--help", env=clean_env(TRACKPIPE_ADMIN_TOKEN=token))
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "oldest first" in text and "default 20" in text, text
    assert "TRACKPIPE_ADMIN_TOKEN" in text and token not in r.stdout


def test_replay_help_says_that_without_a_range_it_resends_the_whole_log():
    r = cli("replay", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "neither --since/--until nor --failed-only" in text, text
    assert "every event in the log" in text, text


def test_a_missing_admin_token_says_where_the_token_comes_from(server):
    for args in (("events",), ("profile", "someone"), ("privacy", "suppress", "someone")):
        r = cli(*args, "--url", server.url)
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout + r.stderr)
        assert r.stderr.startswith("trackpipe: pass --admin-token or set TRACKPIPE_ADMIN_TOKEN"),\
            r.stderr
        assert "printed once by the first `trackpipe serve`" in r.stderr, r.stderr
        assert "admin_token" in r.stderr and r.stderr.count("\n") == 1, r.stderr
