"""The SSRF guard: which addresses are refused, and that the refusal happens at connect
time on the address actually dialled (not on a name checked earlier)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from destinations.sink_webhook import Recorder, Redial, fake_dns
from trackpipe.destinations.httpclient import error_outcome, new_client
from trackpipe.destinations.netguard import BlockedAddress, Guard, host_refusal, refusal

PUBLIC = "8.8.8.8"  # a global address the Redial dialer sends to 127.0.0.1


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("fd00:ec2::254", "private"), ("fc00::1", "private"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.1.2.3", "multicast"), ("ff02::1", "multicast"),
    ("100.64.0.1", "non-public"), ("240.0.0.1", "private"), ("2001:db8::1", "private"),
    ("::ffff:127.0.0.1", "loopback, embedded IPv4 127.0.0.1"),
    ("::ffff:169.254.169.254", "link-local, embedded IPv4"),
    ("64:ff9b::a00:1", "private, embedded IPv4 10.0.0.1"),
    ("2002:7f00:1::", "loopback, embedded IPv4 127.0.0.1"),
    ("::7f00:1", "IPv4-compatible"),
    # site-local, deprecated: ipaddress calls it global, so only an allow-list of
    # 2000::/3 catches it
    ("fec0::1", "non-public (outside 2000::/3"), ("feff:1::2", "non-public (outside 2000::/3"),
    ("3fff::1", "non-public (documentation"), ("3fff:fff:ffff::1", "non-public (documentation"),
])
def test_non_public_addresses_are_refused(address, kind):
    assert refusal(address).startswith(kind)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888",
                                     "3fff:1000::1",  # just past the documentation range
                                     "::ffff:8.8.8.8", "2002:808:808::"])
def test_public_addresses_pass(address):
    assert refusal(address) is None


@pytest.mark.parametrize("host, kind", [
    ("localhost", "loopback"), ("api.localhost", "loopback"), ("LOCALHOST.", "loopback"),
    ("2130706433", "loopback"), ("0x7f.1", "loopback"), ("0177.0.0.1", "loopback"),
    ("[::1]", "loopback"), ("0.0.0.0", "unspecified"), ("169.254.169.254", "link-local"),
    ("[fec0::1]", "non-public (outside 2000::/3, the IPv6 global unicast range)"),
])
def test_host_refusal_without_dns(host, kind):
    assert host_refusal(host) == kind


def test_host_refusal_leaves_names_to_resolution():
    assert host_refusal("example.com") is None
    assert host_refusal("8.8.8.8") is None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/", "http://localhost:{port}/", "http://[::1]:{port}/",
    "http://0.0.0.0:{port}/", "http://[::ffff:127.0.0.1]:{port}/", "http://2130706433:{port}/",
    "http://0x7f.1:{port}/",
])
def test_client_refuses_loopback_forms_at_connect(recorder, url):
    async def go():
        async with new_client() as client:
            with pytest.raises(BlockedAddress) as caught:
                await client.post(url.format(port=recorder.port), content=b"x")
            return caught.value

    exc = asyncio.run(go())
    assert "allow_private_targets" in str(exc)
    assert recorder.requests == []


def test_client_reaches_loopback_when_private_targets_are_allowed(recorder):
    async def go():
        async with new_client(allow_private=True) as client:
            return await client.post(recorder.url(), content=b"hello")

    assert asyncio.run(go()).status_code == 200
    assert recorder.requests[0]["body"] == b"hello"


def test_rebinding_name_is_refused_when_it_turns_private(recorder):
    answers = iter([[PUBLIC], ["127.0.0.1"]])
    dns = fake_dns({"flip.test": lambda: next(answers)})
    dialer = Redial({PUBLIC: "127.0.0.1"})

    async def go():
        async with new_client(resolver=dns, dialer=dialer) as client:
            first = await client.post(recorder.url(host="flip.test"), content=b"1")
            with pytest.raises(BlockedAddress, match=r"flip\.test \(127\.0\.0\.1, loopback"):
                await client.post(recorder.url(host="flip.test"), content=b"2")
            return first

    assert asyncio.run(go()).status_code == 200
    assert dns.lookups == ["flip.test", "flip.test"]  # resolved at each connect
    assert dialer.dialled == [PUBLIC]  # the second connect never happened
    assert [r["body"] for r in recorder.requests] == [b"1"]


def test_connects_to_the_checked_address_and_keeps_the_name_as_host(recorder):
    dns = fake_dns({"hooks.example.test": [PUBLIC]})
    dialer = Redial({PUBLIC: "127.0.0.1"})

    async def go():
        async with new_client(resolver=dns, dialer=dialer) as client:
            return await client.post(recorder.url(host="hooks.example.test"), content=b"x")

    assert asyncio.run(go()).status_code == 200
    assert dialer.dialled == [PUBLIC]
    assert recorder.requests[0]["headers"]["host"] == f"hooks.example.test:{recorder.port}"


def test_a_name_with_any_private_address_is_refused():
    guard = Guard(resolver=fake_dns({"mixed.test": [PUBLIC, "10.1.2.3"]}))
    with pytest.raises(BlockedAddress, match=r"10\.1\.2\.3, private"):
        asyncio.run(guard.resolve("mixed.test", 443))


def test_guard_returns_addresses_of_a_public_name():
    guard = Guard(resolver=fake_dns({"ok.test": [PUBLIC, "2001:4860:4860::8888"]}))
    assert asyncio.run(guard.resolve("ok.test", 443)) == [PUBLIC, "2001:4860:4860::8888"]


def test_unresolvable_name_is_a_retryable_connect_error():
    async def go():
        async with new_client(resolver=fake_dns({})) as client:
            with pytest.raises(httpx.ConnectError) as caught:
                await client.get("http://nowhere.test/")
            return caught.value

    exc = asyncio.run(go())
    assert not isinstance(exc, BlockedAddress)
    assert "cannot resolve nowhere.test" in str(exc)
    assert error_outcome(exc).state == "retry"


def test_read_timeout_is_mapped_to_httpx(recorder):
    recorder.script = [(200, {}, b"late", 1.0)]

    async def go():
        async with new_client(allow_private=True, timeout=0.2) as client:
            with pytest.raises(httpx.ReadTimeout) as caught:
                await client.get(recorder.url())
            return caught.value

    outcome = error_outcome(asyncio.run(go()))
    assert outcome.state == "retry" and "timed out" in outcome.detail


def test_refusal_outcome_is_terminal():
    outcome = error_outcome(BlockedAddress("x.test", "10.0.0.1", "private"))
    assert outcome.state == "failed"
    assert "10.0.0.1" in outcome.detail and "allow_private_targets" in outcome.detail


def test_new_client_keeps_its_signature_for_other_destinations():
    async def go():
        client = new_client(allow_private=False, timeout=3.0)
        try:
            return client.timeout, client.follow_redirects, client.headers["user-agent"]
        finally:
            await client.aclose()

    timeout, follows, agent = asyncio.run(go())
    assert timeout.connect == 3.0 and follows is False and agent.startswith("trackpipe/")
