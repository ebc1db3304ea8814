"""Settings: a TOML file plus TRACKPIPE_* environment overrides.

The schema is closed: an unknown key in the file is an error that names it.
Environment variables are TRACKPIPE_<SECTION>_<KEY> (e.g.
TRACKPIPE_LIMITS_MAX_EVENT_BYTES=65536), plus TRACKPIPE_DATA_DIR and
TRACKPIPE_ADMIN_TOKEN.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec

from trackpipe.errors import ConfigError

# Bounded types: a NaN, an infinity or a negative size would pass a plain float or int,
# then stop deliveries or refuse every request long after the start said "ok".
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Count = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=10**9)]
Rate = Annotated[float, msgspec.Meta(ge=0, le=10**9)]


class Server(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: Port = 8080
    """TCP port of the tracking API and the admin API."""
    public_url: str = ""
    """URL the SDKs reach trackpipe at, if not http://host:port (used in the browser settings)."""
    trusted_proxies: list[str] = []
    """Peers (IPs or CIDRs) whose X-Forwarded-For is believed when filling context.ip."""
    cors_origins: list[str] = msgspec.field(default_factory=lambda: ["*"])
    """Origins allowed to send events from a browser; "*" echoes any origin."""
    consumers_nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    """How much lower the CPU priority of identity and delivery is than the collector's
    (a nice increment, 0-19). On a CPU-bound machine, taking in events comes first."""
    idle_timeout_seconds: Seconds = 5.0
    """A connection with no request under way (new, or kept alive after an answer) is closed
    after this long without a byte."""
    header_timeout_seconds: Seconds = 10.0
    """A request's headers must be in within this long of its first byte; else 408."""
    body_timeout_seconds: Seconds = 30.0
    """A request's body must be in within this long of its headers, plus 1 s for every KB
    received (a body coming at 1 KB/s keeps going), at most ten times this; else 408."""
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024
    """Largest request line and headers together; a larger request is answered 431."""
    max_connections: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Most connections open at once; a request on one more is answered 503 with Retry-After.
    0: the open-file limit (ulimit -n) less what trackpipe keeps for itself (see
    connection_limit)."""

    def __post_init__(self) -> None:
        if self.public_url:
            url = urlsplit(self.public_url)
            if url.scheme not in ("http", "https") or not url.hostname \
                    or url.query or url.fragment:
                # The browser settings tell the SDK `protocol` and `apiHost` from it.
                raise ValueError(f"server.public_url {self.public_url!r} must be an http:// or"
                                 " https:// URL with a host (and at most a path), such as"
                                 " https://t.example.com or https://example.com/trackpipe")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"server.trusted_proxies: {proxy!r} is not an IP address or"
                                 " CIDR network (such as 10.0.0.0/8)") from None

    def connection_limit(self) -> int:
        """max_connections, or when 0 the open-file limit less what the server needs besides
        its clients' sockets: about 35 descriptors at rest (SQLite databases with their WAL
        and shm files, the log writer's pipes, the event loop), up to 32 connections over
        the cap, open up to a second to be answered 503 (sources/oneshot.py), and the rest
        for PostgreSQL, NATS and export sockets and modules imported on a first request.
        128 are kept (half the limit when it is under 256)."""
        if self.max_connections:
            return self.max_connections
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return max(16, soft - min(128, soft // 2))


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_event_bytes: Count = 32 * 1024
    """Largest single event, as sent (its JSON as the client wrote it)."""
    max_request_bytes: Count = 500 * 1024
    """Largest request body after gzip decompression."""
    max_batch_events: Count = 2500
    """Most events in one batch request."""
    rate_limit_events_per_second: Rate = 0
    """Events per second one source may send (0: no limit); over it, 429 with Retry-After."""
    rate_limit_burst_seconds: Seconds = 1.0
    """How many seconds of the rate a source may send at once after a quiet spell."""


class Dedup(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    window_seconds: Count = 12 * 3600
    """A repeated messageId within this long of its first receipt is dropped (answered 200)."""


class Log(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    retention_seconds: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Delete events older than this once identity and every enabled destination have read
    them and none holds them for a retry or as failed (0: keep every event)."""
    prune_every_seconds: Seconds = 300.0
    """How often the retention looks for events to delete."""


class Ingest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int = 2
    """The `version` stamped on every stored message."""
    strict: bool = False
    """Reject a whole request with 400 when any event in it is invalid (per-source override)."""


