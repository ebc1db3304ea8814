"""From a [[destinations]] table to a destination instance, and back to what may be shown."""

from __future__ import annotations

import msgspec

from trackpipe import config
from trackpipe.destinations import destination_class
from trackpipe.destinations.base import Destination, is_http_url, mask_url
from trackpipe.errors import ConfigError

MASK = "********"


def build_destination(cfg: config.Destination) -> Destination:
    cls = _class(cfg)
    try:
        settings = msgspec.convert(cfg.settings, cls.Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"Destination {cfg.name!r} ({cfg.type}): invalid settings: {exc}.") from None
    return cls(cfg.name, settings)


def validate(settings: config.Settings) -> None:
    """Everything about the destinations that can be checked without reaching them."""
    from trackpipe.delivery.routing import Router

    seen: set[str] = set()
    for cfg in settings.destinations:
        if not cfg.name.strip():
            raise ConfigError("Every [[destinations]] table needs a non-empty name.")
        if cfg.name in seen:
            raise ConfigError(f"Two destinations are named {cfg.name!r}; names must be unique.")
        seen.add(cfg.name)  # (batch_size, max_attempts and the waits: bounded in config.py)
        build_destination(cfg)
        Router(cfg)  # trigger syntax, filter modes


def masked(cfg: config.Destination) -> dict:
    """The destination's settings with every secret replaced, for the API and the CLI; a
    URL keeps its host and path, not the credentials in it (base.url_credentials)."""
    secret = set(_class(cfg).secret_fields)
    return {k: (MASK if k in secret and v not in ("", None, {}) else
                mask_url(v, MASK) if is_http_url(v) else v)
            for k, v in cfg.settings.items()}


def _class(cfg: config.Destination) -> type[Destination]:
    try:
        return destination_class(cfg.type)
    except KeyError as exc:
        raise ConfigError(f"Destination {cfg.name!r}: {exc.args[0]}.") from None
    except ImportError as exc:
        raise ConfigError(f"Destination {cfg.name!r} ({cfg.type}) cannot load: {exc}.") from None
