"""What the delivery framework records of a destination's answers: the vendor
destinations driven by the real worker (SQLite log, deliveries.db, vendor mocks),
and any destination's secrets kept out of what is stored, logged and shown."""

from __future__ import annotations

import base64
import json
import logging
import urllib.parse

import msgspec
import pytest

from trackpipe import config
from trackpipe.delivery.worker import DestinationWorker
from trackpipe.destinations.base import Destination, fail, scrub
from trackpipe.destinations.build import build_destination
from trackpipe.dsn import MASK
from trackpipe.log.base import Record

from delivery import backlog
from delivery.test_worker import come_due, drain, in_loop
from destinations.vendor_mocks import MixpanelMock

files = backlog.files  # the fixture: a real SQLite log and deliveries.db


STORED_TS = 1_772_366_400_250  # the stored messages' `timestamp`, 2026-03-01T12:00:00.250Z


def mixpanel_worker(mock, event_log, state, mapping: dict) -> DestinationWorker:
    cfg = msgspec.convert({
        "name": "mp", "type": "mixpanel", "retry_initial_seconds": 0.01,
        "settings": {"project_token": "tok", "api_url": mock.url, "allow_private_targets": True},
        "actions": [{"name": "a", "trigger": 'type = "track"', "mapping": mapping}]},
        config.Destination)
    return DestinationWorker(cfg, build_destination(cfg), event_log, state)


def append_tracks(event_log, kinds: list) -> None:
    """Track events whose properties.kind an action maps to `type`."""
    event_log.append([
        Record(f"m{k}", STORED_TS + 5000, "track", "E", f"u{k}", None, "src",
               msgspec.json.encode({"type": "track", "event": "E", "userId": f"u{k}",
                                    "messageId": f"m{k}", "properties": {"kind": kind}}),
               ts=STORED_TS)
        for k, kind in enumerate(kinds, 1)])


MAPPING = {"type": "$.properties.kind", "event": "$.event", "userId": "$.userId",
           "messageId": "$.messageId"}  # no `timestamp`


@in_loop
async def test_a_mapped_message_without_timestamp_keeps_its_stored_time_on_a_retry(files):
    """Mixpanel deduplicates on (event, distinct_id, time, $insert_id): a time taken when
    sending made each retried attempt a new event."""
    _, event_log, state = files
    mock = MixpanelMock(token="tok")
    try:
        append_tracks(event_log, ["track"])
        w = mixpanel_worker(mock, event_log, state, MAPPING)
        mock.break_()
        await w.step()
        assert state.where_is("mp", 1) == "retrying"
        mock.heal()
        come_due(state)
        await drain(w)
        await w.destination.close()
        assert [len(r.body) > 2 for r in mock.requests] == [True, True]
        times = [json.loads(r.body)[0]["properties"]["time"] for r in mock.requests]
        assert times == [STORED_TS, STORED_TS]
        assert mock.received() == ["m1"]
    finally:
        mock.close()


@in_loop
async def test_an_object_mapped_to_type_fails_that_event_and_the_batch_goes(files):
    """It used to raise (unhashable type) in send: the whole batch was retried for hours,
    and no request was made."""
    _, event_log, state = files
    mock = MixpanelMock(token="tok")
    try:
        append_tracks(event_log, ["track", {"v": 1}, "track"])
        w = mixpanel_worker(mock, event_log, state, MAPPING)
        await drain(w)
        await w.destination.close()
        assert len(mock.requests) == 1 and mock.received() == ["m1", "m3"]
        [failed] = state.failed("mp")
        assert failed["message_id"] == "m2" and "type {'v': 1}" in failed["detail"]
        assert [state.where_is("mp", p) for p in (1, 2, 3)] == ["done", "failed", "done"]
    finally:
        mock.close()


class Echoing(Destination):
    """A tool that quotes credentials back: in its answers, and in what it raises."""

    kind = "echoing"
    secret_fields = ("token", "headers")

    class Settings(msgspec.Struct):
        token: str = "tok-7f3a9c-secret"
        headers: dict = msgspec.field(default_factory=lambda: {
            "Authorization": "Bearer hdr-42abc", "X-Env": "1"})

    def __init__(self, raise_first: bool = False):
        super().__init__("echoing", self.Settings())
        self.raise_first = raise_first

    async def send(self, batch):
        if self.raise_first:
            self.raise_first = False
            raise RuntimeError("connection to tok-7f3a9c-secret lost")
        one_request = fail(401, 'Invalid token "tok-7f3a9c-secret" for "Bearer hdr-42abc"')
        return [one_request] * len(batch)


