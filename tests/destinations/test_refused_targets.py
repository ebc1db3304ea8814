"""What the vendor HTTP destinations (segment, mixpanel, amplitude) do with an api_url
the network guard refuses.

A refused address (loopback here, with allow_private_targets off) can never be
reached by retrying: every HTTP destination fails the event at once, saying why,
instead of retrying it for the whole retry window. The local server must receive
nothing.
"""

from __future__ import annotations

import asyncio

import pytest

from destinations.sink_webhook import Recorder
from trackpipe import config
from trackpipe.destinations.base import Event
from trackpipe.destinations.build import build_destination

TRACK = {"type": "track", "event": "Signed Up", "userId": "u1", "messageId": "m1",
         "timestamp": "2026-03-01T12:00:00.000Z", "properties": {}}
SETTINGS = {
    "segment": {"write_key": "wk-1"},
    "mixpanel": {"project_token": "tok"},
    "amplitude": {"api_key": "key-1"},
}
GROUP = {"type": "group", "groupId": "g1", "userId": "u1", "messageId": "m2",
         "timestamp": "2026-03-01T12:00:00.000Z", "traits": {"name": "Acme"}}
IDENTIFY = {"type": "identify", "userId": "u1", "messageId": "m3",
            "timestamp": "2026-03-01T12:00:00.000Z", "traits": {"plan": "pro"}}


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


def send(kind: str, url: str, messages: list[dict], **settings) -> list:
    dest = build_destination(config.Destination(name="d", type=kind, settings={
        **SETTINGS[kind], "api_url": url, **settings}))

    async def go():
        await dest.start()
        try:
            return await dest.send([Event(i, m["messageId"], m, None, None, None)
                                    for i, m in enumerate(messages)])
        finally:
            await dest.close()
    return asyncio.run(go())


@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_a_refused_api_url_fails_at_once_and_nothing_is_sent(kind, recorder):
    outcomes = send(kind, recorder.url("/"), [TRACK])
    assert [o.state for o in outcomes] == ["failed"]
    assert "cannot reach" in outcomes[0].detail
    assert "127.0.0.1" in outcomes[0].detail and "allow_private_targets" in outcomes[0].detail
    assert recorder.requests == []


def test_mixpanel_engage_and_groups_fail_at_once_on_a_refused_address(recorder):
    outcomes = send("mixpanel", recorder.url("/"), [IDENTIFY, GROUP], group_key="company")
    assert [o.state for o in outcomes] == ["failed", "failed"]
    assert all("allow_private_targets" in o.detail for o in outcomes)
    assert recorder.requests == []


@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_an_unreachable_allowed_address_is_still_retried(kind):
    [outcome] = send(kind, "http://127.0.0.1:9/", [TRACK], allow_private_targets=True)
    assert outcome.state == "retry" and "cannot reach http://127.0.0.1:9" in outcome.detail
