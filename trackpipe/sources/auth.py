"""Finding the write key of a request, in the order the SDKs need.

(1) Basic username (with or without the colon); (2) Bearer value when it is a
known write key (cio-python sends `Bearer sk_us_...`); (3) body `writeKey`;
(4) the first batch item's `writeKey`. A Bearer that is not a write key is a
Segment OAuth token, which comes with a body writeKey.
"""

from __future__ import annotations

import binascii
from base64 import b64decode

from trackpipe.errors import RequestRejected
from trackpipe.sources.catalog import Source


class SourceRegistry:
    def __init__(self, sources: list[Source]):
        self.replace(sources)

    def replace(self, sources: list[Source]) -> None:
        self.by_key = {s.write_key: s for s in sources}
        self.by_id = {s.id: s for s in sources}
        self._basic: dict[bytes, str] = {}  # Authorization header -> its Basic username

    def resolve(self, authorization: bytes | None, body: dict) -> Source:
        key = self._candidate(authorization, body)
        if not key:
            raise RequestRejected("missing_write_key", "No write key: send it as the Basic auth "
                                  "username (`<writeKey>:`) or as `writeKey` in the body.")
        source = self.by_key.get(key)
        if source is None or not source.enabled:
            state = "is disabled" if source else "is not registered"
            raise RequestRejected("invalid_write_key", f"The write key {state}; see "
                                  "`trackpipe sources list`.")
        return source

    def _candidate(self, authorization: bytes | None, body: dict) -> str | None:
        if authorization:
            scheme, _, value = authorization.strip().partition(b" ")
            scheme = scheme.lower()
            value = value.strip()
            if scheme == b"basic":
                username = self._basic.get(authorization)
                if username is None:
                    try:
                        username = b64decode(value, validate=True).decode().partition(":")[0]
                    except (binascii.Error, UnicodeDecodeError):
                        username = ""
                    if username in self.by_key and len(self._basic) < 10_000:
                        self._basic[authorization] = username  # only known keys: bounded
                if username:
                    return username
            elif scheme == b"bearer":
                token = value.decode("latin-1")
                if token in self.by_key:
                    return token
        key = body.get("writeKey")
        if type(key) is str and key:
            return key
        batch = body.get("batch")
        if type(batch) is list and batch and type(batch[0]) is dict:
            key = batch[0].get("writeKey")
            if type(key) is str and key:
                return key
        return None
