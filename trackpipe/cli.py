"""The `trackpipe` command: serve, sources, send, events; destinations, check, replay
(commands/delivery.py); profile and privacy (commands/people.py)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sqlite3
import sys
import time
import uuid

from trackpipe import config, data_format
from trackpipe.commands.terminal import printable
from trackpipe.errors import ConfigError, StartFailed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trackpipe", description="trackpipe: a self-hosted customer data pipeline that speaks the Segment tracking API.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the collector")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, or [server]"
                                      " host in the config file)")
    serve.add_argument("--port", type=_port, help="TCP port to listen on (default 8080, or"
                                                  " [server] port in the config file)")
    _data_dir_arg(serve)
    serve.add_argument("--config", help="TOML settings file (default: none; the built-in"
                                        " defaults and TRACKPIPE_* variables apply)")

    sources = sub.add_parser("sources", help="register, list, disable and enable sources"
                             " (write keys)")
    ssub = sources.add_subparsers(dest="action", required=True)
    add = ssub.add_parser("add", help="register a source and print its write key")
    add.add_argument("name", help="the new source's name (unique)")
    add.add_argument("--write-key", help="the write key to accept (default: a random one)")
    add.add_argument("--strict", action="store_true", help="reject requests with invalid events"
                                                           " (default: store the valid ones)")
    _data_dir_arg(add)
    _sources_config_arg(add)
    ls = ssub.add_parser("list", help="list sources")
    _data_dir_arg(ls)
    _sources_config_arg(ls)
    for action, what in (("disable", "refuse its write key (401), e.g. a leaked one"),
                         ("enable", "accept its write key again")):
        toggle = ssub.add_parser(action, help=f"{action} a source: {what}")
        toggle.add_argument("name", help="the source's name (`trackpipe sources list`)")
        _data_dir_arg(toggle)
        _sources_config_arg(toggle)

    _add_send_parser(sub)
    _add_events_parser(sub)
    from trackpipe.commands import delivery, people
    delivery.add_parsers(sub, _data_dir_arg)
    people.add_parsers(sub)

    args = parser.parse_args(argv)
    try:
        status = _dispatch(args)
        sys.stdout.flush()  # here, so that a closed pipe is noticed below, not at exit
        return status
    except ConfigError as exc:
        print(f"trackpipe: {exc}", file=sys.stderr)
        return 2
    except StartFailed as exc:  # a data dir it must not open (written by a newer version)
        print(f"trackpipe: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`trackpipe events --follow | head -1`): stop quietly, as
        # `yes | head -1` does. stdout goes to /dev/null so the interpreter's final flush
        # cannot fail again; 141 (128 + SIGPIPE) is the status a shell reports for such a
        # tool, so `set -o pipefail` scripts see what they see for coreutils.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _add_send_parser(sub) -> None:
    send = sub.add_parser("send", help="send a test track call over HTTP")
    send.add_argument("--write-key", required=True,
                      help="a source's write key (`trackpipe sources list`); required")
    send.add_argument("--url", default="http://127.0.0.1:8080",
                      help="the running server's URL (default %(default)s)")
    send.add_argument("--event", default="Test Event",
                      help="the track event's name (default '%(default)s')")
    send.add_argument("--user-id", default="test-user",
                      help="the event's userId (default %(default)s)")
    send.add_argument("--properties", default="{}",
                      help="the event's properties, a JSON object (default %(default)s)")


def _add_events_parser(sub) -> None:
    from trackpipe.commands import admin_api

    events = sub.add_parser("events", help="print stored events",
                            description="Print the newest stored events that match the"
                                        " filters, oldest first, from a running server.")
    admin_api.add_server_args(events)
    events.add_argument("--follow", "-f", action="store_true",
                        help="after the listing, print new matching events as they are stored,"
                             " until interrupted")
    events.add_argument("--json", action="store_true",
                        help="NDJSON, one message per line (default: a table)")
    events.add_argument("--limit", type=int, default=20,
                        help="how many of the newest matching events to list, shown oldest"
                             " first (default %(default)s)")
    events.add_argument("--type", help="only messages of this type (track, identify, page,"
                                       " screen, group, alias)")
    events.add_argument("--event", help="only track events of this name")
    events.add_argument("--user-id", help="only messages with this userId")


def _dispatch(args) -> int:
    from trackpipe.commands import delivery, people

    if args.command in ("destinations", "check", "replay"):
        settings = _settings(args)
        if args.command != "check":  # the only one of them that leaves the data dir alone
            _open_data_dir(settings.data_path)
            if not (settings.data_path / "log.db").exists():  # nothing to list or replay
                raise _no_data_dir(settings.data_path)
        return delivery.run(args, settings)
    if args.command in ("profile", "privacy"):
        return people.run(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "sources":
        return _sources(args)
    if args.command == "send":
        return _send(args)
    return _events(args)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where trackpipe keeps its data (default:"
                                      " TRACKPIPE_DATA_DIR, else the config file's data_dir,"
                                      " else ./trackpipe-data)")


def _sources_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML settings file; only its data_dir is used here"
                                    " (default: none)")


def _settings(args) -> config.Settings:
    settings = config.load(getattr(args, "config", None))
    if getattr(args, "data_dir", None):
        settings.data_dir = args.data_dir
    if getattr(args, "host", None):
        settings.server.host = args.host
    if getattr(args, "port", None):
        settings.server.port = args.port
    return settings


def _no_data_dir(data) -> ConfigError:
    """For a --data-dir no server has run in: a typo, another working dir, or one that only
    `trackpipe sources add` has written to."""
    if (data / "catalog.db").exists():
        return ConfigError(f"The trackpipe data dir at {data.resolve()} holds no events yet:"
                           " no server has run on it. Start `trackpipe serve` on it first, or"
                           " pass the --data-dir the server uses.")
    return ConfigError(f"There is no trackpipe data dir at {data.resolve()}: pass the"
                       " --data-dir the server uses (`trackpipe serve` prints it at start).")


def _open_data_dir(data) -> None:
    """Refuse a data dir a newer trackpipe wrote, and mark one of an older, before its files
    are opened (they migrate then). A dir holding no log is not marked: the command says
    so, and the dir may be no trackpipe's."""
    data_format.refuse_newer(data)
    if (data / "log.db").exists():
        data_format.mark(data)


