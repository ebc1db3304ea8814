"""Conformance sink for the `webhook` kind: a local HTTP receiver that checks every request
the way a careful Standard Webhooks consumer does.

`verify` is written from the spec (standardwebhooks.com), not taken from
trackpipe, so the destination's signing is checked against an independent reading.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOLERANCE_SECONDS = 5 * 60


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (a timeout test) is not the sink's problem


class BadSignature(Exception):
    """The request would be rejected by a Standard Webhooks consumer."""


def verify(secret: str, headers, body: bytes, now: float | None = None) -> str:
    """Check webhook-id/-timestamp/-signature against `secret` ("whsec_<base64>"); return
    the webhook-id or raise BadSignature."""
    msg_id, stamp, signatures = (headers.get(h) for h in
                                 ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and signatures):
        raise BadSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    if abs((time.time() if now is None else now) - int(stamp)) > TOLERANCE_SECONDS:
        raise BadSignature(f"timestamp {stamp} is outside the {TOLERANCE_SECONDS} s tolerance")
    key = base64.b64decode(secret[len("whsec_"):] if secret.startswith("whsec_") else secret)
    signed = msg_id.encode() + b"." + stamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    for candidate in signatures.split(" "):
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return msg_id
    raise BadSignature("no v1 signature matches")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Sink:
    """Receives webhook deliveries on 127.0.0.1; synchronous and thread-safe."""

    def __init__(self, directory: Path):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.secret = new_secret()
        self._lock = threading.Lock()
        self._broken: str | None = None  # None | "retry" | "terminal"
        self._received: list[str] = []
        self._messages: list[dict] = []
        self._requests: list[tuple[str, list[str], int]] = []
        self.delay = 0.0  # seconds to wait, after recording a request, before answering it
        self._ids: dict[str, list[str]] = {}
        self._deletes: list[dict] = []
        self._errors: list[str] = []
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        # Polled every 50 ms, not 0.5 s: close() waits for the next poll.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def config(self, name: str) -> dict:
        return {"name": name, "type": "webhook",
                "settings": {"url": self.url, "secret": self.secret,
                             "allow_private_targets": True}}

    def received(self) -> list[str]:
        """messageIds of accepted deliveries, in arrival order, duplicates kept."""
        with self._lock:
            return list(self._received)

    def requests(self) -> list[tuple[str, list[str], int]]:
        """Every correctly signed request: (webhook-id, its messageIds, the status answered)."""
        with self._lock:
            return list(self._requests)

    def messages(self) -> list[dict]:
        """Every accepted event, whole, in arrival order."""
        with self._lock:
            return list(self._messages)

    def webhook_ids(self, message_id: str) -> list[str]:
        """The webhook-id of each accepted request that carried this messageId, in the
        order of received(): a duplicate delivery should repeat the id."""
        with self._lock:
            return list(self._ids.get(message_id, ()))

    def deletes(self) -> list[dict]:
        """Accepted privacy-delete notices ({"type": "delete", "userId": ...})."""
        with self._lock:
            return list(self._deletes)

    def errors(self) -> list[str]:
        """Why requests were rejected with 401 (bad or missing signature)."""
        with self._lock:
            return list(self._errors)

    def break_(self, terminal: bool = False) -> None:
        with self._lock:
            self._broken = "terminal" if terminal else "retry"

    def heal(self) -> None:
        with self._lock:
            self._broken = None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def handle(self, headers, body: bytes) -> tuple[int, bytes]:
        """What the receiver answers to one request."""
        try:
            webhook_id = verify(self.secret, headers, body)
            messages = _messages(json.loads(body))
        except (BadSignature, ValueError) as exc:
            with self._lock:
                self._errors.append(str(exc))
            return 401, json.dumps({"error": str(exc)}).encode()
        with self._lock:
            status = {None: 200, "terminal": 400, "retry": 503}[self._broken]
            self._requests.append((webhook_id, [m["messageId"] for m in messages
                                                if "messageId" in m], status))
            if self._broken:
                return (400, b'{"error": "broken for good"}') if self._broken == "terminal" \
                    else (503, b'{"error": "broken for now"}')
            for m in messages:
                if m.get("type") == "delete":
                    self._deletes.append(m)
                elif "messageId" in m:
                    self._received.append(m["messageId"])
                    self._messages.append(m)
                    self._ids.setdefault(m["messageId"], []).append(webhook_id)
        return 200, b'{"ok": true}'


def _messages(body) -> list[dict]:
    items = body["batch"] if isinstance(body, dict) and "batch" in body else [body]
    if not all(isinstance(m, dict) for m in items):
        raise ValueError("the body is neither a message nor {\"batch\": [message, ...]}")
    return items


def _handler(sink: Sink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            status, answer = sink.handle(self.headers, body)
            if sink.delay:
                time.sleep(sink.delay)
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_PUT = do_POST

        def log_message(self, format, *args) -> None:  # keep test output quiet
            pass

    return Handler


# -- test tools shared by test_webhook.py and test_netguard.py ---------------------------

class Recorder:
    """A local HTTP server that answers from a script and records every request.

    `script` items are (status, headers, body) or (status, headers, body, delay_seconds);
    once it runs out every request gets 200. Answers close the connection, so each
    request makes a fresh connect through the guard."""

    def __init__(self, script=()):
        self.script = list(script)
        self.max_body: int | None = None  # larger bodies get 413, as nginx's limit answers
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _recording_handler(self))
        # Polled every 50 ms, not 0.5 s: close() waits for the next poll.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def next_answer(self, request: dict):
        with self._lock:
            self.requests.append(request)
            if self.max_body is not None and len(request["body"]) > self.max_body:
                return 413, {}, b"<html><body>413 Request Entity Too Large</body></html>"
            return self.script.pop(0) if self.script else (200, {}, b'{"ok": true}')

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _recording_handler(recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            request = {"method": self.command, "path": self.path, "body": body,
                       "headers": {k.lower(): v for k, v in self.headers.items()}}
            status, headers, answer, *delay = recorder.next_answer(request)
            if delay:
                time.sleep(delay[0])
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(answer)))
            self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = do_PUT = _any

        def log_message(self, format, *args) -> None:
            pass

    return Handler


def fake_dns(table: dict):
    """A resolver for the guard: name -> list of addresses, or a callable giving one per
    lookup (a name that changes its answer, as in DNS rebinding). Records each lookup."""
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        if host not in table:
            raise OSError(f"{host}: name not known")
        answer = table[host]
        return answer() if callable(answer) else list(answer)

    resolve.lookups = lookups
    return resolve


class Redial:
    """A dialer that connects "public" test addresses to 127.0.0.1, so a name the guard
    sees as public can lead to a local server. Records the addresses it was asked for."""

    def __init__(self, public_to_local: dict[str, str] | None = None):
        import httpcore
        self._inner = httpcore.AnyIOBackend()
        self.map = public_to_local or {}
        self.dialled: list[str] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.dialled.append(host)
        return await self._inner.connect_tcp(self.map.get(host, host), port, timeout,
                                             local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
