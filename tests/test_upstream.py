"""BinanceSource against the local fake Binance (real sockets): subscriptions, verbatim payloads, demand
changes, reconnects, serverShutdown, garbage, stalls, spreading over connections, the control-rate limit
and exchangeInfo over REST."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ingest.sources.binance.source import (
    REASON_CLOSED,
    REASON_CONNECT_FAILED,
    REASON_MALFORMED,
    REASON_STALL,
    ROTATE_SERVER_SHUTDOWN,
    BinanceSource,
)
from shared.backoff import backoff_delays
from shared.broker.contract import OutgoingMessage
from shared.errors import ConfigError, UpstreamError
from tests.fake_binance import FakeBinance
from tests.polling import eventually

pytestmark = pytest.mark.timeout(30)


class Collector:
    """The publish callback: keeps every batch."""

    def __init__(self) -> None:
        self.batches: list[list[OutgoingMessage]] = []

    async def publish(self, batch: Sequence[OutgoingMessage]) -> None:
        self.batches.append(list(batch))

    @property
    def messages(self) -> list[OutgoingMessage]:
        return [message for batch in self.batches for message in batch]

    def payloads(self, stream: str) -> list[bytes]:
        return [message.payload for message in self.messages if message.stream == stream]

    def count(self, stream: str) -> int:
        return len(self.payloads(stream))

    def streams(self) -> set[str]:
        return {message.stream for message in self.messages}


@contextlib.asynccontextmanager
async def running(source: BinanceSource) -> AsyncIterator[Collector]:
    collector = Collector()
    task = asyncio.create_task(source.run(collector.publish))
    try:
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert source.connected == 0


class RecordedBackoff:
    """The source's reconnect schedule drawn as in production but not slept: each delay it hands out is recorded
    and replaced by zero, so a test sees the schedule without waiting it out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self) -> Iterator[float]:
        for delay in backoff_delays():
            self.delays.append(delay)
            yield 0.0


def source_for(fake: FakeBinance, **kwargs: Any) -> BinanceSource:
    return BinanceSource(fake.ws_url, fake.rest_url, **kwargs)


def assert_run(received: Sequence[bytes], sent: Sequence[bytes]) -> None:
    """``received`` is a contiguous run of what the exchange ``sent``: nothing lost, repeated or reordered."""
    assert received, "nothing received"
    start = list(sent).index(received[0])
    assert list(received) == list(sent[start : start + len(received)])


async def test_publishes_wanted_streams_verbatim_and_in_order() -> None:
    async with FakeBinance(spaced_payloads=True, data_interval_s=0.02) as fake:
        source = source_for(fake, always_on=["BTCUSDT@trade"])
        source.set_wanted(frozenset({"ethusdt@bookTicker", "btcusdt@kline_1m"}))
        async with running(source) as collector:
            streams = ("btcusdt@trade", "ethusdt@bookTicker", "btcusdt@kline_1m")
            await eventually(lambda: all(collector.count(s) >= 5 for s in streams), what="5 messages per stream")
        assert fake.connections[0].path == "/stream"
        assert fake.connection_attempts == 1
        subscribe = fake.connections[0].control_messages[0]
        assert subscribe["method"] == "SUBSCRIBE"
        assert set(subscribe["params"]) == set(streams)
        for stream in streams:
            received = collector.payloads(stream)
            # Byte-identical (the fake's payloads have spaces a re-encode would remove), none lost or reordered.
            assert received == fake.sent[stream][: len(received)]
            assert b", " in received[0]
        trade_ids = [orjson.loads(p)["t"] for p in collector.payloads("btcusdt@trade")]
        assert trade_ids == list(range(trade_ids[0], trade_ids[0] + len(trade_ids)))
        kinds = {m.stream: m.keep_last for m in collector.messages}
        assert kinds == {"btcusdt@trade": False, "ethusdt@bookTicker": True, "btcusdt@kline_1m": True}
        assert source.messages_published == len(collector.messages)
        assert source.malformed_frames == 0
        assert sum(source.reconnects.values()) == 0


