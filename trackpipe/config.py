"""Settings: a TOML file plus TRACKPIPE_* environment overrides.

The schema is closed: an unknown key in the file is an error that names it.
Environment variables are TRACKPIPE_<SECTION>_<KEY> (e.g.
TRACKPIPE_LIMITS_MAX_EVENT_BYTES=65536), plus TRACKPIPE_DATA_DIR and
TRACKPIPE_ADMIN_TOKEN.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

import msgspec

from trackpipe.errors import ConfigError


class Server(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8080
    """TCP port of the tracking API and the admin API."""
    public_url: str = ""
    """URL the SDKs reach trackpipe at, if not http://host:port (used in the browser settings)."""
    trusted_proxies: list[str] = []
    """Peers (IPs or CIDRs) whose X-Forwarded-For is believed when filling context.ip."""
    cors_origins: list[str] = msgspec.field(default_factory=lambda: ["*"])
    """Origins allowed to send events from a browser; "*" echoes any origin."""


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_event_bytes: int = 32 * 1024
    """Largest single event, as re-encoded JSON."""
    max_request_bytes: int = 500 * 1024
    """Largest request body after gzip decompression."""
    max_batch_events: int = 2500
    """Most events in one batch request."""
    rate_limit_events_per_second: float = 0
    """Events per second one source may send (0: no limit); over it, 429 with Retry-After."""
    rate_limit_burst_seconds: float = 1.0
    """How many seconds of the rate a source may send at once after a quiet spell."""


class Dedup(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    window_seconds: int = 12 * 3600
    """A repeated messageId within this long of its first receipt is dropped (answered 200)."""


class Ingest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int = 2
    """The `version` stamped on every stored message."""
    strict: bool = False
    """Reject a whole request with 400 when any event in it is invalid (per-source override)."""


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = "./trackpipe-data"
    """Where the event log and its indexes live."""
    admin_token: str = ""
    """Bearer token for the admin API; generated and stored on first start when empty."""
    server: Server = msgspec.field(default_factory=Server)
    limits: Limits = msgspec.field(default_factory=Limits)
    dedup: Dedup = msgspec.field(default_factory=Dedup)
    ingest: Ingest = msgspec.field(default_factory=Ingest)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


_SECTIONS = ("server", "limits", "dedup", "ingest")
# Variables that belong to the test suite or the benchmark, not to the server.
_NOT_SETTINGS = {"TRACKPIPE_REQUIRE_SERVICES", "TRACKPIPE_SWITCH_INTERVAL",
                 "TRACKPIPE_GC_THRESHOLD"}


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Settings:
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"Config file {path} does not exist.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {path} is not valid TOML: {exc}.") from None
    _apply_env(raw, os.environ if env is None else env)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(
            f"Invalid configuration{where}: {exc}. "
            f"Valid sections are {', '.join(_SECTIONS)}; see README.md#configuration."
        ) from None


def _apply_env(raw: dict, env) -> None:
    for name, value in env.items():
        if not name.startswith("TRACKPIPE_") or name in _NOT_SETTINGS:
            continue
        key = name[len("TRACKPIPE_"):].lower()
        if key in ("data_dir", "admin_token"):
            raw[key] = value
            continue
        section, _, field = key.partition("_")
        if section in _SECTIONS and field in _section_fields(section):
            raw.setdefault(section, {})[field] = _parse_env_value(value)
        else:
            print(f"trackpipe: ignoring unknown environment variable {name}", file=sys.stderr)


def _section_fields(section: str) -> tuple[str, ...]:
    cls = {"server": Server, "limits": Limits, "dedup": Dedup, "ingest": Ingest}[section]
    return cls.__struct_fields__


def _parse_env_value(value: str):
    """Env values are TOML scalars or arrays when they parse as such, else plain strings."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value