def _serve(args) -> int:
    import uvicorn

    from trackpipe.app import Pipeline, create_app
    from trackpipe.gc_tuning import tune_gc
    from trackpipe.logs import setup_logging
    from trackpipe.sources.catalog import new_admin_token
    from trackpipe.sources.oneshot import OneWriteHttpToolsProtocol

    _Server = _uvicorn_server()
    settings = _settings(args)
    # The log writer gives up the GIL for every SQLite call and must get it back
    # while the event loop parses; with the default 5 ms switch interval each
    # hand-back can stall a commit that long (measured: 42k -> 118k rows/s at 1 ms).
    sys.setswitchinterval(float(os.environ.get("TRACKPIPE_SWITCH_INTERVAL", "0.001")))
    tune_gc()
    setup_logging()
    try:
        pipeline = Pipeline(settings)
    except (sqlite3.Error, OSError, StartFailed) as exc:  # a damaged file, a full disk
        print(f"trackpipe: cannot start on the data in {settings.data_path.resolve()}:"
              f" {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    host, port = settings.server.host, settings.server.port
    # An IPv6 literal goes in brackets (RFC 3986), or curl and the SDKs take its colons
    # for a port.
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    problem = _cannot_listen(host, port)
    if problem:  # before anything says "listening"
        pipeline.close()
        remedy = ("choose another port with --port, or `[server] port` in the config file"
                  if problem.errno == errno.EADDRINUSE else
                  "check --host, or `[server] host` in the config file")
        print(f"trackpipe: cannot listen on {url}: {problem.strerror or problem}; {remedy}.",
              file=sys.stderr)
        return 3  # what uvicorn exits with when its own bind fails
    if not pipeline.registry.by_key:
        source = pipeline.catalog.add_source("default")
        pipeline.reload_catalog(force=True)
        print(f"Created source 'default' with write key: {source.write_key}")
    if pipeline.admin_token_hash is None:
        token = new_admin_token()
        pipeline.catalog.set_admin_token(token)
        pipeline.reload_catalog(force=True)
        print(f"Admin token (shown once; keep it): {token}")
        # The environment, not --admin-token: a flag shows in `ps` to other local users.
        print("Admin commands read it from the environment:"
              " export TRACKPIPE_ADMIN_TOKEN=<that token>")
    enabled = [k for k, source in pipeline.registry.by_key.items() if source.enabled]
    print(f"trackpipe listening on {url}  (data in {settings.data_path.resolve()})")
    if enabled:
        print("Point your SDK's host option at that URL, or try:")
        target = f"'{url}/v1/track'" if "[" in url else f"{url}/v1/track"  # [ ] glob in zsh
        print(f"  curl -u '{enabled[0]}:' -H 'Content-Type: application/json' "
              f"-d '{{\"userId\":\"u1\",\"event\":\"Hello\"}}' {target}", flush=True)
    else:
        print("Every source is disabled: `trackpipe sources enable NAME` or `sources add NAME`"
              " gives events a way in.", flush=True)
    srv = settings.server
    protocol = OneWriteHttpToolsProtocol.configured(  # deadlines and limits: see oneshot.py
        header_seconds=srv.header_timeout_seconds, body_seconds=srv.body_timeout_seconds,
        max_header_bytes=srv.max_header_bytes)
    server = _Server(uvicorn.Config(
        create_app(pipeline), host=settings.server.host, port=settings.server.port,
        loop="uvloop", http=protocol, lifespan="on", access_log=False,
        ws="none",  # no WebSocket routes: an upgrade request is answered as any other
        log_level="warning",
        proxy_headers=False,  # X-Forwarded-For is trusted only via server.trusted_proxies
        limit_concurrency=srv.connection_limit(),  # counted in connections by the protocol
        timeout_keep_alive=srv.idle_timeout_seconds,  # also the wait for a first request
        timeout_graceful_shutdown=10))
    try:
        server.run()
    finally:
        pipeline.close()
    return 0


def _cannot_listen(host: str, port: int) -> OSError | None:
    """Why uvicorn would fail to listen on host:port, or None. A probe bind, made the way
    asyncio's create_server binds (SO_REUSEADDR, IPv6-only sockets), then closed."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:  # socket.gaierror too: a host that does not resolve
        return exc
    return None


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its shutdown, which would kill the
            # process before the log and index are closed; SIGTERM is a clean stop.
            self._captured_signals.clear()

    return Server


def _sources(args) -> int:
    from trackpipe.sources.catalog import Catalog

    data = _settings(args).data_path
    if data.exists() and not data.is_dir():
        config.make_data_dir(data)  # says it is a file
    ours = (data / "catalog.db").exists() or (data / "log.db").exists()
    if args.action != "add" and not ours:  # a typo'd --data-dir: make and change nothing
        raise _no_data_dir(data)
    if not ours and data.is_dir() and any(data.iterdir()):  # `--data-dir ~`: not made 0700
        raise ConfigError(f"{data.resolve()} holds other files and no trackpipe data: pass the"
                          " --data-dir the server uses, or a new or empty dir.")
    data_format.refuse_newer(data)  # before anything there is made or changed
    config.make_data_dir(data)  # as the catalog would: `sources add` may come before serve
    config.make_private(data)
    data_format.mark(data)
    if args.action != "list" and not (data / "log.db").exists():
        # Not refused (sources may be added before the first serve), but said: a server
        # running on another data dir never sees this change.
        print(f"trackpipe: note: no trackpipe has run in {data.resolve()} yet; a server"
              " using another --data-dir will not see this change.", file=sys.stderr)
    catalog = Catalog(data)
    try:
        if args.action == "add":
            return _add_source(catalog, args)
        if args.action in ("disable", "enable"):
            return _set_enabled(catalog, args.name, args.action == "enable", data)
        _list_sources(catalog)
        return 0
    finally:
        catalog.close()


def _add_source(catalog, args) -> int:
    try:
        source = catalog.add_source(args.name, args.write_key, args.strict)
    except ValueError as exc:
        print(f"trackpipe: {exc}", file=sys.stderr)
        return 1
    print(source.write_key)
    return 0


def _set_enabled(catalog, name: str, enabled: bool, data) -> int:
    """A running server reloads the catalog within a second: a disabled source's write key
    is then answered 401 invalid_write_key (the way to revoke a leaked key)."""
    if not catalog.set_enabled(name, enabled):
        known = ", ".join(repr(s.name) for s in catalog.sources()) or "none yet"
        raise ConfigError(f"There is no source named {name!r} in {data.resolve()}; the"
                          f" sources there: {known}.")
    if enabled:
        print(f"Enabled source {name!r}: its write key is accepted again.")
    else:
        print(f"Disabled source {name!r}: its write key is refused (401) within a second.")
    return 0


def _list_sources(catalog) -> None:
    print(f"{'NAME':20} {'ID':22} {'ENABLED':8} {'STRICT':7} WRITE KEY")
    for s in catalog.sources():
        print(f"{s.name:20} {s.id:22} {str(s.enabled):8} {str(s.strict):7} {s.write_key}")


def _send(args) -> int:
    import httpx

    try:
        properties = json.loads(args.properties)
    except json.JSONDecodeError as exc:
        print(f"trackpipe: --properties is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(properties, dict):
        print(f"trackpipe: --properties must be a JSON object such as '{{\"plan\": \"pro\"}}',"
              f" not {args.properties!r}", file=sys.stderr)
        return 2
    message_id = f"cli-{uuid.uuid4()}"
    body = {"userId": args.user_id, "event": args.event, "properties": properties,
            "messageId": message_id}
    try:
        # Strict mode: an event the server would store nothing of is answered 400 with the
        # reasons, instead of the 200 that keeps SDKs from retrying it.
        r = httpx.post(f"{args.url.rstrip('/')}/v1/track", json=body, auth=(args.write_key, ""),
                       headers={"X-Strict-Mode": "1"}, timeout=10)
    except httpx.InvalidURL as exc:
        print(f"trackpipe: --url {args.url!r} is not a valid URL: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"trackpipe: could not reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(f"{r.status_code} {r.text}")
    if r.status_code == 200:
        print(f"messageId {message_id}")
        return 0
    for reason in _rejections(r):
        print(f"trackpipe: the event was not stored: {reason}", file=sys.stderr)
    return 1


def _rejections(r) -> list[str]:
    """The reasons in an error answer: each invalid event's in strict mode, else the one."""
    try:
        body = r.json()
        errors = body.get("errors") or [body]
        return [f"{e['message']} ({e['code']})" for e in errors]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


def _events(args) -> int:
    from trackpipe.commands import admin_api

    params = {k: v for k, v in (("type", args.type), ("event", args.event),
                                ("user_id", args.user_id)) if v}

    def work(client) -> int:
        # --follow reads the log's head first: the listing ends there and following starts
        # there, so an event stored in between is shown once, neither skipped nor repeated.
        head = int(client.get("/ready").json()["head"]) if args.follow else None
        shown = _newest(client, params, args.limit, head)
        if shown is None:
            return 1
        if not args.json:
            print(f"{'RECEIVED AT':25} {'TYPE':9} {'EVENT / NAME':24} {'USER':20} MESSAGE ID")
        for ev in shown:
            _print_event(ev, args.json)
        if not args.follow:
            return 0
        cursor = head
        while True:
            r = client.get("/api/v1/events", params={**params, "order": "asc",
                                                     "cursor": cursor, "limit": 1000})
            page = r.json()
            for ev in page["events"]:
                _print_event(ev, args.json)
            cursor = page["next"] if page["next"] is not None else page["scanned"]
            if page["next"] is None:
                time.sleep(0.5)  # caught up: poll again shortly

    return admin_api.run(args.url, args.admin_token, 10, work)


def _newest(client, params: dict, limit: int, head: int | None) -> list[dict] | None:
    """The newest `limit` matching events (at or below `head` when given), oldest first,
    or None after printing the API's error. One call scans a window of the log and may
    answer no events and a `next` cursor when the matches lie further back, so pages are
    followed until `limit` events are found or `next` is null."""
    found: list[dict] = []
    cursor = None if head is None else head + 1  # newest first, `cursor` is exclusive
    while True:
        page_params = {**params, "limit": limit - len(found)}
        if cursor is not None:
            page_params["cursor"] = cursor
        r = client.get("/api/v1/events", params=page_params)
        if r.status_code != 200:
            print(printable(f"trackpipe: {r.status_code} {r.text}"), file=sys.stderr)
            return None
        page = r.json()
        found += page["events"]
        cursor = page["next"]
        if cursor is None or len(found) >= limit:
            return found[::-1]


def _print_event(ev: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(ev), flush=True)
        return
    label = ev.get("event") or ev.get("name") or ev.get("groupId") or ev.get("previousId") or ""
    user = ev.get("userId") or ev.get("anonymousId") or ""
    # Names, ids and users come from clients: escaped, so they cannot drive the terminal.
    print(f"{ev.get('receivedAt', ''):25} {ev['type']:9} {printable(label)[:24]:24}"
          f" {printable(user)[:20]:20} {printable(ev.get('messageId', ''))}", flush=True)
