"""The Event handed to destinations: its message as a dict or as the stored JSON."""

import msgspec
import pytest

from trackpipe.destinations.base import Event


def test_message_and_json_come_from_either_form():
    message = {"type": "track", "event": "Tested", "properties": {"n": 1}}
    raw = msgspec.json.encode(message)
    from_raw = Event(1, "m1", None, None, None, None, raw)
    assert from_raw.json is raw
    assert from_raw.message == message
    from_dict = Event(1, "m1", message, None, None, None)
    assert from_dict.message is message
    assert msgspec.json.decode(from_dict.json) == message


def test_an_event_needs_a_message():
    with pytest.raises(ValueError):
        Event(1, "m1", None, None, None, None)
