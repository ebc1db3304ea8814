"""A destination added to the config receives the events stored from its first start on
(README, Destinations): until then nothing stored is waiting for it, and the counts
say so instead of showing the whole log as pending."""

from __future__ import annotations

import json

from delivery.faulty_rig import api, cli, send
from destinations.sink_webhook import Sink
from support import wait_for, write_config


def test_a_destination_not_started_yet_has_nothing_pending(fresh_server, tmp_path):
    sink = Sink(tmp_path / "sink")
    try:
        bare = write_config(tmp_path / "bare.toml", identity={"enabled": False})
        server = fresh_server(config=bare).start()
        before = send(server, 12)
        server.stop()
        added = write_config(tmp_path / "trackpipe.toml",
                             [sink.config("hook"), {**sink.config("off"), "enabled": False}],
                             identity={"enabled": False})
        listed = cli(server, "destinations", "--json", config=added)
        assert listed.returncode == 0, listed.stderr
        hook, _ = json.loads(listed.stdout)["destinations"]
        assert (hook["started"], hook["pending"], hook["oldest_pending_age_seconds"]) == (
            False, 0, None)
        assert states(cli(server, "destinations", config=added).stdout) == {
            "hook": "not started", "off": "disabled"}

        server.config = added
        server.start()
        after = send(server, 3)
        wait_for(lambda: set(after) <= set(sink.received()), what="the new events delivered")
        hook = api(server, "/api/v1/destinations/hook").json()
        assert (hook["started"], hook["delivered"], hook["pending"]) == (True, 3, 0)
        assert not set(before) & set(sink.received())
        assert states(cli(server, "destinations", config=added).stdout) == {
            "hook": "delivering", "off": "disabled"}
    finally:
        sink.close()


def states(table: str) -> dict[str, str]:
    """NAME -> STATE from `trackpipe destinations`' table (its header names the columns)."""
    header, *rows = table.splitlines()
    at = header.index("STATE")
    width = header.index("DELIVERED") - at
    return {row.split()[0]: row[at:at + width].strip() for row in rows}
