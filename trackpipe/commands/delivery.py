"""`trackpipe destinations`, `trackpipe check` and `trackpipe replay`.

They work on the data dir and the config file directly, so they answer whether
or not the server is running; a replay is picked up by a running server within
a moment, or by the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from types import SimpleNamespace

from trackpipe.errors import ConfigError


def add_parsers(sub, data_dir_arg) -> None:
    dest = sub.add_parser("destinations", help="list destinations with delivered/pending/failed counts")
    data_dir_arg(dest)
    _config_arg(dest)
    dest.add_argument("--json", action="store_true",
                      help="print the counts as one JSON object (default: a table)")

    check = sub.add_parser("check", help="validate the config and run each destination's health check")
    data_dir_arg(check)
    _config_arg(check)

    replay = sub.add_parser(
        "replay", help="send stored events to a destination again",
        description="Queue stored events to be sent to a destination again; a running server"
                    " sends them within a second. With neither --since/--until nor"
                    " --failed-only, it re-sends every event in the log that the destination"
                    " has been sent so far.")
    replay.add_argument("--destination", required=True,
                        help="the destination's name in the config file; required")
    replay.add_argument("--since", help="ISO-8601 time or epoch ms (receivedAt), inclusive"
                                        " (default: from the log's oldest event)")
    replay.add_argument("--until", help="ISO-8601 time or epoch ms (receivedAt), exclusive"
                                        " (default: up to the last event sent to it so far)")
    replay.add_argument("--failed-only", action="store_true",
                        help="only events in the failed store (default: every event in range)")
    data_dir_arg(replay)
    _config_arg(replay)


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the TOML config file the server runs with, where the"
                                    " destinations are (default: none, so no destinations)")


def _no_config(command: str) -> ConfigError:
    """Destinations come only from a config file: without one these commands know none, and
    "0 destinations" would read as the server's state."""
    done = (" The built-in defaults and TRACKPIPE_* settings are valid."
            if command == "check" else "")
    return ConfigError(f"No --config was given, so `trackpipe {command}` knows no"
                       " destinations: they are read only from the config file, never from"
                       f" TRACKPIPE_* variables.{done} Pass the file the server runs with:"
                       " --config FILE.")


def run(args: argparse.Namespace, settings) -> int:
    from trackpipe.destinations import build

    build.validate(settings)  # the defaults and TRACKPIPE_* settings, with --config or not
    if args.config is None:
        if args.command != "check":
            raise _no_config(args.command)
        # Valid, with nothing to check: a deployment set up by TRACKPIPE_* alone may run
        # `check` as is, and must not fail for it.
        print(f"trackpipe: {_no_config(args.command)}", file=sys.stderr)
        return 0
    if args.command == "check":
        return _check(settings)
    with _state(settings) as p:
        if args.command == "destinations":
            return _list(p, settings, args.json)
        return _replay(p, settings, args)


class _state:
    def __init__(self, settings):
        from trackpipe.delivery.state import DeliveryState
        from trackpipe.log.sqlite import SQLiteLog

        data = settings.data_path  # holding a log: the CLI checked
        self.p = SimpleNamespace(log=SQLiteLog(data / "log.db", writable=False),
                                 deliveries=DeliveryState(data / "deliveries.db"))

    def __enter__(self):
        return self.p

    def __exit__(self, *exc):
        self.p.deliveries.close()
        self.p.log.close()


def _list(p, settings, as_json: bool) -> int:
    from trackpipe.admin.destinations import destination_summary

    rows = [destination_summary(p, d) for d in settings.destinations]
    if as_json:
        print(json.dumps({"destinations": rows}, indent=2))
        return 0
    if not rows:
        print("No destinations configured; add [[destinations]] tables to the config file.")
        return 0
    print(f"{'NAME':20} {'TYPE':10} {'STATE':11} {'DELIVERED':>10} {'PENDING':>8} "
          f"{'RETRYING':>8} {'FAILED':>7} {'OLDEST PENDING':>15}  LAST ERROR")
    for r in rows:
        oldest = r["oldest_pending_age_seconds"]
        age = "-" if oldest is None else f"{oldest:.0f}s"
        err = r["last_error"]  # kept after later successes: its time says how old it is
        err = f"{err['at']} {err['status']} {err['detail'][:60]}" if err else ""
        if r["stopped"]:
            err = f"STOPPED (410 Gone; restart once fixed): {err}"
        print(f"{r['name'][:20]:20} {r['type']:10} {_state_of(r):11} {r['delivered']:>10} "
              f"{r['pending']:>8} {r['retrying']:>8} {r['failed']:>7} {age:>15}  {err}")
    return 0


def _state_of(row: dict) -> str:
    if not row["enabled"]:
        return "disabled"
    if row["stopped"]:
        return "stopped"
    return "delivering" if row["started"] else "not started"


def _replay(p, settings, args) -> int:
    from trackpipe.admin.common import time_param
    from trackpipe.delivery.replay import ReplayRefused, replay

    cfg = next((d for d in settings.destinations if d.name == args.destination), None)
    if cfg is None:
        known = ", ".join(d.name for d in settings.destinations) or "none configured"
        raise ConfigError(f"No destination is named {args.destination!r} (known: {known}).")
    try:
        # `is not None`: an empty --since (an unset shell variable) is an invalid time,
        # not "from the beginning".
        times = {k: time_param({k: getattr(args, k)}, k) for k in ("since", "until")
                 if getattr(args, k) is not None}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        queued = replay(p.log, p.deliveries, cfg, failed_only=args.failed_only, **times,
                        given={"since": args.since, "until": args.until})
    except ReplayRefused as refused:
        raise ConfigError(refused.message) from None  # exit status 2, the message on stderr
    print(f"queued {queued} events for {cfg.name}")
    return 0


def _check(settings) -> int:
    print(f"config ok: {len(settings.destinations)} destination(s)")
    failures = asyncio.run(_check_all(settings))
    return 1 if failures else 0


async def _check_all(settings) -> int:
    from trackpipe.destinations.base import DestinationError
    from trackpipe.destinations.build import build_destination

    failures = 0
    for cfg in settings.destinations:
        dest = build_destination(cfg)
        try:
            await dest.start()
            what = await dest.check()
            print(f"  ok    {cfg.name} ({cfg.type}): {dest.scrub(what)}")
        except DestinationError as exc:  # its text may quote the tool, which may echo a secret
            failures += 1
            print(f"  FAIL  {cfg.name} ({cfg.type}): {dest.scrub(str(exc))}", file=sys.stderr)
        except Exception as exc:
            failures += 1
            print(f"  FAIL  {cfg.name} ({cfg.type}): {type(exc).__name__}:"
                  f" {dest.scrub(str(exc))}", file=sys.stderr)
        finally:
            try:
                await dest.close()
            except Exception:
                pass
    return failures
