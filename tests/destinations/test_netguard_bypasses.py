"""Attempts to get a request past the SSRF guard, as a hostile config author, DNS server
or redirecting receiver would. Each ends refused, with nothing received locally.

Every attempt uses real connections: the `Redial` dialer sends each address the guard
should refuse to a local listener, so if the guard let one through, the listener
would receive the request. The listener also listens on [::1], so a request to
[::] or [::1] would be recorded too.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import msgspec
import pytest

from destinations import sink_webhook
from destinations.sink_webhook import Recorder, Redial, fake_dns
from trackpipe import config
from trackpipe.destinations import httpclient
from trackpipe.destinations.base import DELIVERED, Event
from trackpipe.destinations.build import build_destination
from trackpipe.destinations.netguard import refusal, system_resolver
from trackpipe.destinations.webhook import Webhook, WebhookSettings

PUBLIC = "8.8.8.8"  # a global address the dialer sends to 127.0.0.1
HOOK = "hooks.example.test"  # the webhook's name; it resolves to PUBLIC unless a test says

# Each is refused for a different reason; the comment says what it would reach.
NON_PUBLIC = [
    "127.0.0.1", "127.255.255.254", "::1",  # loopback
    "0.0.0.0", "0.1.2.3", "::",  # "this host": Linux connects 0.0.0.0 and :: to local services
    "::ffff:127.0.0.1", "::ffff:7f00:1", "::ffff:10.0.0.1",  # IPv4-mapped
    "::127.0.0.1", "::a00:1",  # IPv4-compatible (deprecated)
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT)
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1",  # NAT64, well-known and local
    "2002:7f00:1::", "2002:a9fe:a9fe::1", "2002:c0a8:101::1",  # 6to4 of private IPv4
    "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:0:7f00:1::1",  # Teredo
    "fc00::1", "fd12:3456:789a::1", "fd00:ec2::254",  # unique-local (AWS's metadata on IPv6)
    "fe80::1", "fe80::1%lo", "fec0::1",  # link-local (with a zone id), old site-local
    "10.0.0.1", "172.16.0.1", "192.168.1.1",  # RFC 1918
    "169.254.169.254", "169.254.170.2",  # cloud metadata, ECS task credentials
    "100.64.0.1", "100.100.100.200",  # CGNAT shared space (Alibaba's metadata)
    "224.0.0.1", "239.255.255.250", "ff02::1", "ff0e::1",  # multicast
    "255.255.255.255", "240.0.0.1",  # broadcast, reserved
    "198.18.0.1", "192.0.2.1", "2001:db8::1", "3fff::1", "100::1", "5f00::1",  # tests, discard
    # IETF protocol assignments: Python 3.11 calls all but the first /29 and .170/31 global
    "192.0.0.1", "192.0.0.8", "192.0.0.64", "192.0.0.255",
    "::ffff:192.0.0.8", "64:ff9b::c000:8", "2002:c000:8::",
]


class _Server6(sink_webhook._Server):
    address_family = socket.AF_INET6


@pytest.fixture
def listener():
    """A Recorder on 127.0.0.1 and on [::1] at the same port, recording into one list."""
    for _ in range(5):  # the port the system gave on 127.0.0.1 may be taken on ::1
        recorder = Recorder()
        try:
            v6 = _Server6(("::1", recorder.port), sink_webhook._recording_handler(recorder))
            break
        except OSError:
            recorder.close()
    thread = threading.Thread(target=v6.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield recorder
    v6.shutdown()
    v6.server_close()
    thread.join(5)
    recorder.close()


def dns(table: dict):
    """fake_dns for the names in `table`; any other name (127.1, 0x7f.1, localhost)
    through this machine's resolver, as in production."""
    fake = fake_dns(table)

    async def resolve(host: str, port: int) -> list[str]:
        return await (fake if host in table else system_resolver)(host, port)

    return resolve


