"""What a running server writes to its log while it delivers: its own lines, not one
line per HTTP request the webhook sends (httpx logs each at INFO)."""

from __future__ import annotations

from delivery.faulty_rig import api, send
from destinations.sink_webhook import Sink
from support import wait_for, write_config


def test_delivering_writes_no_line_per_request(fresh_server, tmp_path):
    sink = Sink(tmp_path / "sink")
    try:
        config = write_config(tmp_path / "trackpipe.toml",
                              [{**sink.config("hook"), "batch_size": 5}],
                              identity={"enabled": False})
        server = fresh_server(config=config).start()
        ids = send(server, 30)
        wait_for(lambda: set(ids) <= set(sink.received()), what="every event delivered")
        assert len(sink.requests()) >= 6
        sink.break_(terminal=True)
        [refused] = send(server, 1)
        wait_for(lambda: api(server, f"/api/v1/events/{refused}/deliveries").json()[
            "deliveries"][0]["state"] == "failed", what="the refused event failed")
        server.stop()
        log = server.log_path.read_text(errors="replace")
        assert f"destination hook: event {refused} failed" in log  # trackpipe's own lines
        assert "HTTP Request:" not in log, log[-2000:]
    finally:
        sink.close()
