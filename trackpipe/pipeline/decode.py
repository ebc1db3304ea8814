"""Bytes -> one JSON object, refusing every input Python's parsers mishandle.

msgspec rejects NaN/Infinity, numbers that overflow (1e400, >4300-digit
integers), invalid UTF-8 and lone surrogates by itself; nesting is bounded
here (see too_deep) so a message can never exhaust the stack later.
"""

from __future__ import annotations

import zlib

import msgspec

from trackpipe.errors import RequestRejected

MAX_DEPTH = 64

_decoder = msgspec.json.Decoder()


def decode_object(body: bytes) -> dict:
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    try:
        obj = _decoder.decode(body)
    except msgspec.ValidationError as exc:  # numbers out of range
        raise RequestRejected("invalid_json", f"The body holds a number trackpipe cannot "
                              f"represent ({exc}). Send finite numbers within 64-bit range.") from None
    except RecursionError:
        raise RequestRejected("too_deep", f"The body nests deeper than {MAX_DEPTH} levels.") from None
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError covers UnicodeDecodeError
        raise RequestRejected("invalid_json", f"The body is not valid JSON: {exc}.") from None
    if type(obj) is not dict:
        raise RequestRejected("invalid_payload", "The body must be a JSON object, not "
                              f"{_json_kind(obj)}.")
    return obj


TOO_DEEP = f"A message nests deeper than {MAX_DEPTH} levels."


def check_depth(encoded: bytes, value) -> None:
    """Refuse a message nested deeper than MAX_DEPTH; cheap unless it has many brackets."""
    if _could_be_too_deep(encoded) and _depth(value, 0) > MAX_DEPTH:
        raise RequestRejected("too_deep", TOO_DEEP)


def too_deep(encoded: bytes) -> bool:
    """check_depth for an encoded message alone (the log writer has no decoded copy)."""
    return _could_be_too_deep(encoded) and _depth(_decoder.decode(encoded), 0) > MAX_DEPTH


def _could_be_too_deep(encoded: bytes) -> bool:
    return encoded.count(b"{") + encoded.count(b"[") > MAX_DEPTH


def _depth(value, level: int) -> int:
    if level > MAX_DEPTH:
        return level
    if type(value) is dict:
        children = value.values()
    elif type(value) is list:
        children = value
    else:
        return level
    deepest = level + 1
    for child in children:
        if type(child) is dict or type(child) is list:
            deepest = max(deepest, _depth(child, level + 1))
            if deepest > MAX_DEPTH:
                break
    return deepest


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Decompress gzip/deflate as a stream, stopping as soon as the output passes `limit`."""
    wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestRejected("bad_encoding", f"The body is not valid {encoding} data ({exc}).") from None
    if len(out) > limit:
        raise RequestRejected("payload_too_large", f"Exceed payload limit: the request body "
                              f"decompresses to more than {limit} bytes.")
    if not inflater.eof:
        raise RequestRejected("bad_encoding", f"The {encoding} stream is truncated.")
    if inflater.unused_data:
        raise RequestRejected("bad_encoding", f"There are bytes after the end of the {encoding} "
                              "stream; send one stream per request.")
    return out


def _json_kind(obj) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(obj), "null")
