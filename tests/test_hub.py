"""Hub: O(1) broadcast, one batch per stream per flush shared by every subscriber, blocks built once. Pure: no
sockets, no loop."""

from __future__ import annotations

import pytest

from gateway.ws.frames import encode_text_frames, text_frame_header
from gateway.ws.hub import Hub, StreamBatch
from shared.streams import StreamKind, parse_stream

TRADE = parse_stream("btcusdt@trade")
TICKER = parse_stream("btcusdt@bookTicker")
ETH_TICKER = parse_stream("ethusdt@bookTicker")


class Recorder:
    """A subscriber that records what the hub hands it (optionally asking for finish())."""

    def __init__(self, combined: bool = False, coalesce: bool = False) -> None:
        self.combined = combined
        self.coalesce = coalesce
        self.batches: list[StreamBatch] = []
        self.finished = 0
        self.waiting = False

    def deliver(self, batch: StreamBatch) -> bool:
        self.batches.append(batch)
        if self.coalesce and not self.waiting:
            self.waiting = True  # like a session: ask for finish() on the first batch of a flush only
            return True
        return False

    def finish(self) -> None:
        self.waiting = False
        self.finished += 1


def test_first_and_last_subscriber_are_reported() -> None:
    hub = Hub()
    a, b = Recorder(), Recorder()
    assert hub.add(TRADE, a) is True
    assert hub.add(TRADE, b) is False
    assert hub.remove(TRADE.name, a) is False
    assert hub.remove(TRADE.name, b) is True
    assert hub.streams() == []


def test_broadcast_queues_without_touching_subscribers_and_flush_hands_one_batch_each() -> None:
    hub = Hub()
    subscribers = [Recorder() for _ in range(3)]
    for subscriber in subscribers:
        hub.add(TRADE, subscriber)
    for index in range(5):
        assert hub.broadcast(TRADE.name, b'{"t":%d}' % index)
    assert all(not subscriber.batches for subscriber in subscribers)  # nothing per client per message
    assert hub.flush() == 15
    batches = [subscriber.batches for subscriber in subscribers]
    assert all(len(received) == 1 for received in batches)
    assert batches[0][0] is batches[1][0] is batches[2][0]  # one shared batch object
    assert batches[0][0].payloads == [b'{"t":%d}' % index for index in range(5)]
    assert hub.flush() == 0  # nothing pending any more
    assert hub.deliveries[StreamKind.TRADE] == 15
    assert hub.messages[StreamKind.TRADE] == 5


def test_broadcast_for_a_stream_nobody_wants_is_dropped() -> None:
    hub = Hub()
    assert hub.broadcast(TRADE.name, b"{}") is False
    assert not hub.has_pending


def test_blocks_are_websocket_frames_built_once_per_variant() -> None:
    batch = StreamBatch("btcusdt@trade", StreamKind.TRADE, [b'{"a":1}', b"x" * 200])
    raw = batch.block(False)
    assert raw == text_frame_header(7) + b'{"a":1}' + b"\x81\x7e\x00\xc8" + b"x" * 200
    assert batch.block(False) is raw
    combined = batch.block(True)
    assert combined.startswith(text_frame_header(len(b'{"stream":"btcusdt@trade","data":{"a":1}}')))
    assert batch.block(True) is combined
    assert batch.frames(True)[0] == b'{"stream":"btcusdt@trade","data":{"a":1}}'
    assert batch.frames(False)[1] is batch.payloads[1]  # raw frames are the exchange's bytes, untouched


def test_large_frame_lengths_use_the_64_bit_form() -> None:
    payload = b"y" * 70_000
    assert encode_text_frames([payload]) == b"\x81\x7f" + (70_000).to_bytes(8, "big") + payload


def hub_with_one_client_on_two_streams() -> tuple[Hub, Recorder]:
    """A coalescing subscriber (like a /stream client) on two streams, one message pending on each."""
    hub = Hub()
    multi = Recorder(coalesce=True)
    hub.add(TRADE, multi)
    hub.add(TICKER, multi)
    hub.broadcast(TRADE.name, b"t")
    hub.broadcast(TICKER.name, b"b")
    return hub, multi


def test_subscribers_that_coalesce_are_finished_once_per_flush() -> None:
    hub, multi = hub_with_one_client_on_two_streams()
    hub.flush()
    # Asked for finish() on its first batch only; finish() runs once after every stream was handed out.
    assert [batch.stream for batch in multi.batches] == [TRADE.name, TICKER.name]
    assert multi.finished == 1