async def test_set_wanted_adds_and_removes_upstream_subscriptions() -> None:
    async with FakeBinance() as fake:
        source = source_for(fake)
        source.set_wanted(frozenset({"btcusdt@trade"}))
        async with running(source) as collector:
            await eventually(lambda: fake.subscribed() == {"btcusdt@trade"}, what="first subscription")
            source.set_wanted(frozenset({"btcusdt@trade", "ethusdt@aggTrade"}))
            await eventually(lambda: collector.count("ethusdt@aggTrade") > 0, what="added stream's data")
            assert fake.subscribed() == {"btcusdt@trade", "ethusdt@aggTrade"}

            source.set_wanted(frozenset({"ethusdt@aggTrade"}))
            await eventually(lambda: fake.subscribed() == {"ethusdt@aggTrade"}, what="unsubscribe")
            await asyncio.sleep(0.1)  # whatever was in flight has been published or dropped by now
            removed_count = collector.count("btcusdt@trade")
            kept_count = collector.count("ethusdt@aggTrade")
            await asyncio.sleep(0.3)
            assert collector.count("btcusdt@trade") == removed_count
            assert collector.count("ethusdt@aggTrade") > kept_count

            source.set_wanted(frozenset())  # nothing wanted: the connection is closed
            await eventually(lambda: source.connected == 0 and not fake.open_connections, what="close")
        methods = [(m["method"], m["params"]) for m in fake.connections[0].control_messages]
        assert methods == [
            ("SUBSCRIBE", ["btcusdt@trade"]),
            ("SUBSCRIBE", ["ethusdt@aggTrade"]),
            ("UNSUBSCRIBE", ["btcusdt@trade"]),
        ]
        assert len(fake.connections) == 1


async def test_reconnects_and_resubscribes_after_a_drop() -> None:
    async with FakeBinance() as fake:
        backoff = RecordedBackoff()
        source = source_for(fake, always_on=["btcusdt@trade"], backoff=backoff)
        source.set_wanted(frozenset({"ethusdt@depth5"}))
        async with running(source) as collector:
            await eventually(lambda: collector.count("ethusdt@depth5") > 0, what="data")
            assert fake.drop_all() == 1
            await eventually(lambda: source.reconnects[REASON_CLOSED] == 1, what="reconnect counted")
            await eventually(
                lambda: (
                    len(fake.open_connections) == 1
                    and fake.open_connections[0].subscriptions == {"btcusdt@trade", "ethusdt@depth5"}
                ),
                what="resubscribed on a new connection",
            )
            before = collector.count("btcusdt@trade")
            await eventually(lambda: collector.count("btcusdt@trade") > before + 2, what="data after reconnect")
        assert fake.connection_attempts == 2
        assert source.connections_opened == 2
        assert fake.connections[0].close_reason == "dropped"
        assert len(backoff.delays) == 1  # one drop, one delay


async def test_server_shutdown_replaces_the_connection_make_before_break() -> None:
    async with FakeBinance(keep_trading=True, data_interval_s=0.02) as fake:
        source = source_for(fake)
        source.set_wanted(frozenset({"btcusdt@bookTicker", "btcusdt@aggTrade"}))
        async with running(source) as collector:
            await eventually(lambda: collector.count("btcusdt@aggTrade") > 5, what="data")
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await fake.send_server_shutdown() == 1
            await eventually(
                lambda: (
                    len(fake.open_connections) == 1
                    and fake.open_connections[0].number == 1
                    and fake.open_connections[0].subscriptions == {"btcusdt@bookTicker", "btcusdt@aggTrade"}
                ),
                what="the successor alone, subscribed",
            )
            assert loop.time() - started < 2.0
            before = collector.count("btcusdt@aggTrade")
            await eventually(lambda: collector.count("btcusdt@aggTrade") > before + 5, what="data after the switch")
        assert source.rotations == {ROTATE_SERVER_SHUTDOWN: 1}
        assert sum(source.reconnects.values()) == 0
        old, new = fake.connections[0], fake.connections[1]
        assert new.opened_at < (old.closed_at or 0), "the successor was not open before the old one closed"
        assert old.close_reason == "client"  # we closed it, Binance did not have to
        # Every aggregate trade exactly once, in order, across the switch (the fake kept trading throughout).
        assert_run(collector.payloads("btcusdt@aggTrade"), fake.sent["btcusdt@aggTrade"])
        assert not any(m.stream == "!serverShutdown" for m in collector.messages)


