"""BinanceSource within Binance's limits and across connection lifetimes, against the fake exchange (real sockets;
the fake enforces the limits and disconnects or refuses like Binance): 3 000 streams over several connections
without exceeding streams per connection, control messages per second (pongs included) or connection attempts;
attempts paced under the window limit through a reconnect storm; connections rotated by age make-before-break
with every event delivered exactly once, in order."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import orjson
import pytest

from ingest.sources.binance.rotation import REASON_AGE
from ingest.sources.binance.source import BinanceSource
from tests.fake_binance import FakeBinance
from tests.polling import eventually
from tests.test_upstream import running

pytestmark = pytest.mark.timeout(60)


def fast_backoff() -> Iterator[float]:
    while True:
        yield 0.01


@pytest.mark.parametrize("per_connection", [1024, 600])
async def test_3000_streams_stay_within_every_binance_limit(per_connection: int) -> None:
    streams = frozenset(f"s{index:04d}usdt@trade" for index in range(3000))
    connections_needed = -(-len(streams) // per_connection)
    # Pings every second (Binance: 20 s): the pongs they force count against the same 5 messages/s as SUBSCRIBEs.
    async with FakeBinance(
        ping_interval_s=1.0, data_interval_s=1.0, max_connection_attempts=connections_needed
    ) as fake:
        source = BinanceSource(fake.ws_url, fake.rest_url, max_streams_per_connection=per_connection)
        source.set_wanted(streams)
        async with running(source) as collector:
            await eventually(lambda: fake.subscribed() == streams, timeout=20, what="all 3000 subscribed")
            await eventually(lambda: collector.streams() == streams, timeout=10, what="data from every stream")
            assert source.connected == connections_needed == len(fake.open_connections)
        # The fake disconnects on any breach (rate_limit, too_many_streams) and refuses extra attempts (429).
        assert [c.close_reason for c in fake.connections] == ["client"] * connections_needed
        assert fake.connection_attempts == connections_needed and fake.attempts_refused == 0
        for connection in fake.connections:
            assert connection.max_subscriptions <= per_connection
            assert connection.max_inbound_per_s < 5, connection.max_inbound_per_s  # under the limit, not at it
            assert connection.pongs_received >= 1
            subscribes = [m for m in connection.control_messages if m["method"] == "SUBSCRIBE"]
            assert subscribes and all(len(m["params"]) <= 200 for m in subscribes)  # batched, bounded
            assert len(subscribes) == -(-connection.max_subscriptions // 200)
        assert sum(source.reconnects.values()) == 0


async def test_connection_attempts_are_paced_through_a_reconnect_storm() -> None:
    # Binance: 300 attempts per 5 minutes per IP. Scaled down: 3 per 2 s, enforced by the fake with a 429.
    async with FakeBinance(max_connection_attempts=3, attempt_window_s=2.0, data_interval_s=0.02) as fake:
        source = BinanceSource(
            fake.ws_url, fake.rest_url, connect_attempts=3, connect_window_s=2.0, backoff=fast_backoff
        )
        source.set_wanted(frozenset({"btcusdt@trade"}))
        async with running(source) as collector:
            for _ in range(6):  # a flapping network: every connection dies as soon as data flows
                count = len(collector.messages)
                await eventually(lambda: len(collector.messages) > count, timeout=5, what="data")  # noqa: B023
                fake.drop_all()
            await eventually(
                lambda: fake.connection_attempts == 7 and len(fake.open_connections) == 1,
                timeout=5,
                what="reconnected",
            )
        assert fake.connection_attempts == 7 and fake.attempts_refused == 0
        times = fake.attempt_times
        assert all(sum(1 for t in times if start <= t < start + 2.0) <= 3 for start in times)
        assert source.connect_wait_s > 0


async def test_rotation_by_age_is_make_before_break_and_gap_free() -> None:
    streams = {"btcusdt@trade", "ethusdt@aggTrade", "btcusdt@depth@100ms", "ethusdt@bookTicker", "btcusdt@kline_1m"}
    async with FakeBinance(keep_trading=True, data_interval_s=0.01, ping_interval_s=0.5) as fake:
        source = BinanceSource(fake.ws_url, fake.rest_url, rotate_after_s=0.6, backoff=fast_backoff)
        source.set_wanted(frozenset(streams))
        async with running(source) as collector:
            await eventually(lambda: source.rotations[REASON_AGE] >= 3, timeout=10, what="three rotations")
            count = len(collector.messages)
            await eventually(lambda: len(collector.messages) > count + 50, what="data after the last rotation")
        assert sum(source.reconnects.values()) == 0 and source.rotation_timeouts == 0
        assert source.duplicates_dropped > 0  # the overlaps delivered events twice; each went out once
        for older, newer in zip(fake.connections, fake.connections[1:], strict=False):
            assert newer.opened_at < (older.closed_at or 0), "a successor opened only after its predecessor closed"
            assert older.close_reason == "client"
        # Every event of every stream exactly once and in order, across all rotations (the fake traded on).
        for stream in streams:
            received = collector.payloads(stream)
            sent = fake.sent[stream]
            start = sent.index(received[0])
            assert received == sent[start : start + len(received)], stream
        depth = [orjson.loads(p) for p in collector.payloads("btcusdt@depth@100ms")]
        assert all(b["U"] == a["u"] + 1 for a, b in itertools.pairwise(depth))
