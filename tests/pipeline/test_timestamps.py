"""read_ts: the collector's one-step timestamp read, against parse_ts + canonical_ts."""

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from trackpipe.events import _CANONICAL, format_ts, parse_ts, read_ts


def canonical_ts(value: str, ms: int) -> str:
    """The emitted form as the collector made it before read_ts: the client's own text
    when already canonical (but a leap second's :60, emitted as the next second), else
    formatted anew."""
    if _CANONICAL.match(value) and value[17:19] != "60":
        return value if len(value) == 24 else value[:23] + "Z"
    return format_ts(ms)


def two_steps(value):
    """What the collector did before read_ts: parse, then the emitted form."""
    ms = parse_ts(value)
    return None if ms is None else (ms, canonical_ts(value, ms))


def test_the_shapes_sdks_send():
    assert read_ts("2024-05-01T12:34:56.789Z") == (1714566896789, "2024-05-01T12:34:56.789Z")
    assert read_ts("2024-05-01T12:34:56.789+00:00") == (1714566896789, "2024-05-01T12:34:56.789Z")
    assert read_ts("2024-05-01T12:34:56.789123+00:00") == (1714566896789,
                                                           "2024-05-01T12:34:56.789Z")
    assert read_ts("2024-05-01T14:34:56.789+02:00") == (1714566896789, "2024-05-01T12:34:56.789Z")
    assert read_ts("9999-12-31T23:59:59.999Z") == (253402300799999, "9999-12-31T23:59:59.999Z")


def test_every_rfc_3339_time_is_read_before_1970_lower_case_and_leap_seconds_too():
    """The reference: accept any RFC 3339 value. These read as absent (receivedAt) before."""
    assert read_ts("1969-12-31T23:59:59.000Z") == (-1000, "1969-12-31T23:59:59.000Z")
    assert read_ts("0001-01-01T00:00:00Z") == (-62135596800000, "0001-01-01T00:00:00.000Z")
    assert read_ts("2024-01-01t00:00:00z") == (1704067200000, "2024-01-01T00:00:00.000Z")
    # a leap second is the start of the next second, the way clocks that smear it count
    assert read_ts("2016-12-31T23:59:60Z") == (1483228800000, "2017-01-01T00:00:00.000Z")
    assert read_ts("2016-12-31T23:59:60.5+01:00") == (1483225200500, "2016-12-31T23:00:00.500Z")


def test_what_is_not_a_time_reads_as_absent():
    for value in (None, 17, "", "yesterday", "2024-02-30T00:00:00.000Z", "2024-13-01T00:00:00.000Z",
                  "0000-01-01T00:00:00.000Z", "9999-12-31T23:59:60Z",
                  "2024-01-01T00:00:00.\u0661\u0662\u0663Z",  # Arabic-Indic digits
                  "\u0662\u0660\u0662\u0664-01-01T00:00:00.000Z"):
        assert read_ts(value) is None, value


canonical_like = st.builds(
    lambda y, mo, d, h, mi, s, ms, z: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}.{ms:03d}{z}",
    st.integers(0, 9999), st.integers(0, 13), st.integers(0, 32), st.integers(0, 24),
    st.integers(0, 60), st.integers(0, 60), st.integers(0, 999), st.sampled_from(["Z", "+00:00"]))
datetimes = st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(9999, 12, 31),
                         timezones=st.just(timezone.utc)).map(lambda d: d.isoformat())
offsets = st.builds(lambda d, h: d.replace(tzinfo=timezone(timedelta(hours=h))).isoformat(),
                    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1)),
                    st.integers(-14, 14))


@settings(max_examples=1000, deadline=None, database=None)
@given(st.one_of(canonical_like, datetimes, offsets, st.text(max_size=45), st.none(),
                 st.integers()))
def test_read_ts_agrees_with_parse_then_canonical(value):
    assert read_ts(value) == two_steps(value)


# -- the ts the log keeps -----------------------------------------------------------------

times = st.one_of(st.none(), datetimes, offsets, canonical_like, st.just("not a time"))


@settings(max_examples=300, deadline=None, database=None)
@given(times, times, times, st.booleans())
def test_each_record_keeps_the_timestamp_its_body_carries(timestamp, original, sent, batch):
    """Identity reads track, page and screen events by their ts alone: it must be the
    body's `timestamp`, whatever the clock-skew rules made of it."""
    import msgspec

    from trackpipe.config import load
    from trackpipe.pipeline.enrich import RequestContext
    from trackpipe.pipeline.ingest import batch_context, prepare

    ev = {"type": "track", "event": "E", "userId": "u"}
    for key, value in (("timestamp", timestamp), ("originalTimestamp", original)):
        if value is not None:
            ev[key] = value
    rc = RequestContext(1_714_557_600_123, "2024-05-01T10:00:00.123Z", "src", None, 2)
    if batch:
        batch_context({"batch": [ev], "sentAt": sent}, rc)
    elif sent is not None:
        ev["sentAt"] = sent
    records, _ = prepare([ev], None if batch else "track", rc, load(None, {}).limits, False)
    body = msgspec.json.decode(records[0].body)
    assert records[0].ts == read_ts(body["timestamp"])[0]
