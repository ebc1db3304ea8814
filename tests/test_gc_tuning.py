"""The garbage-collector settings every trackpipe process applies (gc_tuning.tune_gc):
the server, the log writer and the consumers process each call it at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = ("import gc, json; from trackpipe.gc_tuning import tune_gc; tune_gc(); "
         "print(json.dumps([gc.get_threshold(), gc.get_freeze_count()]))")


def tuned(threshold: str | None) -> tuple[list[int], int]:
    """(gc thresholds, frozen objects) in a fresh interpreter after tune_gc()."""
    env = {k: v for k, v in os.environ.items() if k != "TRACKPIPE_GC_THRESHOLD"}
    if threshold is not None:
        env["TRACKPIPE_GC_THRESHOLD"] = threshold
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=60, env=env).stdout
    thresholds, frozen = json.loads(out)
    return thresholds, frozen


def test_collects_rarely_and_freezes_what_startup_made():
    thresholds, frozen = tuned(None)
    assert thresholds == [50_000, 50, 100]
    assert frozen > 0


def test_the_environment_sets_the_threshold():
    assert tuned("700")[0] == [700, 50, 100]
