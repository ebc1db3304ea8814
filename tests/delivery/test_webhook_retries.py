"""A failed webhook batch is retried whole, under the same webhook-id; a Retry-After
holds back everything sent to the webhook.

Standard Webhooks receivers deduplicate on `webhook-id`; in batch mode that id
names the batch, so a retry must carry the same events again, not a regrouping:
not merged with other failed batches that are due at the same moment, also after
a restart.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

from delivery.faulty_rig import send
from destinations.sink_webhook import Recorder, Sink
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


def fail_three_batches(server, sink: Sink) -> list[list[str]]:
    """Three one-event batches, each sent (and refused) on its own: the next event is
    posted only once the receiver has seen the one before (so within a retry's 2 s)."""
    batches = []
    for n in range(3):
        batches.append(send(server, 1, user=f"u{n}"))
        wait_for(lambda: len(sink.requests()) > n, what=f"batch {n + 1} attempted")
    assert [batch for _, batch, _ in sink.requests()] == batches
    return batches


def assert_retried_as_sent(sink: Sink, batches: list[list[str]]) -> None:
    """Every request repeats one of the batches first sent, under that batch's webhook-id:
    a receiver that drops webhook-ids it has seen processes each event once."""
    requests = sink.requests()
    members = defaultdict(set)  # webhook-id -> the member lists sent under it
    ids_of = defaultdict(set)  # messageId -> the webhook-ids it was sent under
    for webhook_id, batch, _ in requests:
        members[webhook_id].add(tuple(batch))
        for message_id in batch:
            ids_of[message_id].add(webhook_id)
    assert sorted(map(sorted, members.values())) == sorted([[tuple(b)] for b in batches]), \
        f"batches merged or split on retry: {requests}"
    assert all(len(w) == 1 for w in ids_of.values()), f"an event under two ids: {requests}"
    assert len(requests) > len(batches), "each batch was retried"


def serve_a_broken_hook(fresh_server, tmp_path, sink: Sink):
    """A server whose webhook's receiver refuses everything until healed; each retry
    comes due 2-3 s after its send."""
    sink.break_()
    config = write_config(tmp_path / "trackpipe.toml",
                          [{**sink.config("hook"), "retry_initial_seconds": 2.0,
                            "retry_max_delay_seconds": 3.0}],
                          identity={"enabled": False})
    return fresh_server(config=config).start()


def assert_all_delivered_as_sent(sink: Sink, batches: list[list[str]]) -> None:
    wait_for(lambda: {i for b in batches for i in b} <= set(sink.received()), 30,
             what="every batch delivered")
    assert_retried_as_sent(sink, batches)


def test_failed_batches_due_at_once_are_retried_apart_each_whole(fresh_server, tmp_path):
    sink = Sink(tmp_path / "sink")
    try:
        server = serve_a_broken_hook(fresh_server, tmp_path, sink)
        batches = fail_three_batches(server, sink)
        # The first retry to go takes 4 s to answer: by then the other two are both due.
        sink.delay = 4.0
        sink.heal()
        assert_all_delivered_as_sent(sink, batches)
    finally:
        sink.delay = 0
        sink.close()


def test_failed_batches_keep_their_webhook_ids_across_a_restart(fresh_server, tmp_path):
    sink = Sink(tmp_path / "sink")
    try:
        server = serve_a_broken_hook(fresh_server, tmp_path, sink)
        batches = fail_three_batches(server, sink)
        server.kill()
        time.sleep(3.2)  # down until every retry is due (2 s x jitter of at most 1.5)
        sink.heal()
        server.start()
        assert_all_delivered_as_sent(sink, batches)
    finally:
        sink.close()


class Clocked(Recorder):
    """Answers the first request 429 with `Retry-After`, the rest 200; notes arrival times."""

    def __init__(self, retry_after: int):
        super().__init__([(429, {"retry-after": str(retry_after)}, b'{"error": "slow down"}')])

    def next_answer(self, request: dict):
        request["at"] = time.monotonic()
        return super().next_answer(request)

    def message_ids(self) -> list[str]:
        return [m["messageId"] for r in self.requests for m in json.loads(r["body"])["batch"]]


def test_a_retry_after_holds_back_every_request_until_it_expires(fresh_server, tmp_path):
    receiver = Clocked(retry_after=2)
    try:
        hook = {"name": "hook", "type": "webhook", "retry_initial_seconds": 0.1,
                "settings": {"url": receiver.url(), "allow_private_targets": True}}
        config = write_config(tmp_path / "trackpipe.toml", [hook], identity={"enabled": False})
        server = fresh_server(config=config).start()
        ids = send(server, 1, user="first")
        wait_for(lambda: receiver.requests, what="the first request")
        for n in range(4):  # fresh events meanwhile, each a batch the worker could send
            time.sleep(0.3)
            ids += send(server, 1, user=f"later{n}")
        wait_for(lambda: set(ids) <= set(receiver.message_ids()), 20, what="all delivered")
        first, *rest = [r["at"] for r in receiver.requests]
        assert rest and min(rest) - first >= 2.0, \
            f"a request {min(rest) - first:.2f} s after the 429 with Retry-After: 2"
    finally:
        receiver.close()
