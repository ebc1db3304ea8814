"""`trackpipe profile ID` and `trackpipe privacy suppress|unsuppress|delete ID`.

Both talk to a running server's admin API, like `trackpipe events`: the server
owns the profile store and the suppression list it checks at ingest.
"""

from __future__ import annotations

import argparse
import json
import sys
from urllib.parse import quote

import httpx

from trackpipe.commands import admin_api
from trackpipe.commands.terminal import printable


def add_parsers(sub) -> None:
    profile = sub.add_parser("profile", help="print a person: profile, timeline and merges")
    profile.add_argument("id", help="a profile id, userId or anonymousId")
    profile.add_argument("--events", type=int, default=50,
                         help="timeline events to show, at most 1000 (default %(default)s)")
    profile.add_argument("--json", action="store_true",
                         help="print one JSON object: profile, events, merges (default: text)")
    admin_api.add_server_args(profile)

    privacy = sub.add_parser("privacy", help="suppress, unsuppress or delete a person")
    privacy.add_argument("action", choices=("suppress", "unsuppress", "delete"),
                         help="suppress: drop the person's new events; unsuppress: accept them"
                              " again; delete: erase their events and profile, and drop new"
                              " ones")
    privacy.add_argument("id", help="a profile id, userId or anonymousId")
    admin_api.add_server_args(privacy)


def run(args: argparse.Namespace) -> int:
    work = _profile if args.command == "profile" else _privacy
    return admin_api.run(args.url, args.admin_token, 60, lambda client: work(client, args))


def _failed(r: httpx.Response) -> bool:
    if r.status_code < 300:
        return False
    try:  # a message may quote the id the operator passed, or a client sent: escaped
        body = r.json()
        print(printable(f"trackpipe: {body['message']} ({body['code']})"), file=sys.stderr)
    except (ValueError, KeyError, TypeError):
        print(printable(f"trackpipe: {r.status_code} {r.text[:500]}"), file=sys.stderr)
    return True


def _segment(text: str) -> str:
    """`text` as one path segment. "." and ".." are escaped too: URL parsers (httpx's
    among them) otherwise resolve them as "this" and "the parent" directory."""
    segment = quote(text, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


def _profile(client: httpx.Client, args) -> int:
    path = f"/api/v1/profiles/{_segment(args.id)}"
    r = client.get(path)
    if _failed(r):
        return 1
    person = r.json()
    events = client.get(f"{path}/events", params={"limit": max(1, min(args.events, 1000))})
    merges = client.get(f"{path}/merges")
    if _failed(events) or _failed(merges):
        return 1
    timeline, history = events.json()["events"], merges.json()["merges"]
    if args.json:
        print(json.dumps({"profile": person, "events": timeline, "merges": history}))
        return 0
    _print_profile(person, timeline, history, more=events.json()["next"] is not None,
                   elsewhere=events.json().get("other_nodes") or [])
    return 0


def _print_profile(person: dict, timeline: list, history: list, more: bool,
                   elsewhere: list = ()) -> None:
    # Ids, names and timestamps come from clients: every line goes out through `printable`,
    # so that none can drive the operator's terminal.
    def line(text: str = "") -> None:
        print(printable(text))

    line(f"Profile {person['profile_id']}")
    line(f"  userIds:       {', '.join(person['user_ids']) or '-'}")
    line(f"  anonymousIds:  {', '.join(person['anonymous_ids']) or '-'}")
    others = [f"{i['type']}={i['value']}" for i in person.get("identifiers", ())
              if i["type"] not in ("user_id", "anonymous_id")]
    if others:
        line(f"  other ids:     {', '.join(others)}")
    line(f"  first seen:    {person.get('first_seen') or '-'}")
    line(f"  last seen:     {person.get('last_seen') or '-'}")
    if person.get("traits"):
        line("  traits:        " + json.dumps(person["traits"], sort_keys=True))
    for group in person.get("groups", ()):
        line(f"  group:         {group['group_id']} {json.dumps(group.get('traits') or {})}")
    counts = person.get("event_counts") or {}
    if counts:
        line("  events:        " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    line()
    line(f"Timeline ({len(timeline)} events{', more with --events N' if more else ''})")
    for ev in timeline:
        label = ev.get("event") or ev.get("name") or ev.get("groupId") or ev.get("previousId") or ""
        who = ev.get("userId") or f"anon {ev.get('anonymousId', '')}"
        line(f"  {ev.get('timestamp', ''):25} {ev['type']:9} {printable(label)[:28]:28} {who}")
    for other in elsewhere:  # nodes sharing the identity store, each with a log of its own
        line(f"  (and {other['events']} in the log of node {other['node']}: ask that node)")
    line()
    line(f"Merges ({len(history)})")
    for m in history:
        line(f"  {m['id']:6} {m['at']:25} {m['kind']:8} {m.get('rule') or '':24}"
             f" {json.dumps(m.get('edge'))} message {m.get('message_id')}")


def _privacy(client: httpx.Client, args) -> int:
    r = client.post(f"/api/v1/privacy/{args.action}", json={"id": args.id})
    if _failed(r):
        return 1
    body = r.json()
    if args.action == "delete" and body.get("state") == "queued":
        print(f"Delete request {body['request_id']} is queued; it completes in the background"
              " (GET /api/v1/privacy/audit shows when).")
    elif args.action == "delete":
        print(f"Deleted: {body['events']} events, {body['profiles']} profile(s),"
              f" {body['deliveries_cancelled']} queued deliveries cancelled,"
              f" {body['destinations_notified']} destination(s) notified. New events for"
              " this person are dropped (unsuppress to allow them again).")
        if body.get("other_nodes"):
            print(f"{body['other_nodes']} other node(s) sharing the identity store erase the"
                  " person from their own logs when their consumers next run.")
    elif args.action == "suppress":
        print(f"Suppressed {body['suppressed']} identifier(s): their new events are answered"
              " 200 and dropped.")
    else:
        print(f"Unsuppressed {body['unsuppressed']} identifier(s).")
    return 0
