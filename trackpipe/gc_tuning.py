"""Garbage-collector settings for trackpipe's busy processes.

Events are acyclic and freed by reference counting, but each one decoded is
a few dozen containers: a 100-event batch allocates ~2,000 of them, a warehouse
batch of 5,000 events hundreds of thousands. With the default gen-0 threshold
(700) the collector runs many times per request or batch and re-scans every
long-lived object. Collect far less often, and never re-scan what startup made.
"""

from __future__ import annotations

import contextlib
import gc
import os

DEFAULT_THRESHOLD = 50_000


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(int(os.environ.get("TRACKPIPE_GC_THRESHOLD", DEFAULT_THRESHOLD)), 50, 100)


@contextlib.contextmanager
def gc_paused():
    """No collections inside: for building something large and acyclic that lives on
    afterwards (a warehouse batch's rows). Every container it allocates survives, so
    each collection the allocations set off would scan them all and free nothing; in a
    5,000-event batch that was a fifth of the planning time. Reference counting still
    frees what dies."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
