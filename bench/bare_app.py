"""The ceiling for bench/ingest.py: an ASGI app that reads the body, ignores it and
answers {"success":true}, served by the same stack and settings as `trackpipe serve`
(uvicorn, httptools, uvloop, one worker, access log off, and trackpipe's protocol
that writes each answer in one system call: trackpipe/sources/oneshot.py).

    python bench/bare_app.py --port 8081
    python bench/bare_app.py --port 8081 --stock   # uvicorn's own httptools protocol
"""

from __future__ import annotations

import argparse

import uvicorn

from trackpipe.sources.oneshot import OneWriteHttpToolsProtocol

SUCCESS = b'{"success":true}'
HEALTH = b'{"status":"ok"}'


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    while True:  # read the whole body, as trackpipe must
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body"):
            break
    body = HEALTH if scope["path"] == "/health" else SUCCESS
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--stock", action="store_true",
                        help="uvicorn's own httptools protocol (two writes per answer)")
    args = parser.parse_args()
    # Same uvicorn.Config as trackpipe/cli.py _serve, minus the app.
    uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, loop="uvloop",
        http="httptools" if args.stock else OneWriteHttpToolsProtocol, lifespan="on",
        access_log=False, log_level="warning", timeout_keep_alive=5,
        timeout_graceful_shutdown=10, proxy_headers=False)).run()


if __name__ == "__main__":
    main()
