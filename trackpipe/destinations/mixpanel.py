"""The mixpanel destination: events through the Import API, profiles through Engage.

- track, page, screen → an event on POST /import?strict=1. Pages are named as
  Segment names them: "Viewed <name> Page" for a named page, else "Loaded a Page"
  (screens likewise with "Screen").
- identify → a profile `$set` on POST /engage; when it carries both userId and
  anonymousId, also an `$identify` event, so the anonymous history joins the user.
- group, when `group_key` is set (Group Analytics) → a group profile `$set` on
  POST /groups, and the group id `$union`ed into the user's profile under the group
  key on POST /engage; events whose `context.groupId` is set carry the group key
  as a property, which is how Mixpanel attributes them to the group.
- alias, and group without `group_key`, are not sent (delivered with a "not sent"
  detail): Simplified ID Merge links ids through `$user_id`/`$device_id` on events,
  and group profiles need a group key set up in the project.

Identity follows Mixpanel's Simplified ID Merge: `distinct_id` is the userId, or
`$device:<anonymousId>` before one is known; `$user_id` and `$device_id` carry
both. `revenue` and `currency` stay event properties (Mixpanel reports on any
numeric property). `$insert_id` is the messageId when it fits Mixpanel's rule
(at most 36 letters, digits or dashes), else the first 36 hex digits of its
SHA-256; `trackpipe_message_id` always carries the messageId itself.

Import auth: the project token as the Basic username (the default), or a service
account (username, secret and project_id).
"""

from __future__ import annotations

import gzip
import hashlib
import re
from typing import Any, Sequence

import httpx
import msgspec

from trackpipe.destinations.base import DELIVERED, DestinationError, Event, Outcome
from trackpipe.destinations.base import basic_authorization
from trackpipe.destinations.base import classify_http, event_time, excerpt, fail, retry
from trackpipe.destinations.forward import check_api_url, chunk_by_size, event_name, odd_field
from trackpipe.destinations.forward import unknown_type, worst
from trackpipe.destinations.httpclient import HttpDestination, error_outcome

IMPORT_MAX_EVENTS = 2000
IMPORT_MAX_BYTES = 2 * 1000 * 1000  # Mixpanel's docs have said 2 MB and 10 MB: keep the lower
ENGAGE_MAX_UPDATES = 50             # Engage's limit in its older docs; within the newer one
GROUPS_MAX_UPDATES = 2000           # the Groups API's limits: updates per request ...
GROUP_UPDATE_MAX_BYTES = 1000 * 1000  # ... and bytes per update (1 MB)
INSERT_ID = re.compile(r"[A-Za-z0-9-]{1,36}")

CONTEXT_PROPERTIES = {  # Mixpanel default property ← context path
    "ip": ("ip",), "$current_url": ("page", "url"), "$referrer": ("page", "referrer"),
    "$os": ("os", "name"), "$app_version_string": ("app", "version"),
    "$manufacturer": ("device", "manufacturer"), "$model": ("device", "model"),
    "$screen_width": ("screen", "width"), "$screen_height": ("screen", "height"),
    "utm_source": ("campaign", "source"), "utm_medium": ("campaign", "medium"),
    "utm_campaign": ("campaign", "name"), "utm_term": ("campaign", "term"),
    "utm_content": ("campaign", "content"),
}
PROFILE_TRAITS = {  # Segment reserved trait → Mixpanel reserved profile property
    "email": "$email", "name": "$name", "firstName": "$first_name", "first_name": "$first_name",
    "lastName": "$last_name", "last_name": "$last_name", "phone": "$phone", "avatar": "$avatar",
    "createdAt": "$created", "created_at": "$created", "username": "$username",
}
NOT_SENT = {
    "group": "not sent: Mixpanel group profiles need a group key; group calls are skipped"
             " (set group_key to send them)",
    "alias": "not sent: with Simplified ID Merge, Mixpanel links ids through $user_id and"
             " $device_id on events; alias calls are skipped",
}


