"""An event is stamped and stored in a batch exactly as it would be alone, however its
batch mates' times (and the batch's own sentAt) repeat or differ."""

from __future__ import annotations

import copy

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from trackpipe.config import load
from trackpipe.pipeline.enrich import RequestContext
from trackpipe.pipeline.ingest import batch_context, prepare

LIMITS = load(None, {}).limits
ABSENT = object()
# Few values, so that batch mates share them: strings that are times in several shapes,
# strings that are not, and values that are no string (equal keys among them: True, 1, 1.0;
# unhashable ones: a list, an object).
TIMES = st.sampled_from([
    ABSENT, None, True, 1, 1.0, "1", "", [], ["2024-05-01T09:59:59.000Z"], {"a": 1},
    "2024-05-01T09:59:59.000Z", "2024-05-01T09:59:59.000+00:00", "2024-05-01T10:00:00.100Z",
    "2024-05-01T12:00:00+02:00", "2024-05-01T09:59:58.5Z", "9999-12-31T23:59:59.999Z",
    "garbage"])
FIELDS = ("originalTimestamp", "timestamp", "sentAt")


def event(index: int, times: tuple) -> dict:
    ev = {"type": "track", "event": "E", "userId": "u", "messageId": f"m{index}"}
    for key, value in zip(FIELDS, times):
        if value is not ABSENT:
            ev[key] = value
    return ev


def stored(events: list[dict], batch_sent) -> list[tuple[bytes, int]]:
    rc = RequestContext(1_714_557_600_123, "2024-05-01T10:00:00.123Z", "src", None, 2)
    body = {"batch": events} if batch_sent is ABSENT else {"batch": events, "sentAt": batch_sent}
    batch_context(body, rc)
    records, discards = prepare(events, None, rc, LIMITS, False)
    assert discards == []
    return [(r.body, r.ts) for r in records]


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(TIMES, TIMES, TIMES), min_size=1, max_size=12), TIMES)
def test_an_event_is_stamped_in_a_batch_as_it_would_be_alone(times, batch_sent):
    events = [event(i, t) for i, t in enumerate(times)]
    alone = [stored([copy.deepcopy(ev)], batch_sent)[0] for ev in events]
    assert stored(events, batch_sent) == alone


def test_batch_mates_with_the_same_timestamp_and_other_sent_at_times_differ():
    """The pinned case of the property above: only sentAt tells the two apart."""
    events = [event(0, ("2024-05-01T09:59:59.000Z", ABSENT, "2024-05-01T10:00:00.000Z")),
              event(1, ("2024-05-01T09:59:59.000Z", ABSENT, "2024-05-01T10:00:01.000Z")),
              event(2, ("2024-05-01T09:59:59.000Z", ABSENT, ["not", "a", "time"]))]
    bodies = [msgspec.json.decode(body) for body, _ in stored(events, ABSENT)]
    assert [b["timestamp"] for b in bodies] == [
        "2024-05-01T09:59:59.123Z", "2024-05-01T09:59:58.123Z", "2024-05-01T09:59:59.000Z"]
    assert [b.get("sentAt") for b in bodies] == [
        "2024-05-01T10:00:00.000Z", "2024-05-01T10:00:01.000Z", None]
