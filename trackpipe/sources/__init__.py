"""Sources: how events reach trackpipe (the Segment-compatible HTTP tracking API)."""