async def test_malformed_frames_are_skipped_counted_and_the_connection_replaced() -> None:
    async with FakeBinance(keep_trading=True, data_interval_s=0.02) as fake:
        source = source_for(fake)
        source.set_wanted(frozenset({"btcusdt@trade"}))
        async with running(source) as collector:
            await eventually(lambda: collector.count("btcusdt@trade") > 0, what="data")
            sent = await fake.send_garbage()
            assert sent == 6
            await eventually(lambda: source.malformed_frames == sent, what="garbage counted")
            await eventually(lambda: [c.number for c in fake.open_connections] == [1], what="replaced")
            before = collector.count("btcusdt@trade")
            await eventually(lambda: collector.count("btcusdt@trade") > before + 3, what="data after garbage")
        for message in collector.messages:
            assert message.stream == "btcusdt@trade"
            orjson.loads(message.payload)
        assert source.rotations == {REASON_MALFORMED: 1}
        assert sum(source.reconnects.values()) == 0
        assert_run(collector.payloads("btcusdt@trade"), fake.sent["btcusdt@trade"])


async def test_stalled_connection_is_replaced() -> None:
    async with FakeBinance(ping_interval_s=0.3) as fake:
        source = source_for(fake, stall_timeout_s=0.5)
        source.set_wanted(frozenset({"btcusdt@trade"}))
        async with running(source) as collector:
            await eventually(lambda: collector.count("btcusdt@trade") > 0, what="data")
            await asyncio.sleep(0.6)
            assert sum(source.reconnects.values()) == 0
            fake.stall(1.0)
            await eventually(lambda: source.reconnects[REASON_STALL] >= 1, what="stall detected")
            before = collector.count("btcusdt@trade")
            await eventually(lambda: collector.count("btcusdt@trade") > before, timeout=5, what="data again")


async def test_failed_handshakes_are_retried_with_backoff() -> None:
    async with FakeBinance() as fake:
        fake.fail_next_connections(2, status=503)
        backoff = RecordedBackoff()
        source = source_for(fake, backoff=backoff)
        source.set_wanted(frozenset({"btcusdt@trade"}))
        async with running(source) as collector:
            await eventually(lambda: collector.count("btcusdt@trade") > 0, what="data after failures")
        assert source.reconnects == {REASON_CONNECT_FAILED: 2}
        assert fake.connection_attempts == 3
        # One schedule across consecutive failures, so the delays grow (nominal 0.1 s then 0.2 s, jittered down).
        assert len(backoff.delays) == 2 and backoff.delays[0] <= backoff.delays[1]


async def test_streams_beyond_the_cap_spread_over_connections() -> None:
    streams = frozenset(f"{symbol}@trade" for symbol in ("aaausdt", "bbbusdt", "cccusdt", "dddusdt", "eeeusdt"))
    async with FakeBinance(max_streams_per_connection=2) as fake:
        source = source_for(fake, max_streams_per_connection=2)
        source.set_wanted(streams)
        async with running(source) as collector:
            await eventually(lambda: all(collector.count(s) > 0 for s in streams), what="every stream's data")
            assert sorted(fake.subscription_counts()) == [1, 2, 2]
            assert fake.subscribed() == streams
            assert source.connected == 3

            # Dropping streams keeps the survivors where they are and closes the connection left empty.
            groups = source.connection_streams
            survivors = frozenset(groups[0] | groups[1])
            source.set_wanted(survivors)
            await eventually(lambda: len(fake.open_connections) == 2, what="third connection closed")
            assert fake.subscribed() == survivors
            assert source.connection_streams == groups[:2]
        assert all(c.max_subscriptions <= 2 for c in fake.connections)
        assert all(c.close_reason in ("client", None) for c in fake.connections)


async def test_never_exceeds_the_control_rate_limit() -> None:
    # 16 streams, 2 per SUBSCRIBE: 8 control messages plus pongs to pings every 0.5 s against the fake's
    # 5 messages/s limit, which would disconnect us. Pongs are charged to the pacer's 3/s budget, so control
    # messages go out at about 1/s here.
    streams = frozenset(f"s{i:02d}usdt@trade" for i in range(16))
    async with FakeBinance(ping_interval_s=0.5, data_interval_s=0.1) as fake:
        source = source_for(fake, max_params_per_message=2)
        source.set_wanted(streams)
        async with running(source):
            await eventually(lambda: fake.subscribed() == streams, timeout=10, what="all subscribed")
            await asyncio.sleep(0.3)
        connection = fake.connections[0]
        assert len(fake.connections) == 1, [c.close_reason for c in fake.connections]
        assert connection.close_reason == "client"
        assert len(connection.control_messages) == 8
        assert connection.pongs_received >= 1
        assert sum(source.reconnects.values()) == 0