class Filter(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mode: str = "allow"
    """"allow": only events matching types/events go; "deny": those are kept back."""
    types: list[str] = []
    """Message types the filter matches (empty: any type)."""
    events: list[str] = []
    """Track event names the filter matches (empty: any name)."""


class Action(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    """Shown in deliveries and metrics."""
    trigger: str
    """Condition over the event, e.g. `type = "track" and event = "Order Completed"`."""
    mapping: dict[str, Any] = {}
    """Output path -> "$.source.path" or a literal; empty sends the message unchanged."""


class Destination(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    """Names the destination in `integrations`, the API, metrics and the CLI."""
    type: str
    """webhook, postgres, duckdb, file, mixpanel, amplitude or segment."""
    enabled: bool = True
    batch_size: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Most events per request; 0 takes the destination type's default."""
    retry_window_seconds: Annotated[int, msgspec.Meta(ge=0)] = 4 * 3600
    """Keep retrying a failing event this long from its first attempt ..."""
    max_attempts: Count = 10
    """... and at least this many attempts; only when both are spent does it fail."""
    retry_initial_seconds: Seconds = 1.0
    """First wait before a retry; each later wait doubles (with jitter)."""
    retry_max_delay_seconds: Seconds = 300.0
    """Longest wait between two attempts (also caps a Retry-After)."""
    ordered: bool = False
    """Per-user ordering: a user's later events wait while an earlier one is retrying."""
    filter: Filter | None = None
    actions: list[Action] = []
    """When present, only events matching an action's trigger go, shaped by its mapping."""
    settings: dict[str, Any] = {}
    """The destination type's own settings (URL, credentials, ...); see README#destinations."""


# The kinds of identifiers (identity/facts.py USER and ANON, and privacy/suppress.py PROFILE)
# that a trait identifier, whose name is its kind, must not pass for.
RESERVED_TRAIT_NAMES = ("user_id", "anonymous_id", "profile")


class Identity(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    """Build profiles from the log (anonymous visitors stitched to known people)."""
    store: str = "sqlite"
    """"sqlite" (embedded, in data_dir) or "postgres" (shared by several nodes)."""
    postgres_dsn: str = ""
    """Connection string of the PostgreSQL identity store, when store = "postgres"."""
    trait_identifiers: list[str] = []
    """Traits that identify a person too, e.g. ["email"]."""
    blocked_values: list[str] = msgspec.field(default_factory=lambda: [
        "", "0", "-1", "null", "undefined", "none", "nil", "anonymous", "unknown", "guest",
        "n/a", "[object object]"])
    """Identifier values that never join people (compared case-insensitively, trimmed)."""
    max_identifiers_per_profile: Count = 1000
    max_merges_per_profile: Annotated[int, msgspec.Meta(ge=0)] = 100
    cache_identifiers: Count = 500_000
    """Identifiers the SQLite store keeps in memory between batches (~600 bytes each);
    past it the cache starts afresh and later batches load what they name again."""

    def __post_init__(self) -> None:
        reserved = [name for name in self.trait_identifiers if name in RESERVED_TRAIT_NAMES]
        if reserved:
            # A trait identifier's name is its identifiers' kind: "user_id" would make a
            # trait value a userId (joining visitors to whoever has that userId).
            raise ValueError(
                f"identity.trait_identifiers cannot hold {reserved[0]!r}: "
                f"{', '.join(RESERVED_TRAIT_NAMES)} are reserved for the identifiers trackpipe "
                "keeps itself (a trait of that name would pass for one); remove it")


class Privacy(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    truncate_ip: bool = False
    """Zero the last octet (IPv4) / last 80 bits (IPv6) of context.ip before anything is stored."""


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = "./trackpipe-data"
    """Where the event log and its indexes live."""
    admin_token: str = ""
    """Bearer token for the admin API; generated and stored on first start when empty."""
    server: Server = msgspec.field(default_factory=Server)
    limits: Limits = msgspec.field(default_factory=Limits)
    dedup: Dedup = msgspec.field(default_factory=Dedup)
    ingest: Ingest = msgspec.field(default_factory=Ingest)
    identity: Identity = msgspec.field(default_factory=Identity)
    privacy: Privacy = msgspec.field(default_factory=Privacy)
    log: Log = msgspec.field(default_factory=Log)
    destinations: list[Destination] = []

    def __post_init__(self) -> None:
        token = self.admin_token
        if token and not (token.isascii() and token.isprintable() and token.strip() == token):
            # HTTP headers carry ASCII; a space at either end is lost on the way.
            raise ValueError("admin_token must be printable ASCII without spaces at either end")
        retention = self.log.retention_seconds
        if 0 < retention < self.dedup.window_seconds:
            # Dedup confirms a repeat against the stored event: it must still be there.
            raise ValueError(f"log.retention_seconds ({retention}) must be 0 (keep every event)"
                             f" or at least dedup.window_seconds ({self.dedup.window_seconds})")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


# Read off Settings, so a new section or key cannot be left out of the env names or the hint.
_TOP_LEVEL_KEYS = Settings.__struct_fields__
_SECTIONS: dict[str, type[msgspec.Struct]] = {
    field.name: field.type.cls for field in msgspec.inspect.type_info(Settings).fields
    if isinstance(field.type, msgspec.inspect.StructType)}
# Variables that belong to the test suite or the benchmark, not to the server.
_NOT_SETTINGS = {"TRACKPIPE_REQUIRE_SERVICES", "TRACKPIPE_SWITCH_INTERVAL",
                 "TRACKPIPE_GC_THRESHOLD"}


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Settings:
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"Config file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Config file {path} cannot be read: {exc}.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {path} is not valid TOML: {exc}.{_toml_hint(exc)}"
                              ) from None
        except RecursionError:  # tomllib recurses once per level of nested tables and arrays
            raise ConfigError(f"Invalid configuration in {path}: inline tables or arrays"
                              " nest too deeply to be read; no setting needs more than a few"
                              " levels.") from None
    _apply_env(raw, os.environ if env is None else env)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"Invalid configuration{where}: {exc}.{_valid_keys(str(exc))}"
                          " See README.md#configuration.") from None


# The tables an unknown key can sit in, by the path msgspec gives ("$.destinations[0].filter").
_TABLES: dict[str, type[msgspec.Struct]] = {**_SECTIONS, "destinations": Destination,
                                            "destinations.filter": Filter,
                                            "destinations.actions": Action}


def _valid_keys(error: str) -> str:
    """For an unknown key, the keys valid where it is (`prot` in [server] gets [server]'s,
    one in a [[destinations]] table the destination's); nothing for other errors."""
    if "unknown field" not in error:
        return ""
    found = re.search(r"at `\$\.([\w.\[\]]+)`", error)
    path = re.sub(r"\[\d+\]", "", found.group(1)) if found else ""
    if path in _TABLES:
        shown = f"[[{path}]]" if path in ("destinations", "destinations.actions") else f"[{path}]"
        return f" Valid keys in {shown} are {', '.join(_TABLES[path].__struct_fields__)}."
    return f" Valid top-level keys are {', '.join(_TOP_LEVEL_KEYS)}."


def _toml_hint(exc: tomllib.TOMLDecodeError) -> str:
    """What to do about the TOML error the README's example invites: a key kept as
    `destinations = []` while [[destinations]] tables are added below it."""
    found = re.match(r"Cannot mutate immutable namespace \(((?:'[^']*',? ?)+)\)", str(exc))
    if not found:
        return ""
    key = ".".join(re.findall(r"'([^']*)'", found.group(1)))
    return (f" `{key}` is given twice, as `{key} = ...` and as [{key}] or [[{key}]] tables:"
            f" keep one (delete the `{key} = ...` line to use the tables).")


def _apply_env(raw: dict, env) -> None:
    for name, value in env.items():
        if not name.startswith("TRACKPIPE_") or name in _NOT_SETTINGS:
            continue
        key = name[len("TRACKPIPE_"):].lower()
        if key in ("data_dir", "admin_token"):
            raw[key] = value
            continue
        section, _, field = key.partition("_")
        if section in _SECTIONS and field in _SECTIONS[section].__struct_fields__:
            raw.setdefault(section, {})[field] = _parse_env_value(value)
        else:
            print(f"trackpipe: ignoring unknown environment variable {name}", file=sys.stderr)


def _parse_env_value(value: str):
    """Env values are TOML scalars or arrays when they parse as such, else plain strings."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # [[[...]]] nested past tomllib's reach
        return value


def make_data_dir(path: Path) -> None:
    """Create the data dir, 0700; a ConfigError (not a traceback) when the path cannot be one.

    The dir's mode is what keeps the events' personal data, the write keys and the privacy
    key from other local users: the files in it follow the umask (the catalog excepted).
    An existing dir is left as it is: `make_private` tightens it, once, at a start."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"Cannot use {path} as the data dir: it is a file, not a"
                          " directory.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot use {path} as the data dir: {exc.strerror or exc}.") from None


def make_private(path: Path) -> None:
    """A data dir that group or others can read or enter (made by hand, or by a trackpipe
    before 0700) is tightened, once, with a line saying so."""
    import logging

    mode = path.stat().st_mode & 0o777
    if not mode & 0o077:
        return
    log = logging.getLogger("trackpipe")
    try:
        os.chmod(path, 0o700)
    except OSError as exc:  # not its owner: say so, and go on as before
        log.warning("the data dir %s is mode %o, open to other local users, and could not"
                    " be made 0700 (%s); run `chmod 700 %s`", path, mode, exc.strerror, path)
        return
    log.warning("the data dir %s was mode %o, open to other local users; made it 0700",
                path, mode)