class Mixpanel(HttpDestination):
    kind = "mixpanel"
    default_batch_size = 500
    secret_fields = ("project_token", "service_account_secret")

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        project_token: str
        """The project token (Project Settings → Access Keys)."""
        service_account_username: str = ""
        """Import with a service account instead of the token (needs secret and project_id)."""
        service_account_secret: str = ""
        project_id: str = ""
        api_url: str = "https://api.mixpanel.com"
        """https://api-eu.mixpanel.com or https://api-in.mixpanel.com for EU / India residency."""
        gzip: bool = False
        """Compress Import requests (Engage does not accept gzip)."""
        group_key: str | None = None
        """The Group Analytics key group calls go to (e.g. "company_id"), as set up in
        Project Settings → Group Keys; unset, group calls are not sent."""
        allow_private_targets: bool = False
        timeout_seconds: float = 15.0

        def __post_init__(self) -> None:
            if not self.project_token.strip():
                raise ValueError("project_token is empty; copy it from Mixpanel's Project"
                                 " Settings → Access Keys")
            if bool(self.service_account_username) != bool(self.service_account_secret):
                raise ValueError("set both service_account_username and service_account_secret,"
                                 " or neither (to import with the project token)")
            if self.service_account_username and not self.project_id:
                raise ValueError("a service account needs project_id (Project Settings →"
                                 " Overview)")
            check_api_url(self.api_url)
            if self.group_key is not None and not self.group_key.strip():
                raise ValueError("group_key is empty; set it to a group key of the project"
                                 " (Project Settings → Group Keys), or leave it out to skip"
                                 " group calls")
            if self.group_key is not None and self.group_key != self.group_key.strip():
                raise ValueError(f"group_key {self.group_key!r} has spaces around it; Mixpanel"
                                 " matches group keys exactly")

    def __init__(self, name: str, settings: msgspec.Struct):
        super().__init__(name, settings)
        s = self.settings
        base = s.api_url.rstrip("/")
        self._import_url, self._engage_url = base + "/import", base + "/engage"
        self._groups_url = base + "/groups"
        self._import_params = {"strict": "1"}
        if s.service_account_username:
            self._auth = (s.service_account_username, s.service_account_secret)
            self._import_params["project_id"] = s.project_id
        else:
            self._auth = (s.project_token, "")

    def sent_secrets(self) -> list[str]:
        return [basic_authorization(*self._auth)]  # as an Authorization header echoed back

    async def send(self, batch: Sequence[Event]) -> list[Outcome]:
        results: list[list[Outcome]] = [[] for _ in batch]
        records: list[tuple[int, bytes]] = []
        updates: list[tuple[int, dict]] = []
        groups: list[tuple[int, bytes]] = []
        for i, event in enumerate(batch):
            skipped = plan(i, event, self.settings.project_token, records, updates,
                           groups, self.settings.group_key)
            if skipped is not None:
                results[i].append(skipped)
        encoded = [r for _, r in records]
        for chunk in chunk_by_size(encoded, IMPORT_MAX_EVENTS, IMPORT_MAX_BYTES):
            for k, outcome in zip(chunk, await self._import([encoded[k] for k in chunk])):
                results[records[k][0]].append(outcome)
        for start in range(0, len(groups), GROUPS_MAX_UPDATES):
            part = groups[start:start + GROUPS_MAX_UPDATES]
            outcome = await self._groups([g for _, g in part])
            for i, _ in part:
                results[i].append(outcome)
        for start in range(0, len(updates), ENGAGE_MAX_UPDATES):
            part = updates[start:start + ENGAGE_MAX_UPDATES]
            outcome = await self._engage([u for _, u in part])
            for i, _ in part:
                results[i].append(outcome)
        return [worst(r) for r in results]

    async def check(self) -> str:
        opened = self._client is None
        if opened:
            await self.start()
        try:
            return await self._probe()
        finally:
            if opened:
                await self.close()

    async def _probe(self) -> str:
        """An empty import: Mixpanel checks the credentials before it finds the batch empty."""
        try:
            r = await self._client.post(self._import_url, params=self._import_params,
                                        content=b"[]", auth=self._auth,
                                        headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            raise DestinationError(f"cannot reach {self._import_url}: {exc!r}; check api_url.")
        if r.status_code in (401, 403):
            raise DestinationError(f"Mixpanel refused the credentials ({r.status_code}:"
                                   f" {excerpt(r.content)}). Check project_token, or the service"
                                   " account and project_id.")
        if r.status_code >= 500:
            raise DestinationError(f"Mixpanel answered {r.status_code}: {excerpt(r.content)}.")
        return f"{self._import_url} accepted the credentials"

    async def _import(self, encoded: list[bytes]) -> list[Outcome]:
        body = b"[" + b",".join(encoded) + b"]"
        headers = {"content-type": "application/json", "user-agent": "trackpipe"}
        if self.settings.gzip:
            body, headers["content-encoding"] = gzip.compress(body), "gzip"
        try:
            r = await self._client.post(self._import_url, params=self._import_params,
                                        content=body, headers=headers, auth=self._auth)
        except httpx.HTTPError as exc:
            return [error_outcome(exc, self._import_url)] * len(encoded)
        if r.status_code == 400:
            rejected = failed_records(r.content)
            if rejected:  # Mixpanel kept the others (strict=1 is a partial success)
                return [fail(400, rejected[k]) if k in rejected else DELIVERED
                        for k in range(len(encoded))]
        return [classify_http(r.status_code, r.content, r.headers)] * len(encoded)

    async def _engage(self, updates: list[dict]) -> Outcome:
        return await self._update_profiles(self._engage_url, msgspec.json.encode(updates),
                                           "Engage", "profile")

    async def _groups(self, encoded: list[bytes]) -> Outcome:
        return await self._update_profiles(self._groups_url, b"[" + b",".join(encoded) + b"]",
                                           "Groups", "group profile")

    async def _update_profiles(self, url: str, body: bytes, api: str, what: str) -> Outcome:
        """Engage and Groups answer alike: the whole request succeeds or fails, with no
        record-level detail; the token travels in the body."""
        try:
            r = await self._client.post(url, params={"verbose": "1"}, content=body,
                                        headers={"content-type": "application/json",
                                                 "user-agent": "trackpipe"})
        except httpx.HTTPError as exc:
            return error_outcome(exc, url)
        if r.status_code != 200:
            return classify_http(r.status_code, r.content, r.headers)
        try:  # they answer 200 even when they reject the data; the body tells
            answer = msgspec.json.decode(r.content)
        except (msgspec.DecodeError, RecursionError):  # nested past the decoder
            return retry(200, f"{api} answered 200 with an unreadable body: {excerpt(r.content)}")
        if isinstance(answer, dict) and answer.get("status") == 1:
            return DELIVERED
        return fail(200, f"{api} refused the {what} update: {excerpt(r.content)}")


# -- translation ---------------------------------------------------------------------

def plan(i: int, event: Event, token: str, records: list[tuple[int, bytes]],
         updates: list[tuple[int, dict]], groups: list[tuple[int, bytes]] | None = None,
         group_key: str | None = None) -> Outcome | None:
    """Add what event i becomes to the import records, engage updates and (with a
    group key) group updates; or return its outcome when nothing is sent. Never raises,
    whatever a mapping put in a field: a raise would retry the whole batch, for hours,
    for one odd message."""
    message = event.message
    refused = unknown_type("Mixpanel", message)
    if refused is not None:
        return refused
    kind = message["type"]
    if kind == "group" and group_key and groups is not None:
        return odd_field("Mixpanel", message) or plan_group(i, message, token, group_key,
                                                            groups, updates)
    if kind in NOT_SENT:
        return Outcome("delivered", None, NOT_SENT[kind])
    refused = odd_field("Mixpanel", message)
    if refused is not None:
        return refused
    links_ids = kind == "identify" and bool(message.get("userId") and message.get("anonymousId"))
    at = event_time(event)
    if at is None and (kind != "identify" or links_ids):  # only an Event built without one
        return fail(None, "the message has no `timestamp` and no stored time; Mixpanel imports"
                          " an event only with its time")
    if kind == "identify":
        if links_ids:
            records.append((i, msgspec.json.encode(identify_record(message, at))))
        updates.append((i, profile_update(message, token)))
    else:
        record = event_record(message, event_name(message), at, group_key)
        records.append((i, msgspec.json.encode(record)))
    return None


def plan_group(i: int, message: dict, token: str, group_key: str,
               groups: list[tuple[int, bytes]], updates: list[tuple[int, dict]]) -> Outcome | None:
    traits = _dict(message.get("traits"))
    # A trait named after the group key wins, as in Segment's Mixpanel destinations
    # (Classic required one; Actions keeps it for compatibility).
    group_id = group_value(traits.get(group_key)) or group_value(message.get("groupId"))
    if not group_id:
        return fail(None, f"the group call has no groupId (nor a `{group_key}` trait); Mixpanel"
                          " needs a $group_id. If an action built it, map `groupId`.")
    update = msgspec.json.encode({"$token": token, "$group_key": group_key,
                                  "$group_id": group_id, "$set": group_properties(traits)})
    if len(update) > GROUP_UPDATE_MAX_BYTES:
        return fail(None, f"the group profile update is {len(update)} bytes; Mixpanel takes"
                          " at most 1 MB per update. Send fewer or shorter traits.")
    groups.append((i, update))
    if distinct_id(message):  # the member, so the user's profile lists its groups
        updates.append((i, membership_update(message, token, group_key, group_id)))
    return None


def event_record(message: dict, name: str, at: int, group_key: str | None = None) -> dict:
    user_id, anonymous_id = message.get("userId"), message.get("anonymousId")
    mid = str(message.get("messageId") or "")
    context = _dict(message.get("context"))
    props = context_properties(context)
    if message.get("type") == "page" and _dict(message.get("properties")).get("url"):
        props["$current_url"] = message["properties"]["url"]
    if group_key and (group_id := group_value(context.get("groupId"))):
        props[group_key] = group_id  # Mixpanel attributes an event to the group it names
    props.update(_dict(message.get("properties")))  # an explicit property wins
    props.update({"time": at, "distinct_id": distinct_id(message), "$insert_id": insert_id(mid),
                  "mp_lib": "trackpipe", "trackpipe_message_id": mid})
    if user_id:
        props["$user_id"] = user_id
    if anonymous_id:
        props["$device_id"] = anonymous_id
    return {"event": name, "properties": props}


def identify_record(message: dict, at: int) -> dict:
    record = event_record(message, "$identify", at)
    record["properties"].update({"$identified_id": message["userId"],
                                 "$anon_id": message["anonymousId"]})
    return record


def profile_update(message: dict, token: str) -> dict:
    update = profile_base(message, token)
    update["$set"] = profile_properties(_dict(message.get("traits")))
    return update


def membership_update(message: dict, token: str, group_key: str, group_id: str) -> dict:
    """`$union`, not `$set`: a user may belong to several groups of one key."""
    update = profile_base(message, token)
    update["$union"] = {group_key: [group_id]}
    return update


def profile_base(message: dict, token: str) -> dict:
    context = _dict(message.get("context"))
    update: dict[str, Any] = {"$token": token, "$distinct_id": distinct_id(message),
                              # Without $ip, Mixpanel would place every profile where
                              # trackpipe runs.
                              "$ip": context.get("ip") or "0"}
    if context.get("active") is False:
        update["$ignore_time"] = True
    return update


def profile_properties(traits: dict) -> dict:
    props = {PROFILE_TRAITS.get(k, k): v for k, v in traits.items()}
    first, last = props.get("$first_name"), props.get("$last_name")
    if "$name" not in props and first and last:
        props["$name"] = f"{first} {last}"
    return props


def group_properties(traits: dict) -> dict:
    """Segment maps only `name` to a reserved group profile property."""
    return {("$name" if k == "name" else k): v for k, v in traits.items()}


def group_value(value: Any) -> str:
    """A group id as Mixpanel takes it (a string), from a string or an integer; "" from
    anything else, so an odd value is skipped rather than sent as its repr."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return ""
    return str(value)


def distinct_id(message: dict) -> str:
    if message.get("userId"):
        return str(message["userId"])
    if message.get("anonymousId"):
        return f"$device:{message['anonymousId']}"
    return ""  # Mixpanel's way of saying "no user"


def insert_id(message_id: str) -> str:
    if INSERT_ID.fullmatch(message_id):
        return message_id
    return hashlib.sha256(message_id.encode()).hexdigest()[:36]


def context_properties(context: dict) -> dict:
    props: dict[str, Any] = {}
    for name, path in CONTEXT_PROPERTIES.items():
        value: Any = context
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and not isinstance(value, (dict, list)):
            props[name] = value
    return props


def failed_records(body: bytes) -> dict[int, str]:
    """index → reason, from a strict import's 400 answer; empty when it names none."""
    try:
        answer = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):  # nested past the decoder
        return {}
    rejected: dict[int, str] = {}
    for record in _list(_dict(answer).get("failed_records")):
        record = _dict(record)
        if isinstance(record.get("index"), int):
            rejected[record["index"]] = f"{record.get('field')}: {record.get('message')}"
    return rejected




def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []
