"""Hub and outbox: fan-out without awaiting, frames built once, bounded buffers, conflation, overflow."""

from __future__ import annotations

from gateway.hub import Hub, Outbox
from shared.streams import parse_stream

TRADE = parse_stream("btcusdt@trade")
TICKER = parse_stream("btcusdt@bookTicker")
ETH_TICKER = parse_stream("ethusdt@bookTicker")


def test_first_and_last_subscriber_are_reported() -> None:
    hub = Hub()
    a, b = Outbox(1000, combined=False), Outbox(1000, combined=False)
    assert hub.add(TRADE, a) is True
    assert hub.add(TRADE, b) is False
    assert hub.remove(TRADE.name, a) is False
    assert hub.remove(TRADE.name, b) is True
    assert hub.streams() == []


def test_one_frame_object_per_variant_is_shared_by_all_subscribers() -> None:
    hub = Hub()
    raw = [Outbox(10_000, combined=False) for _ in range(3)]
    combined = [Outbox(10_000, combined=True) for _ in range(3)]
    for outbox in raw + combined:
        hub.add(TRADE, outbox)
    payload = b'{"e":"trade","s":"BTCUSDT"}'
    assert hub.broadcast(TRADE.name, payload) == 6
    raw_frames = [outbox.take()[0] for outbox in raw]
    combined_frames = [outbox.take()[0] for outbox in combined]
    assert all(frame is payload for frame in raw_frames)
    assert combined_frames[0] == b'{"stream":"btcusdt@trade","data":{"e":"trade","s":"BTCUSDT"}}'
    assert all(frame is combined_frames[0] for frame in combined_frames)


def test_dirty_list_has_each_outbox_once_per_flush() -> None:
    hub = Hub()
    flushed: list[Outbox] = []
    outbox = Outbox(10_000, combined=False, flush=flushed.append)
    hub.add(TRADE, outbox)
    for _ in range(5):
        hub.broadcast(TRADE.name, b"{}")
    assert hub.dirty == [outbox]
    assert hub.flush_dirty() == 1
    assert flushed == [outbox]
    assert len(outbox.take()) == 5
    assert hub.dirty == []


def test_state_streams_conflate_to_newest_when_full() -> None:
    outbox = Outbox(100, combined=False)
    for index in range(20):
        outbox.push(TICKER.name, True, b'{"u":%03d}' % index)  # 11 bytes each
        outbox.push(ETH_TICKER.name, True, b'{"v":%03d}' % index)
    frames = outbox.take()
    assert not outbox.overflowed
    # The newest value of each stream survives; total bytes never exceeded the limit.
    assert frames[-2:] == [b'{"u":019}', b'{"v":019}'] or frames[-2:] == [b'{"v":019}', b'{"u":019}']
    assert sum(len(frame) for frame in frames) <= 100
    assert outbox.conflated > 0


def test_event_stream_overflow_marks_outbox_for_close() -> None:
    hub = Hub()
    outbox = Outbox(100, combined=False)
    hub.add(TRADE, outbox)
    for _ in range(20):
        hub.broadcast(TRADE.name, b'{"e":"trade","t":1}')
    assert outbox.overflowed
    assert outbox.size <= 100
    assert outbox in hub.dirty  # the I/O layer gets to see it and close the client


def test_conflation_keeps_event_frames_in_order() -> None:
    outbox = Outbox(60, combined=False)
    outbox.push(TRADE.name, False, b"T1")
    for index in range(10):
        outbox.push(TICKER.name, True, b"bookticker-%02d" % index)  # 14 bytes
    outbox.push(TRADE.name, False, b"T2")
    frames = outbox.take()
    assert [frame for frame in frames if frame.startswith(b"T")] == [b"T1", b"T2"]
    assert frames.count(b"bookticker-09") == 1


def test_memory_is_bounded_per_client_under_endless_state_traffic() -> None:
    hub = Hub()
    stuck = Outbox(4096, combined=True)
    for stream in (TICKER, ETH_TICKER):
        hub.add(stream, stuck)
    for index in range(10_000):
        hub.broadcast(TICKER.name, b'{"u":%d,"s":"BTCUSDT"}' % index)
        hub.broadcast(ETH_TICKER.name, b'{"u":%d,"s":"ETHUSDT"}' % index)
        assert stuck.size <= 4096
    assert not stuck.overflowed


def test_subscriptions_by_kind_counts_clients() -> None:
    hub = Hub()
    for _ in range(3):
        hub.add(TRADE, Outbox(100, combined=False))
    hub.add(TICKER, Outbox(100, combined=False))
    counts = hub.subscriptions_by_kind()
    assert counts[TRADE.kind] == 3
    assert counts[TICKER.kind] == 1