async def test_the_fake_enforces_binance_limits() -> None:
    """The limit tests above mean something only if the fake really disconnects offenders."""
    async with FakeBinance(ping_interval_s=10) as fake:
        async with connect(fake.ws_url + "/ws") as ws:
            with pytest.raises(ConnectionClosed):
                for request_id in range(10):
                    await ws.send(orjson.dumps({"method": "LIST_SUBSCRIPTIONS", "id": request_id}).decode())
                while True:
                    await ws.recv()
        async with connect(fake.ws_url + "/stream") as ws:
            params = [f"s{i}usdt@trade" for i in range(1025)]
            await ws.send(orjson.dumps({"method": "SUBSCRIBE", "params": params, "id": 1}).decode())
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv()
        assert [c.close_reason for c in fake.connections] == ["rate_limit", "too_many_streams"]


async def test_a_refused_batch_is_retried_stream_by_stream() -> None:
    async with FakeBinance(reject_unknown_symbols=True) as fake:
        source = source_for(fake)
        source.set_wanted(frozenset({"btcusdt@trade", "nosuchusdt@trade", "ethusdt@trade"}))
        async with running(source) as collector:
            await eventually(
                lambda: collector.count("btcusdt@trade") > 0 and collector.count("ethusdt@trade") > 0,
                what="the valid streams' data",
            )
            await eventually(lambda: source.rejected_streams == {"nosuchusdt@trade"}, what="rejection")
        assert fake.subscribed() == set()  # closed by now
        assert source.control_errors == 2  # the batch, then the culprit alone
        assert sum(source.reconnects.values()) == 0


async def test_exchange_info() -> None:
    async with FakeBinance(symbols=["BTCUSDT", "ETHUSDT"]) as fake:
        source = source_for(fake)
        document = orjson.loads(await source.exchange_info())
        assert [s["symbol"] for s in document["symbols"]] == ["BTCUSDT", "ETHUSDT"]
        assert document["symbols"][0]["filters"][0]["filterType"] == "PRICE_FILTER"
        only = orjson.loads(await source.exchange_info(["ethusdt"]))
        assert [s["symbol"] for s in only["symbols"]] == ["ETHUSDT"]
        with pytest.raises(UpstreamError, match="HTTP 400"):
            await source.exchange_info(["NOSUCHUSDT"])
        assert fake.rest_requests[0] == "/api/v3/exchangeInfo"
        port = fake.rest_url.rsplit(":", 1)[1]
    with pytest.raises(UpstreamError, match="failed"):
        await BinanceSource(rest_url=f"http://127.0.0.1:{port}", connect_timeout_s=2).exchange_info()


def test_configuration_errors_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="always_on"):
        BinanceSource(always_on=["btcusdt@nonsense"])
    with pytest.raises(ConfigError, match="ws_url"):
        BinanceSource("http://example.invalid")
    with pytest.raises(ConfigError, match="control_rate_per_s"):
        BinanceSource(control_rate_per_s=6)
    with pytest.raises(ConfigError, match="max_streams_per_connection"):
        BinanceSource(max_streams_per_connection=2000)
    source = BinanceSource()
    source.set_wanted(frozenset({"btcusdt@trade", "not a stream"}))
    assert source.wanted == {"btcusdt@trade"}


async def test_a_failing_publish_stops_run_with_its_error() -> None:
    async with FakeBinance() as fake:
        source = source_for(fake)
        source.set_wanted(frozenset({"btcusdt@trade"}))

        async def publish(batch: Sequence[OutgoingMessage]) -> None:
            raise RuntimeError("broker is gone")

        with pytest.raises(RuntimeError, match="broker is gone"):
            await asyncio.wait_for(source.run(publish), 5)
        assert source.connected == 0
        await eventually(lambda: not fake.open_connections, what="upstream connection closed")
