"""R: the server is SIGKILLed while a webhook request is in flight.

The receiver has recorded the request but not answered when every trackpipe
process dies. After a restart nothing stored is lost, and the request that
was in flight is sent again with the same `webhook-id`, so a receiver that
deduplicates on it (as Standard Webhooks advises) sees each event once.
"""

from __future__ import annotations

import os
import signal

from delivery.faulty_rig import send
from destinations.sink_webhook import Sink
from support import descendants, wait_for, write_config


def test_sigkill_mid_delivery_loses_nothing_and_repeats_the_webhook_id(fresh_server, tmp_path):
    sink = Sink(tmp_path / "sink")
    try:
        sink.delay = 3.0  # record the request, then keep trackpipe waiting for the answer
        config = write_config(tmp_path / "trackpipe.toml", [sink.config("hook")],
                              identity={"enabled": False})
        server = fresh_server(config=config).start()
        ids = send(server, 300)
        wait_for(lambda: sink.received(), what="a request at the receiver")
        for pid in descendants(server.proc.pid):  # the consumers process too: no clean goodbye
            os.kill(pid, signal.SIGKILL)
        server.kill()
        in_flight = set(sink.received())
        sink.delay = 0.0
        server.start()
        wait_for(lambda: set(ids) <= set(sink.received()), timeout=60,
                 what="every event at the receiver after the restart")

        stored = {e["messageId"] for e in server.events()}
        assert stored == set(ids)  # the ledger: every stored event delivered
        received = sink.received()
        assert in_flight and all(received.count(m) == 2 for m in in_flight), \
            "the request in flight at the kill is sent again, once"
        for m in in_flight:
            first, again = sink.webhook_ids(m)
            assert first == again
        assert all(received.count(m) == 1 for m in set(ids) - in_flight)
    finally:
        sink.close()
