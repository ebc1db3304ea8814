"""A failed webhook batch is retried whole, under the same webhook-id.

Standard Webhooks receivers deduplicate on `webhook-id`; in batch mode that id
names the batch, so a retry must carry the same events again, not a regrouping.
"""

from __future__ import annotations

from delivery.faulty_rig import send
from destinations.sink_webhook import Sink
from support import wait_for, write_config


def test_a_failed_batch_is_retried_whole_with_the_same_webhook_id(fresh_server, tmp_path):
    sink = Sink(tmp_path / "sink")
    try:
        sink.break_()
        config = write_config(tmp_path / "trackpipe.toml",
                              [{**sink.config("hook"), "retry_initial_seconds": 0.2}],
                              identity={"enabled": False})
        server = fresh_server(config=config).start()
        ids = send(server, 30)
        wait_for(lambda: len(sink.requests()) >= 3, what="three failed attempts")
        sink.heal()
        wait_for(lambda: set(ids) <= set(sink.received()), what="the batch delivered")
        requests = sink.requests()
        assert [status for _, _, status in requests][-1] == 200
        assert {tuple(sorted(batch)) for _, batch, _ in requests} == {tuple(sorted(ids))}
        assert len({webhook_id for webhook_id, _, _ in requests}) == 1
    finally:
        sink.close()
