"""The HTTP client every HTTP destination uses (webhook, Mixpanel, Amplitude, forwarding).

Every connection it opens goes through the SSRF guard (netguard.py). It is an
httpx client over our own small transport, because httpx's transport offers no
public way to plug in a network backend. It ignores proxy environment
variables (a proxy would resolve the name itself, past the guard) and does not
follow redirects; the webhook follows them itself, each hop through the guard.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Iterator

import httpcore
import httpx

from trackpipe import __version__
from trackpipe.destinations.base import Destination, Outcome, fail, retry
from trackpipe.destinations.netguard import BlockedAddress, Guard, GuardedBackend, Resolver

USER_AGENT = f"trackpipe/{__version__}"
RESPONSE_CAP = 64 * 1024  # bytes of an answer worth keeping: enough for any error message


def new_client(*, allow_private: bool = False, timeout: float = 10.0,
               resolver: Resolver | None = None,
               dialer: httpcore.AsyncNetworkBackend | None = None) -> httpx.AsyncClient:
    """A client that refuses non-public addresses unless `allow_private`. `resolver` and
    `dialer` replace DNS and the socket layer (tests)."""
    backend = GuardedBackend(Guard(allow_private=allow_private, resolver=resolver), dialer)
    return httpx.AsyncClient(transport=GuardedTransport(backend), timeout=timeout,
                             follow_redirects=False, trust_env=False,
                             headers={"user-agent": USER_AGENT})


def error_outcome(exc: Exception, url: object = None) -> Outcome:
    """What a request (to `url`, named in the detail when given) that raised means for
    delivery: an SSRF refusal or a bad URL stays failed, as no retry can change it;
    connection problems and timeouts are worth retrying."""
    where = "" if url is None else f"cannot reach {url}: "
    if isinstance(exc, (BlockedAddress, httpx.InvalidURL, httpx.UnsupportedProtocol)):
        return fail(None, f"{where}{exc}")
    if isinstance(exc, httpx.TimeoutException):
        return retry(None, f"{where}timed out ({type(exc).__name__}): {exc}")
    return retry(None, f"{where}{type(exc).__name__}: {exc}")


async def read_capped(response: httpx.Response, cap: int = RESPONSE_CAP) -> bytes:
    """The start of a streamed response's body; the rest is never read into memory."""
    chunks, size = [], 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= cap:
            break
    return b"".join(chunks)[:cap]


class GuardedTransport(httpx.AsyncBaseTransport):
    """httpx's default transport, minus proxies, over a guarded httpcore pool."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend):
        self._pool = httpcore.AsyncConnectionPool(network_backend=backend, max_connections=100,
                                                  max_keepalive_connections=20)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions)
        with _httpx_errors():
            answer = await self._pool.handle_async_request(core)
        return httpx.Response(status_code=answer.status, headers=answer.headers,
                              stream=_Body(answer.stream), extensions=answer.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream):
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        with _httpx_errors():
            await self._stream.aclose()


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """httpcore's exceptions as httpx's namesakes, so callers catch one family."""
    try:
        yield
    except Exception as exc:
        mapped = getattr(httpx, type(exc).__name__, None)
        if not (type(exc).__module__.startswith("httpcore") and isinstance(mapped, type)
                and issubclass(mapped, httpx.TransportError)):
            raise
        raise mapped(str(exc)) from exc


class HttpDestination(Destination):
    """A destination that talks to one HTTP API through a guarded client, opened at start.
    Its Settings carry `allow_private_targets` and `timeout_seconds`."""

    _client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = new_client(allow_private=self.settings.allow_private_targets,
                                  timeout=self.settings.timeout_seconds)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
