"""Conformance sink for the mixpanel destination: a local Mixpanel Import/Engage/Groups API.

MixpanelGroupsMock adds to vendor_mocks' MixpanelMock what Group Analytics needs,
checked as Mixpanel documents it (docs.mixpanel.com/reference/group-set-property,
group-batch-update and its limits page; profile-union for Engage):
- POST /groups: a JSON array (or the form field `data` holding one) of 1 to 2000
  updates, each at most 1 MB, each with the project token as `$token` (no Basic
  auth), a `$group_key` and `$group_id` string and an operation such as `$set`.
  Like Engage it answers 200 either way, `{"status": 1|0, "error": ...}` with
  `verbose=1`, else a bare `1` or `0`, and keeps nothing of a request it refuses.
- POST /engage: `$union` (an object of non-empty lists) besides `$set`.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs

from destinations.vendor_mocks import Answer, MixpanelMock, Request

GROUP_OPERATIONS = {"$set": dict, "$set_once": dict, "$unset": list, "$union": dict,
                    "$remove": dict, "$delete": object}
PROFILE_OPERATIONS = {"$set": dict, "$union": dict}


class MixpanelGroupsMock(MixpanelMock):
    def __init__(self, *args, **kwargs):
        self.group_updates: list[dict] = []
        super().__init__(*args, **kwargs)

    def handle(self, req: Request) -> Answer:
        if req.method == "POST" and req.path == "/groups":
            return self._groups(req)
        return super().handle(req)

    def _groups(self, req: Request) -> Answer:
        if self.mode == "retryable":
            return 503, {"status": 0, "error": "service unavailable"}
        updates = _updates(req)
        if not isinstance(updates, list) or not 1 <= len(updates) <= 2000:
            return _received(req, "body must be an array of 1 to 2000 updates")
        for u in updates:
            if self.mode == "terminal" or not isinstance(u, dict) or u.get("$token") != self.token:
                return _received(req, "Invalid token")
            error = _group_error(u)
            if error:
                return _received(req, error)
        self.group_updates += updates
        return _received(req)

    def _profile_error(self, update: dict) -> str | None:
        """Engage's checks, with `$union` allowed besides `$set`."""
        if not isinstance(update.get("$distinct_id"), str):
            return "$distinct_id is required"
        return _operation_error(update, PROFILE_OPERATIONS)

def _updates(req: Request):
    if req.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return json.loads(parse_qs(req.body.decode())["data"][0])
    return json.loads(req.body)


def _received(req: Request, error: str | None = None) -> Answer:
    status = 0 if error else 1
    if req.query.get("verbose") != ["1"]:
        return 200, status  # type: ignore[return-value]  # the bare 1 or 0, as Mixpanel does
    return 200, {"status": status, "error": error}


def _group_error(update: dict) -> str | None:
    for field in ("$group_key", "$group_id"):
        if not isinstance(update.get(field), str) or not update[field]:
            return f"{field} must be a non-empty string"
    if len(json.dumps(update).encode()) > 1000 * 1000:
        return "an update may be at most 1 MB"
    return _operation_error(update, GROUP_OPERATIONS)


def _operation_error(update: dict, allowed: dict) -> str | None:
    operations = [k for k in update if k in allowed]
    if not operations:
        return f"an update needs one of {', '.join(allowed)}"
    for name in operations:
        if not isinstance(update[name], allowed[name]):
            return f"{name} must be a {allowed[name].__name__}"
        if name == "$union" and not all(isinstance(v, list) and v
                                        for v in update[name].values()):
            return "$union takes an object of non-empty lists"
    return None


class Sink:
    def __init__(self, tmp_path: Path):
        self.mock = MixpanelGroupsMock(token="sink-token")

    def config(self, name: str) -> dict:
        return {"name": name, "type": "mixpanel",
                "settings": {"project_token": "sink-token", "api_url": self.mock.url,
                             "allow_private_targets": True}}

    def received(self) -> list[str]:
        return self.mock.received()

    def break_(self, terminal: bool = False) -> None:
        self.mock.break_(terminal)  # 503, or 401 as for a revoked token

    def heal(self) -> None:
        self.mock.heal()

    def close(self) -> None:
        self.mock.close()