def deliver(url: str, resolver, *, sends: int = 1) -> list:
    """The outcome of each of `sends` one-event batches to a webhook that does not allow
    private targets, dialling PUBLIC and every NON_PUBLIC address at 127.0.0.1."""
    dialer = Redial({PUBLIC: "127.0.0.1", **{a: "127.0.0.1" for a in NON_PUBLIC}})
    hook = Webhook("hook", msgspec.convert({"url": url}, WebhookSettings),
                   resolver=resolver, dialer=dialer)

    async def go():
        await hook.start()
        try:
            return [await hook.send([event(f"m{i}")]) for i in range(sends)]
        finally:
            await hook.close()

    return asyncio.run(go())


def event(message_id: str) -> Event:
    return Event(1, message_id, {"type": "track", "event": "Signed Up", "userId": "u1",
                                 "messageId": message_id, "timestamp": "2026-03-01T12:00:00Z"},
                 None, None, None)


def assert_refused(outcome, address: str = "") -> None:
    """A terminal failure that names the refusal (and the address, when given)."""
    assert outcome.state == "failed" and outcome.status is None, outcome
    assert "Refused to connect" in outcome.detail and address in outcome.detail
    assert "allow_private_targets = true" in outcome.detail


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_a_name_resolving_to_a_non_public_address_is_refused(listener, address):
    [outcome] = deliver(listener.url(host=HOOK), dns({HOOK: [address]}))
    assert_refused(outcome, f"{HOOK} (")
    assert listener.requests == []


@pytest.mark.parametrize("address", ["127.0.0.1", "192.0.0.8"])
def test_a_name_with_one_non_public_address_among_public_ones_is_refused(listener, address):
    [outcome] = deliver(listener.url(host=HOOK), dns({HOOK: [PUBLIC, address, "1.1.1.1"]}))
    assert_refused(outcome, address)
    assert listener.requests == []


@pytest.mark.parametrize("address", ["127.0.0.1", "169.254.169.254", "192.0.0.8"])
def test_rebinding_between_two_sends_is_refused_at_the_second_connect(listener, address):
    answers = iter([[PUBLIC], [address]])
    [first, second] = deliver(listener.url(host=HOOK), dns({HOOK: lambda: next(answers)}),
                              sends=2)
    assert first == DELIVERED
    assert_refused(second, address)
    assert [r["path"] for r in listener.requests] == ["/hook"]  # the first send only


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "192.0.0.64"])
def test_rebinding_during_a_relative_redirect_is_refused(listener, address):
    # The receiver sends us to another path on the same name; by then the name points
    # inside. The listener closes each connection, so the second hop connects again.
    answers = iter([[PUBLIC], [address]])
    listener.script = [(302, {"Location": "/next"}, b"")]
    [outcome] = deliver(listener.url(host=HOOK), dns({HOOK: lambda: next(answers)}))
    assert_refused(outcome, address)
    assert [r["path"] for r in listener.requests] == ["/hook"]


REDIRECT_TARGETS = [
    "http://127.0.0.1:{port}", "http://127.1:{port}", "http://127.0.1:{port}",
    "http://0x7f.1:{port}", "http://0x7f000001:{port}", "http://2130706433:{port}",
    "http://0:{port}", "http://0.0.0.0:{port}", "http://[::]:{port}", "http://[::1]:{port}",
    "http://[::ffff:127.0.0.1]:{port}", "http://[::ffff:7f00:1]:{port}",
    "http://[::127.0.0.1]:{port}", "http://[64:ff9b::7f00:1]:{port}",
    "http://[2002:7f00:1::]:{port}", "http://[fe80::1%25lo]:{port}", "http://localhost:{port}",
    "http://169.254.169.254", "http://192.0.0.8:{port}", "http://inside.test:{port}",
    "HTTP://127.0.0.1:{port}", "https://127.0.0.1:{port}", "//127.0.0.1:{port}",
    "http://u:p@127.0.0.1:{port}", f"http://{HOOK}@127.0.0.1:{{port}}",
]


@pytest.mark.parametrize("target", REDIRECT_TARGETS)
def test_a_redirect_to_a_non_public_address_is_refused(listener, target):
    listener.script = [(307, {"Location": target.format(port=listener.port) + "/admin"}, b"")]
    [outcome] = deliver(listener.url(host=HOOK),
                        dns({HOOK: [PUBLIC], "inside.test": [PUBLIC, "10.1.2.3"]}))
    assert_refused(outcome)
    assert [r["path"] for r in listener.requests] == ["/hook"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_every_redirect_status_is_checked(listener, status):
    listener.script = [(status, {"Location": listener.url("/admin", host="127.1")}, b"")]
    [outcome] = deliver(listener.url(host=HOOK), dns({HOOK: [PUBLIC]}))
    assert_refused(outcome, "127.0.0.1")
    assert [r["path"] for r in listener.requests] == ["/hook"]


@pytest.mark.parametrize("target, state, why", [
    ("ftp://127.0.0.1:{port}/admin", "failed", "not http(s)"),
    ("file:///etc/passwd", "failed", "not http(s)"),
    ("gopher://127.0.0.1:{port}/_x", "failed", "not http(s)"),
    # httpx refuses the octal form in a URL; the webhook retries such an answer
    ("http://0177.0.0.1:{port}/admin", "retry", "Invalid IPv4 address"),
])
def test_a_redirect_to_another_scheme_or_a_bad_url_is_not_followed(listener, target, state,
                                                                    why):
    listener.script = [(308, {"Location": target.format(port=listener.port)}, b"")]
    [outcome] = deliver(listener.url(host=HOOK), dns({HOOK: [PUBLIC]}))
    assert outcome.state == state and why in outcome.detail
    assert [r["path"] for r in listener.requests] == ["/hook"]


PROXY_VARIABLES = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                   "all_proxy"]


def test_proxy_variables_are_ignored(listener, monkeypatch):
    # A proxy would resolve the name itself, past the guard.
    proxy = Recorder()
    try:
        for name in PROXY_VARIABLES:
            monkeypatch.setenv(name, proxy.url(""))
        monkeypatch.setenv("NO_PROXY", "")
        [delivered] = deliver(listener.url(host=HOOK), dns({HOOK: [PUBLIC]}))
        [refused] = deliver(listener.url(host="inside.test"), dns({"inside.test": ["10.0.0.1"]}))
    finally:
        proxy.close()
    assert delivered == DELIVERED and [r["path"] for r in listener.requests] == ["/hook"]
    assert_refused(refused, "10.0.0.1")
    assert proxy.requests == []


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808", "2002:808:808::1",
                                     "192.0.1.1"])  # just past 192.0.0.0/24
def test_public_addresses_stay_reachable(address):
    assert refusal(address) is None


# -- the other HTTP destinations share the client, so the guard -------------------------

VENDORS = {
    "segment": {"write_key": "wk-1"},
    "mixpanel": {"project_token": "tok"},
    "amplitude": {"api_key": "key-1"},
}


def vendor_send(kind: str, api_url: str) -> list:
    dest = build_destination(config.Destination(name=kind, type=kind, settings={
        **VENDORS[kind], "api_url": api_url}))

    async def go():
        await dest.start()
        try:
            return await dest.send([event("m1")])
        finally:
            await dest.close()

    outcomes = asyncio.run(go())
    return outcomes if isinstance(outcomes, list) else [outcomes]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:7f00:1]", "0x7f.1"])
@pytest.mark.parametrize("kind", sorted(VENDORS))
def test_other_http_destinations_refuse_local_api_urls(listener, kind, host):
    outcomes = vendor_send(kind, f"http://{host}:{listener.port}")
    assert outcomes and all(o.state != "delivered" for o in outcomes)
    assert all("Refused to connect" in o.detail for o in outcomes)
    assert listener.requests == []


@pytest.mark.parametrize("kind", sorted(VENDORS))
def test_other_http_destinations_do_not_follow_redirects(listener, kind, monkeypatch):
    guarded = httpclient.new_client
    monkeypatch.setattr(httpclient, "new_client", lambda **kw: guarded(
        **kw, resolver=dns({"api.vendor.test": [PUBLIC]}), dialer=Redial({PUBLIC: "127.0.0.1"})))
    listener.script = [(307, {"Location": listener.url("/admin")}, b"")] * 5
    vendor_send(kind, f"http://api.vendor.test:{listener.port}")
    assert listener.requests and all(r["path"] != "/admin" for r in listener.requests)
