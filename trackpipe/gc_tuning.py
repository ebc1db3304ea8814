"""Garbage-collector settings for trackpipe's busy processes.

Events are acyclic and freed by reference counting, but each one decoded is
a few dozen containers: a 100-event batch allocates ~2,000 of them, a warehouse
batch of 5,000 events hundreds of thousands. With the default gen-0 threshold
(700) the collector runs many times per request or batch and re-scans every
long-lived object. Collect far less often, and never re-scan what startup made.
"""

from __future__ import annotations

import gc
import os

DEFAULT_THRESHOLD = 50_000


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(int(os.environ.get("TRACKPIPE_GC_THRESHOLD", DEFAULT_THRESHOLD)), 50, 100)
