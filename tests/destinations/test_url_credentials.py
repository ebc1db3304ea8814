"""Credentials inside a destination's URL (a webhook's `?token=`; a `user:password@` is
refused in a webhook's url, see test_webhook.py) are secrets like a secret setting:
masked in what the API and the CLI show, and in the details trackpipe records when a
receiver echoes them. The host and path stay readable."""

from __future__ import annotations

import json

import pytest

from delivery.faulty_rig import api, cli, send
from destinations.sink_webhook import Recorder
from support import wait_for, write_config
from trackpipe.destinations.base import mask_url, url_credentials

TOKEN = "s3cr3t-t0ken-value"
PASSWORD = "hunter2-pass"


@pytest.mark.parametrize("url, shown, secrets", [
    (f"https://h.test/hook?token={TOKEN}&v=2", "https://h.test/hook?token=***&v=***",
     [TOKEN, "2"]),
    (f"https://user:{PASSWORD}@h.test:8443/p", "https://user:***@h.test:8443/p", [PASSWORD]),
    ("https://user:p%40ss@h.test/p", "https://user:***@h.test/p", ["p@ss"]),
    ("https://h.test/services/T0/B0", "https://h.test/services/T0/B0", []),
    ("https://[::1]:80/a?flag", "https://[::1]:80/a?flag", []),
])
def test_what_counts_as_a_credential_in_a_url(url, shown, secrets):
    assert mask_url(url, "***") == shown
    assert sorted(url_credentials(url)) == sorted(secrets)


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
