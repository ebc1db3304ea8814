"""The SSRF guard: destinations may not reach private networks unless told they may.

A destination URL is user input, so a webhook could be pointed at the cloud
metadata service or an internal admin port. Checking the URL's name at save
time is not enough: the name can resolve to a public address then and to
127.0.0.1 later (DNS rebinding). So the guard sits where connections are made:
`GuardedBackend` resolves the name itself, checks every address, and connects
to the checked address, never resolving twice. TLS still verifies the name,
because httpcore takes the SNI name from the URL, not from the address dialled.

Tests inject `resolver` (name -> addresses) and `dialer` (the backend that
really connects), so they can make a public-looking name lead to a local server.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Awaitable, Callable, Iterable

import anyio
import httpcore
import httpx

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SETTING = "allow_private_targets"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
# Non-public space inside 2000::/3 that this Python's registry may not know yet.
_DOCUMENTATION_V6 = ipaddress.ip_network("3fff::/20")  # RFC 9637 (2024)
# IETF protocol assignments (RFC 6890), not globally reachable: Python 3.11 before the
# gh-113171 fix calls all of it global except 192.0.0.0/29 and 192.0.0.170/31.
_PROTOCOL_ASSIGNMENTS_V4 = ipaddress.ip_network("192.0.0.0/24")


class BlockedAddress(httpx.ConnectError):
    """A destination led to a private, loopback or otherwise non-public address."""

    def __init__(self, host: str, address: str, kind: str):
        super().__init__(
            f"Refused to connect to {host} ({address}, {kind}): destinations may only reach"
            f" public addresses. If this target is meant to be internal, set"
            f" {SETTING} = true in the destination's settings.")
        self.host, self.address, self.kind = host, address, kind


def refusal(address: str | IPAddress) -> str | None:
    """Why connecting to this address is refused (its kind), or None when it is public."""
    ip = ipaddress.ip_address(address.split("%")[0]) if isinstance(address, str) else address
    for kind, hit in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                      ("link-local", ip.is_link_local), ("multicast", ip.is_multicast)):
        if hit:
            return kind
    if isinstance(ip, ipaddress.IPv6Address):
        return _ipv6_refusal(ip)
    return _registry_refusal(ip)


def _ipv6_refusal(ip: ipaddress.IPv6Address) -> str | None:
    embedded = _embedded_ipv4(ip)
    if embedded is not None:  # the packet ends up at the IPv4 address, so judge that
        why = refusal(embedded)
        return f"{why}, embedded IPv4 {embedded}" if why else None
    if int(ip) >> 32 == 0:
        return "IPv4-compatible IPv6"
    why = _registry_refusal(ip)
    # An allow-list, because ipaddress calls some non-public space global (the
    # deprecated site-local fec0::/10): only global unicast is ever public.
    if why is None and ip not in _GLOBAL_UNICAST:
        return "non-public (outside 2000::/3, the IPv6 global unicast range)"
    if why is None and ip in _DOCUMENTATION_V6:
        return "non-public (documentation range 3fff::/20)"
    return why


def _registry_refusal(ip: IPAddress) -> str | None:
    """What the IANA special-purpose registries, as ipaddress knows them, say."""
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global or ip in _PROTOCOL_ASSIGNMENTS_V4:
        return "non-public (reserved or shared)"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def host_refusal(host: str) -> str | None:
    """What can be said about a URL host without DNS: literal addresses (including the
    decimal, octal and hex forms inet_aton accepts, like 2130706433) and *.localhost."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"
    try:
        return refusal(host)
    except ValueError:
        pass
    try:
        return refusal(socket.inet_ntoa(socket.inet_aton(host)))
    except OSError:
        return None  # a name: only resolving can tell


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Guard:
    """Resolves a host and refuses it when any of its addresses is not public."""

    def __init__(self, *, allow_private: bool = False, resolver: Resolver | None = None):
        self.allow_private = allow_private
        self._resolver = resolver or system_resolver

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to connect to; raises BlockedAddress, or OSError when the name
        does not resolve."""
        try:
            addresses = [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            addresses = await self._resolver(host, port)
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        if not self.allow_private:
            self._refuse_private(host, addresses)
        return addresses

    @staticmethod
    def _refuse_private(host: str, addresses: Iterable[str]) -> None:
        # Any private address refuses the name: a mix of public and private records is
        # exactly what a rebinding attack serves.
        for address in addresses:
            kind = refusal(address)
            if kind:
                raise BlockedAddress(host, address, kind)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the guard in front of every TCP connect."""

    def __init__(self, guard: Guard, dialer: httpcore.AsyncNetworkBackend | None = None):
        self.guard = guard
        self._dialer = dialer or httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None,
                          socket_options=None) -> httpcore.AsyncNetworkStream:
        addresses = await self._resolve(host, port, timeout)
        error: Exception | None = None
        for address in addresses:  # dial the checked address itself: no second lookup
            try:
                return await self._dialer.connect_tcp(address, port, timeout, local_address,
                                                      socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def _resolve(self, host: str, port: int, timeout: float | None) -> list[str]:
        try:
            with anyio.fail_after(timeout):
                return await self.guard.resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} took over {timeout} s") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("destinations connect over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._dialer.sleep(seconds)