def test_latest_frame_only_for_state_streams() -> None:
    hub = Hub()
    hub.add(TRADE, Recorder())
    hub.add(TICKER, Recorder())
    hub.broadcast(TRADE.name, b'{"t":1}')
    for index in range(3):
        hub.broadcast(TICKER.name, b'{"u":%d}' % index)
    assert hub.latest_frame(TICKER.name, False) == b'{"u":2}'
    assert hub.latest_frame(TICKER.name, True) == b'{"stream":"btcusdt@bookTicker","data":{"u":2}}'
    assert hub.latest_frame(TRADE.name, False) is None


def test_subscriptions_by_kind_counts_clients() -> None:
    hub = Hub()
    for _ in range(3):
        hub.add(TRADE, Recorder())
    hub.add(TICKER, Recorder())
    counts = hub.subscriptions_by_kind()
    assert counts[TRADE.kind] == 3
    assert counts[TICKER.kind] == 1


def test_a_budgeted_flush_serves_the_longest_waiting_streams_and_keeps_the_rest_queued() -> None:
    hub = Hub()
    trade = [Recorder() for _ in range(3)]
    ticker = [Recorder() for _ in range(3)]
    eth = [Recorder() for _ in range(3)]
    for stream, group in ((TRADE, trade), (TICKER, ticker), (ETH_TICKER, eth)):
        for subscriber in group:
            hub.add(stream, subscriber)
    hub.broadcast(TICKER.name, b"b1")
    hub.broadcast(TRADE.name, b"t1")
    hub.broadcast(ETH_TICKER.name, b"e1")
    # Budget 2 < 3 subscribers of the first stream: a stream is never split, so exactly one stream is served.
    assert hub.flush(budget=2) == 3
    assert [len(s.batches) for s in ticker + trade + eth] == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert hub.has_pending
    assert not hub.is_pending(TICKER.name) and hub.is_pending(TRADE.name) and hub.is_pending(ETH_TICKER.name)
    assert hub.batches == 3  # one batch (one write) per subscriber served
    # Messages arriving before a queued stream's turn join its batch; a stream served already queues at the back.
    hub.broadcast(TRADE.name, b"t2")
    hub.broadcast(TICKER.name, b"b2")
    assert hub.flush(budget=3) == 6
    assert trade[0].batches[0].payloads == [b"t1", b"t2"]
    assert not eth[0].batches
    assert hub.flush(budget=3) == 3
    assert eth[0].batches[0].payloads == [b"e1"]
    assert hub.flush(budget=3) == 3
    assert [batch.payloads for batch in ticker[0].batches] == [[b"b1"], [b"b2"]]
    assert not hub.has_pending
    assert hub.flush(budget=3) == 0


def test_a_stream_that_loses_its_subscribers_while_queued_is_skipped() -> None:
    hub = Hub()
    gone, kept = Recorder(), Recorder()
    hub.add(TRADE, gone)
    hub.add(TICKER, kept)
    hub.broadcast(TRADE.name, b"t")
    hub.broadcast(TICKER.name, b"b")
    assert hub.remove(TRADE.name, gone) is True
    hub.add(TRADE, gone)  # back again: only messages published from now on are its
    assert hub.flush(budget=1) == 1
    assert [batch.payloads for batch in kept.batches] == [[b"b"]] and not gone.batches
    hub.broadcast(TRADE.name, b"t2")
    assert hub.flush(budget=1) == 1
    assert [batch.payloads for batch in gone.batches] == [[b"t2"]]


def test_coalescing_subscribers_are_finished_at_the_end_of_each_chunk() -> None:
    hub, multi = hub_with_one_client_on_two_streams()
    hub.flush(budget=1)
    assert multi.finished == 1 and [batch.stream for batch in multi.batches] == [TRADE.name]
    hub.flush(budget=1)
    assert multi.finished == 2 and [batch.stream for batch in multi.batches] == [TRADE.name, TICKER.name]


class RaisesOnce(Recorder):
    """A subscriber whose delivery raises the first time (a bug, a closed socket the session did not expect)."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    def deliver(self, batch: StreamBatch) -> bool:
        if not self.raised:
            self.raised = True
            raise RuntimeError("delivery failed")
        return super().deliver(batch)


def test_a_subscriber_on_several_streams_is_finished_even_when_another_delivery_raises() -> None:
    hub, multi = hub_with_one_client_on_two_streams()
    failing = RaisesOnce()
    hub.add(TICKER, failing)  # handed the second stream's batch after `multi` collected its first part
    with pytest.raises(RuntimeError):
        hub.flush()
    # Before the fix the raise lost the list of subscribers to finish: `multi` kept its part and was never finished.
    assert multi.finished == 1
    hub.broadcast(TRADE.name, b"t2")
    hub.broadcast(TICKER.name, b"b2")
    hub.flush()
    assert multi.finished == 2
    assert [batch.payloads for batch in multi.batches][-2:] == [[b"t2"], [b"b2"]]