@in_loop
async def test_secrets_a_tool_echoes_are_masked_in_what_the_worker_records_and_logs(
        files, caplog):
    _, event_log, state = files
    event_log.append([Record(f"m{k}", STORED_TS, "track", "E", "u", None, "src",
                             b'{"type":"track","event":"E","userId":"u"}') for k in (1, 2)])
    cfg = config.Destination(name="echoing", type="echoing", retry_initial_seconds=0.01)
    w = DestinationWorker(cfg, Echoing(raise_first=True), event_log, state)
    with caplog.at_level(logging.WARNING, logger="trackpipe.delivery"):
        await w.step()  # send raises: a retry of the whole batch, with its text
        assert state.summary("echoing")["last_error"]["detail"] == (
            f"RuntimeError: connection to {MASK} lost")
        come_due(state)
        await drain(w)
    failed = state.failed("echoing")
    assert [f["detail"] for f in failed] == [f'Invalid token "{MASK}" for "{MASK}"'] * 2
    shown = json.dumps([failed, state.summary("echoing")]) + caplog.text
    assert "tok-7f3a9c" not in shown and "hdr-42abc" not in shown and "connection to" in shown


def test_scrub_masks_escaped_cut_and_connection_string_secrets():
    quoted = 'pa"ss\\word-99'
    assert scrub('{"error": "bad key pa\\"ss\\\\word-99"}', [quoted, json.dumps(quoted)[1:-1]]
                 ) == f'{{"error": "bad key {MASK}"}}'
    # an excerpt cut inside the secret still hides the part that shows
    assert scrub("Invalid API key: eu-project-RE…", ["eu-project-REAL-api-key"]
                 ) == f"Invalid API key: {MASK}…"
    # a connection string's password alone, as libpq quotes it (dsn.scrub, reused)
    assert scrub('bad token "hunter22"', ["host=db password=hunter22"]) == f'bad token "{MASK}"'
    # a short header value ("1") would mask every digit: left as it is
    dest = Echoing()
    assert dest.scrub("HTTP 401 for Bearer hdr-42abc") == f"HTTP 401 for {MASK}"



@in_loop
async def test_a_service_accounts_basic_auth_echoed_by_mixpanel_is_masked(files):
    """A tool quoting the Authorization header it got shows the credentials in base64;
    only the settings' own values were masked."""
    _, event_log, state = files
    mock = MixpanelMock(token="tok", service_account=("sa.user", "sa-secret-987"),
                        project_id="42")
    try:
        append_tracks(event_log, ["track"])
        cfg = msgspec.convert({"name": "mp", "type": "mixpanel", "max_attempts": 1, "settings": {
            "project_token": "tok", "api_url": mock.url, "allow_private_targets": True,
            "service_account_username": "sa.user", "service_account_secret": "sa-secret-987",
            "project_id": "42"}}, config.Destination)
        w = DestinationWorker(cfg, build_destination(cfg), event_log, state)
        basic = base64.b64encode(b"sa.user:sa-secret-987").decode()
        mock.answer_next(401, {"error": f"Authorization: Basic {basic} may not import"})
        await drain(w)
        await w.destination.close()
        [failed] = state.failed("mp")
        assert failed["detail"] == f'{{"error": "Authorization: {MASK} may not import"}}'
        assert basic not in json.dumps(state.summary("mp"))
    finally:
        mock.close()


WEBHOOK_KEY = "whsec_" + base64.b64encode(b"k" * 30 + b"\xfb\xff").decode()  # has + and /


@pytest.mark.parametrize("echoed", [
    "token hdr-token-42abc is not valid",               # a Bearer header's token alone
    f"bad key {WEBHOOK_KEY.removeprefix('whsec_')}",    # the signing key, as libraries decode it
    f"secret={urllib.parse.quote(WEBHOOK_KEY, safe='')}",  # URL-encoded
    json.dumps({"key": WEBHOOK_KEY}).replace("/", "\\/"),  # JSON as PHP writes it
    "shared s3gment-shared-77 refused",
])
def test_a_webhooks_secrets_are_masked_in_the_forms_a_receiver_echoes_them(echoed):
    hook = build_destination(config.Destination(name="hook", type="webhook", settings={
        "url": "https://example.com/hook", "secret": WEBHOOK_KEY,
        "segment_shared_secret": "s3gment-shared-77",
        "headers": {"Authorization": "Bearer hdr-token-42abc", "X-Env": "1"}}))
    [outcome] = hook.scrub_outcomes([fail(401, echoed)])
    assert MASK in outcome.detail
    for secret in ("hdr-token-42abc", "s3gment-shared-77", WEBHOOK_KEY.removeprefix("whsec_"),
                   "a2tra2tra2tra2tr"):
        assert secret not in outcome.detail
