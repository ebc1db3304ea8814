"""Built-in destinations, by the `type` a [[destinations]] table names.

Each lives in its own module behind the seam in base.py and is imported only
when configured, so an unused destination's dependencies are never loaded.
"""

from __future__ import annotations

import importlib

from trackpipe.destinations.base import Destination

KINDS = {
    "webhook": "trackpipe.destinations.webhook:Webhook",
    "postgres": "trackpipe.destinations.warehouse.postgres:PostgresWarehouse",
    "duckdb": "trackpipe.destinations.warehouse.duckdb:DuckDBWarehouse",
    "file": "trackpipe.destinations.file:FileDestination",
    "mixpanel": "trackpipe.destinations.mixpanel:Mixpanel",
    "amplitude": "trackpipe.destinations.amplitude:Amplitude",
    "segment": "trackpipe.destinations.forward:SegmentForward",
}


def destination_class(kind: str) -> type[Destination]:
    """A built-in kind, or "package.module:Class" for a destination of your own."""
    if kind in KINDS:
        path = KINDS[kind]
    elif ":" in kind:
        path = kind
    else:
        raise KeyError(f"unknown destination type {kind!r}; known types: {', '.join(sorted(KINDS))}"
                       " (or \"package.module:Class\" for your own)")
    module, _, attr = path.partition(":")
    cls = getattr(importlib.import_module(module), attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Destination)):
        raise KeyError(f"{path} is not a trackpipe Destination class")
    return cls
