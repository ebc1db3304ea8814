"""Router: `integrations` (wire-protocol §4.4), filters, actions, mappings, config errors."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import msgspec
import pytest

from trackpipe import config
from trackpipe.delivery import conditions
from trackpipe.delivery.routing import Routed, Router, Skipped
from trackpipe.errors import ConfigError

DOCS = Path(__file__).parents[2] / "docs" / "routing.md"
NAME = "Mixpanel"


def router(**fields) -> Router:
    return Router(msgspec.convert({"name": NAME, "type": "webhook", **fields}, config.Destination))


def track(**fields) -> dict:
    return {"type": "track", "event": "Order Completed", "userId": "u1",
            "properties": {"revenue": 120}, **fields}


# -- integrations ----------------------------------------------------------------------

@pytest.mark.parametrize("integrations, options", [
    (None, None),
    ({}, None),
    ({"All": True}, None),
    ({"Intercom": False}, None),                                    # everything except Intercom
    ({"All": False, NAME: True}, None),                             # only Mixpanel
    ({NAME: True}, None),
    ({NAME: {"session_id": 7}}, {"session_id": 7}),                 # options object: on
    ({"All": False, NAME: {"session_id": 7}}, {"session_id": 7}),
    ({"All": True, "Salesforce": False}, None),                     # Segment's default
    ({"Segment.io": True}, None),                                   # analytics-next's own key
    ({"Customer.io Data Pipelines": True}, None),                   # cio-browser's own key
    ({NAME: "false"}, None),                                        # not a setting: ignored
    ({NAME: None, "All": True}, None),
    ({"mixpanel": False}, None),                                    # names are case-sensitive
])
def test_integrations_that_leave_the_destination_on(integrations, options):
    assert router().route(track(integrations=integrations)) == Routed(
        track(integrations=integrations), options, None)


def test_integrations_key_absent_means_on():
    assert isinstance(router().route(track()), Routed)


@pytest.mark.parametrize("integrations", [
    {NAME: False},
    {"All": False},
    {"All": False, "Amplitude": True},
    {"All": False, NAME: None},          # an ignored value falls back to All
    {"All": False, NAME: 0},
    {"All": True, NAME: False},
    {"All": False, "mixpanel": True},    # case-sensitive: this is another destination
])
def test_integrations_that_turn_the_destination_off(integrations):
    assert router().route(track(integrations=integrations)) == Skipped("integrations")


def test_integrations_that_is_not_an_object_is_ignored():
    assert isinstance(router().route(track(integrations=["All"])), Routed)


def test_integrations_options_come_with_an_action_too():
    r = router(actions=[{"name": "a", "trigger": "true", "mapping": {"id": "$.userId"}}])
    assert r.route(track(integrations={NAME: {"k": 1}})) == Routed({"id": "u1"}, {"k": 1}, "a")


# -- _metadata and the input ---------------------------------------------------------

def test_metadata_is_removed_and_the_input_is_not_changed():
    message = track(_metadata={"bundled": ["x"]}, integrations={NAME: {"k": 1}})
    before = copy.deepcopy(message)
    routed = router().route(message)
    assert "_metadata" not in routed.message
    assert routed.message == {k: v for k, v in before.items() if k != "_metadata"}
    assert message == before
    routed.message["extra"] = 1  # the routed message is a copy of its own
    assert "extra" not in message


def test_triggers_do_not_see_metadata():
    r = router(actions=[{"name": "meta", "trigger": "_metadata exists"}])
    assert r.route(track(_metadata={"a": 1})) == Skipped("no_action")


# -- filters -------------------------------------------------------------------------

PAGE = {"type": "page", "name": "Home", "userId": "u1"}
IDENTIFY = {"type": "identify", "userId": "u1", "traits": {"email": "a@x.io"}}
SCREEN = {"type": "screen", "name": "Order Completed", "userId": "u1"}


@pytest.mark.parametrize("spec, passes", [
    ({"mode": "allow"}, [True, True, True, True]),
    ({"mode": "deny"}, [False, False, False, False]),
    ({"types": ["track", "identify"]}, [True, False, True, False]),
    ({"mode": "deny", "types": ["page"]}, [True, False, True, True]),
    ({"events": ["Order Completed"]}, [True, False, False, True]),  # screen names count
    ({"events": ["Home"]}, [False, True, False, False]),            # page names count
    ({"types": ["track"], "events": ["Order Completed"]}, [True, False, False, False]),
    ({"mode": "deny", "events": ["Order Completed"]}, [False, True, True, False]),
    ({"events": ["order completed"]}, [False, False, False, False]),  # compared exactly
])
def test_filters(spec, passes):
    r = router(filter=spec)
    outcomes = [r.route(m) for m in (track(), PAGE, IDENTIFY, SCREEN)]
    assert [isinstance(o, Routed) for o in outcomes] == passes
    assert all(o == Skipped("filter") for o in outcomes if isinstance(o, Skipped))


def test_filter_survives_odd_types_and_names():
    r = router(filter={"types": ["track"], "events": ["x"]})
    assert r.route({"type": ["track"], "event": "x"}) == Skipped("filter")
    assert r.route({"type": "track", "event": {"x": 1}}) == Skipped("filter")


# -- actions -------------------------------------------------------------------------

ACTIONS = [
    {"name": "big", "trigger": 'type = "track" and properties.revenue >= 100',
     "mapping": {"order.total": "$.properties.revenue", "user": "$.userId", "kind": "big"}},
    {"name": "any track", "trigger": 'type = "track"'},
    {"name": "signup", "trigger": "traits.email exists", "mapping": {"email": "$.traits.email"}},
]


def test_first_matching_action_wins_and_its_mapping_shapes_the_message():
    r = router(actions=ACTIONS)
    assert r.route(track()) == Routed({"order": {"total": 120}, "user": "u1", "kind": "big"},
                                      None, "big")
    small = track(properties={"revenue": 5})
    assert r.route(small) == Routed(small, None, "any track")  # no mapping: unchanged
    assert r.route(IDENTIFY) == Routed({"email": "a@x.io"}, None, "signup")
    assert r.route(PAGE) == Skipped("no_action")


def test_steps_run_in_order():
    r = router(filter={"types": ["track"]}, actions=[{"name": "a", "trigger": "false"}])
    off = track(integrations={NAME: False})
    assert r.route({**PAGE, "integrations": {NAME: False}}) == Skipped("integrations")
    assert r.route(off) == Skipped("integrations")
    assert r.route(PAGE) == Skipped("filter")
    assert r.route(track()) == Skipped("no_action")


def test_routing_does_not_parse_per_event(monkeypatch):
    r = router(actions=ACTIONS, filter={"types": ["track", "identify"]})

    def no_parsing(*args):
        raise AssertionError("parsed while routing")
    monkeypatch.setattr(conditions, "parse", no_parsing)
    monkeypatch.setattr(conditions, "parse_path", no_parsing)
    assert r.route(track()).action == "big"


# -- configuration errors --------------------------------------------------------------

@pytest.mark.parametrize("fields, words", [
    ({"filter": {"mode": "block"}}, "Destination 'Mixpanel': filter mode 'block' is unknown; "
                                    'use "allow" or "deny".'),
    ({"filter": {"types": ["track", "Identify", "custom"]}},
     "Destination 'Mixpanel': filter types ['Identify', 'custom'] are unknown; "
     "the message types are alias, group, identify, page, screen, track."),
    ({"actions": [{"name": "a", "trigger": 'type = "track" and'}]},
     "Destination 'Mixpanel', action 'a': bad trigger. Invalid condition: expected a path"),
    ({"actions": [{"name": "a", "trigger": "true"}, {"name": "a", "trigger": "false"}]},
     "Destination 'Mixpanel', action 'a': every action needs a name of its own"),
    ({"actions": [{"name": " ", "trigger": "true"}]}, "action ' ': every action needs a name"),
    ({"actions": [{"name": "a", "trigger": "true", "mapping": {"x": "$.a b"}}]},
     "Destination 'Mixpanel', action 'a': bad mapping. Mapping key 'x': '$.a b' is not a"),
])
def test_configuration_errors_name_the_destination(fields, words):
    with pytest.raises(ConfigError) as caught:
        router(**fields)
    assert words in str(caught.value)


def test_a_destination_cannot_be_named_all():
    with pytest.raises(ConfigError, match="cannot be named 'All'"):
        Router(config.Destination(name="All", type="webhook"))


# -- the documentation -----------------------------------------------------------------

def test_the_documented_example_config_loads_and_routes(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    example = next(b for b in blocks if "[[destinations]]" in b)
    path = tmp_path / "trackpipe.toml"
    path.write_text(example)
    (dest,) = config.load(path, env={}).destinations
    r = Router(dest)
    order = track(properties={"revenue": 150, "order id": "o-9"})
    assert r.route(order) == Routed({"order": {"id": "o-9", "total": 150}, "user": "u1",
                                     "kind": "big"}, None, "big order")
    assert r.route(PAGE) == Skipped("filter")
    assert r.route(IDENTIFY) == Routed({"email": "a@x.io", "plan": "free"}, None, "signup")
    assert r.route({**IDENTIFY, "traits": {"email": "t@example.com"}}) == Skipped("no_action")


def test_the_documented_error_message_is_the_real_one():
    documented = re.search(r"```\n(Destination 'orders-hook'.*?)```", DOCS.read_text(), re.S)
    assert documented is not None
    with pytest.raises(ConfigError) as caught:
        Router(config.Destination(name="orders-hook", type="webhook", actions=[
            config.Action(name="big order", trigger='type = "track" and and event = "x"')]))
    assert str(caught.value).startswith(documented.group(1))


# -- routing a stored body --------------------------------------------------------------

BODIES = [track(), PAGE, IDENTIFY, SCREEN, track(integrations={"All": False}),
          track(integrations={NAME: {"session_id": 7}}), track(integrations=[NAME]),
          track(_metadata={"bundled": [NAME]}), track(_metadata=None),
          {"type": ["track"], "event": "x"}, track(event={"x": 1}),
          track(properties={"unicode": "caf\u00e9 \U0001f600", "n": 1.5e300, "big": 2 ** 63 - 1}),
          # "integrations" and "_metadata" as text, as nested keys, beside the real ones
          track(integrations={}), track(properties={"integrations": {}}),
          track(integrations={NAME: False}, properties={"integrations": {}}),
          track(integrations={}, properties={"x": {"integrations": {"All": False}}}),
          track(integrations={NAME: False}, properties={"note": '"integrations":{}'}),
          track(properties={"note": '"integrations":{"All":false}'}),
          track(properties={"_metadata": {"bundled": [NAME]}})]
ROUTERS = [{}, {"filter": {"types": ["track"]}}, {"filter": {"mode": "deny", "events": ["Home"]}},
           {"filter": {"types": ["track"], "events": ["x"]}}, {"actions": ACTIONS}]


@pytest.mark.parametrize("fields", ROUTERS)
def test_routing_a_stored_body_agrees_with_routing_the_message(fields):
    r = router(**fields)
    for message in BODIES:
        body = msgspec.json.encode(message)
        want, got = r.route(message), r.route_body(body)
        if isinstance(want, Skipped):
            assert got == want, message
            continue
        assert (got.options, got.action) == (want.options, want.action), message
        sent = got.message if got.raw is None else msgspec.json.decode(got.raw)
        assert sent == want.message, message
        if got.raw is not None:
            assert got.raw is body, "passed on as the stored bytes, not re-encoded"


def test_a_body_with_metadata_is_decoded_to_remove_it():
    got = router().route_body(msgspec.json.encode(track(_metadata={"bundled": [NAME]})))
    assert got.raw is None and "_metadata" not in got.message
