"""Credentials inside a destination's URL (a webhook's `?token=`; a `user:password@` is
refused in a webhook's url, see test_webhook.py) are secrets like a secret setting:
masked in what the API and the CLI show, and in the details trackpipe records when a
receiver echoes them. The host and path stay readable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from delivery.faulty_rig import api, cli, send
from destinations.sink_webhook import Recorder
from support import wait_for, write_config
from trackpipe.destinations.base import is_http_url, mask_url, url_credentials

TOKEN = "s3cr3t-t0ken-value"
PASSWORD = "hunter2-pass"


@pytest.mark.parametrize("url, shown, secrets", [
    (f"https://h.test/hook?token={TOKEN}&v=2", "https://h.test/hook?token=***&v=***", {TOKEN}),
    (f"https://user:{PASSWORD}@h.test:8443/p", "https://***@h.test:8443/p", {PASSWORD}),
    ("https://user:p%40ss-word@h.test/p", "https://***@h.test/p", {"p%40ss-word", "p@ss-word"}),
    ("https://wk_0123456789@api.test", "https://***@api.test", {"wk_0123456789"}),  # a write key
    # Shown, every value is hidden; as a secret, only what looks like one: `json` masked
    # in every detail would garble "application/json".
    ("https://h.test/x?format=json&retries=1000", "https://h.test/x?format=***&retries=***",
     set()),
    ("https://h.test/x?x=0123456789abcdef", "https://h.test/x?x=***", {"0123456789abcdef"}),
    ("https://h.test/x?sig=ab/cd%3D%3D", "https://h.test/x?sig=***", {"ab/cd%3D%3D", "ab/cd=="}),
    ("https://h.test/cb#access_token=abcd1234", "https://h.test/cb#access_token=***",
     {"abcd1234"}),
    ("HTTPS://h.test/hook?token=abcd1234", "HTTPS://h.test/hook?token=***", {"abcd1234"}),
    ("https://[bad/hook?key=abcd1234", "https://[bad/hook?key=***", {"abcd1234"}),  # no raise
    ("https://h.test/services/T0/B0", "https://h.test/services/T0/B0", set()),
    ("https://[::1]:80/a?flag", "https://[::1]:80/a?flag", set()),
])
def test_what_counts_as_a_credential_in_a_url(url, shown, secrets):
    assert mask_url(url, "***") == shown
    assert set(url_credentials(url)) == secrets
    assert is_http_url(url)


def test_url_credentials_never_show_in_the_api_the_cli_or_recorded_details(
        fresh_server, tmp_path):
    recorder = Recorder([(400, {}, f"bad request: /hook?token={TOKEN}".encode())])
    try:
        url = recorder.url(f"/hook?token={TOKEN}")
        config = write_config(tmp_path / "trackpipe.toml", [{
            "name": "hook", "type": "webhook",
            "settings": {"url": url, "allow_private_targets": True}}],
            identity={"enabled": False})
        server = fresh_server(config=config).start()
        [mid] = send(server, 1)
        wait_for(lambda: api(server, f"/api/v1/events/{mid}/deliveries").json()[
            "deliveries"][0]["state"] == "failed", what="the event failed")
        [request] = recorder.requests
        assert request["path"] == f"/hook?token={TOKEN}"  # the receiver got the real URL

        deliveries = api(server, f"/api/v1/events/{mid}/deliveries").text
        destinations = api(server, "/api/v1/destinations").text
        failed = api(server, "/api/v1/destinations/hook/failed").text
        listed = cli(server, "destinations", "--json")
        for shown in (deliveries, destinations, failed, listed.stdout + listed.stderr):
            assert TOKEN not in shown, shown
        [hook] = json.loads(destinations)["destinations"]
        assert hook["settings"]["url"] == f"http://127.0.0.1:{recorder.port}/hook?token=********"
        assert "bad request: /hook?token=" in deliveries  # the rest of the answer is kept
        server.stop()
        log = server.log_path.read_text(errors="replace")
        assert TOKEN not in log
    finally:
        recorder.close()


def test_check_prints_a_url_without_its_credentials(tmp_path):
    recorder = Recorder()
    try:
        config = write_config(tmp_path / "trackpipe.toml", [{
            "name": "fwd", "type": "segment",
            "settings": {"write_key": "wk-1", "allow_private_targets": True,
                         "api_url": recorder.url("").replace("http://",
                                                             f"http://user:{PASSWORD}@")}}])
        r = subprocess.run([sys.executable, "-m", "trackpipe", "check", "--config", str(config),
                            "--data-dir", str(tmp_path / "data")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "  ok    fwd (segment): " in r.stdout, r.stdout + r.stderr
        assert PASSWORD not in r.stdout + r.stderr
        assert recorder.requests, "the health check reached the server"
    finally:
        recorder.close()
