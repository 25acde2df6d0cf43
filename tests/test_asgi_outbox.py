"""The ASGI fallback's outbox: bounded in bytes, conflating state streams, event streams in order. Pure."""

from __future__ import annotations

from gateway.ws.asgi_outbox import Outbox
from shared.streams import parse_stream

TRADE = parse_stream("btcusdt@trade")
TICKER = parse_stream("btcusdt@bookTicker")
ETH_TICKER = parse_stream("ethusdt@bookTicker")


def test_state_streams_conflate_to_newest_when_full() -> None:
    outbox = Outbox(100)
    for index in range(20):
        outbox.push(TICKER.name, True, b'{"u":%03d}' % index)  # 11 bytes each
        outbox.push(ETH_TICKER.name, True, b'{"v":%03d}' % index)
    frames = outbox.take()
    assert not outbox.overflowed
    assert b'{"u":019}' in frames[-2:] and b'{"v":019}' in frames[-2:]
    assert sum(len(frame) for frame in frames) <= 100
    assert outbox.conflated > 0


def test_event_stream_overflow_marks_outbox_for_close() -> None:
    outbox = Outbox(100)
    for _ in range(20):
        outbox.push(TRADE.name, False, b'{"e":"trade","t":1}')
    assert outbox.overflowed
    assert outbox.size <= 100


def test_conflation_keeps_event_frames_in_order() -> None:
    outbox = Outbox(60)
    outbox.push(TRADE.name, False, b"T1")
    for index in range(10):
        outbox.push(TICKER.name, True, b"bookticker-%02d" % index)  # 14 bytes
    outbox.push(TRADE.name, False, b"T2")
    frames = outbox.take()
    assert [frame for frame in frames if frame.startswith(b"T")] == [b"T1", b"T2"]
    assert frames.count(b"bookticker-09") == 1


def test_outbox_memory_is_bounded_under_endless_state_traffic() -> None:
    outbox = Outbox(4096)
    for index in range(10_000):
        outbox.push(TICKER.name, True, b'{"u":%d,"s":"BTCUSDT"}' % index)
        outbox.push(ETH_TICKER.name, True, b'{"u":%d,"s":"ETHUSDT"}' % index)
        assert outbox.size <= 4096
    assert not outbox.overflowed
