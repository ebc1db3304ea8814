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
    try:
        module, _, attr = KINDS[kind].partition(":")
    except KeyError:
        raise KeyError(f"unknown destination type {kind!r}; known types: {', '.join(sorted(KINDS))}") from None
    return getattr(importlib.import_module(module), attr)
