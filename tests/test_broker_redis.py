"""The broker contract, run against the in-memory and the Redis broker alike, plus what only Redis can show:
exact envelope bytes on the wire, one round trip per batch, epoch reset after data loss, reconnects after a
killed or half-open subscription connection, loud failure of the reader, and a clear error at start."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from shared.broker.contract import Broker, OutgoingMessage
from shared.broker.memory import MemoryBroker
from shared.broker.redis import BATCH_CALL_MESSAGES, RedisBroker
from shared.broker.redis_subscription import RedisSubscription
from shared.errors import BrokerError, PublishIncomplete
from shared.frames import Publication, encode_publication
from shared.streams import ChannelNamer
from tests.polling import eventually
from tests.redis_server import PrivateRedis
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(20)

MAXLEN = 5
TRADE = "btcusdt@trade"
OTHER = "ethusdt@trade"
TICKER = "btcusdt@bookTicker"


@dataclass
class Recorder:
    """A BrokerListener that remembers everything, in order."""

    publications: list[tuple[str, Publication]] = field(default_factory=list)
    heartbeats: list[int] = field(default_factory=list)
    reconnects: int = 0
    connected_at_reconnect: list[bool] = field(default_factory=list)
    broker: Broker | None = None

    def on_publication(self, stream: str, publication: Publication) -> None:
        self.publications.append((stream, publication))

    def on_heartbeat(self, published_at_ms: int) -> None:
        self.heartbeats.append(published_at_ms)

    def on_broker_reconnect(self) -> None:
        self.reconnects += 1
        if self.broker is not None:
            self.connected_at_reconnect.append(self.broker.connected)

    def payloads(self, stream: str) -> list[bytes]:
        return [p.payload for s, p in self.publications if s == stream]


def messages(stream: str, *payloads: bytes, keep_last: bool = False) -> list[OutgoingMessage]:
    return [OutgoingMessage(stream, payload, keep_last) for payload in payloads]


async def delete_keys(url: str, prefix: str) -> None:
    client = aioredis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def redis_broker(
    url: str, prefix: str, cleanup_url: str | None = None, **options: Any
) -> AsyncIterator[RedisBroker]:
    """A started RedisBroker; afterwards closed and its keys deleted (through ``cleanup_url`` if given)."""
    broker = RedisBroker(url, prefix=prefix, **options)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()
        await delete_keys(cleanup_url or url, prefix)


def int_of(value: bytes | str | None) -> int:
    assert value is not None
    return int(value)


@pytest.fixture
async def plain_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


# ---------------------------------------------------------------------------------------------------------------
# Conformance: the same tests for MemoryBroker and RedisBroker
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
async def memory_broker() -> AsyncIterator[Broker]:
    broker = MemoryBroker(history_maxlen=MAXLEN)
    await broker.start()
    yield broker
    await broker.close()


@pytest.fixture
async def redis_backed_broker(redis_url: str, key_prefix: str) -> AsyncIterator[Broker]:
    async with redis_broker(redis_url, key_prefix, history_maxlen=MAXLEN) as broker:
        yield broker


@pytest.fixture(params=["memory", "redis"])
def broker(request: pytest.FixtureRequest) -> Broker:
    """Each conformance test runs once per backend. (A sync dispatcher: an async fixture cannot call
    getfixturevalue on another async fixture, and only the Redis variant needs Redis.)"""
    name = "memory_broker" if request.param == "memory" else "redis_backed_broker"
    backend: Broker = request.getfixturevalue(name)
    return backend


@pytest.fixture
def recorder(broker: Broker) -> Recorder:
    listener = Recorder(broker=broker)
    broker.set_listener(listener)
    return listener


async def test_connected_after_start(broker: Broker) -> None:
    assert broker.connected


async def test_seq_starts_at_one_and_increments_per_channel_with_a_stable_epoch(broker: Broker) -> None:
    first = await broker.publish(
        [
            OutgoingMessage(TRADE, b"t1", False),
            OutgoingMessage(OTHER, b"o1", False),
            OutgoingMessage(TRADE, b"t2", False),
        ]
    )
    second = await broker.publish(messages(TRADE, b"t3") + messages(OTHER, b"o2"))
    assert [(p.seq, p.payload) for p in first] == [(1, b"t1"), (1, b"o1"), (2, b"t2")]
    assert [(p.seq, p.payload) for p in second] == [(3, b"t3"), (2, b"o2")]
    trade_epochs = {first[0].epoch, first[2].epoch, second[0].epoch}
    assert len(trade_epochs) == 1 and first[1].epoch == second[1].epoch
    assert await broker.publish([]) == []


async def test_history_returns_the_slice_after_a_seq_in_order_bounded_by_maxlen(broker: Broker) -> None:
    published = await broker.publish(messages(TRADE, *[b"p%d" % n for n in range(1, 13)]))
    everything = await broker.history(TRADE, 0)
    assert everything == published[-MAXLEN:]
    assert [p.seq for p in everything] == [8, 9, 10, 11, 12]
    assert [p.payload for p in await broker.history(TRADE, 9)] == [b"p10", b"p11", b"p12"]
    assert await broker.history(TRADE, 12) == []
    assert await broker.history("never@trade", 0) == []


async def test_history_is_per_channel(broker: Broker) -> None:
    await broker.publish(messages(TRADE, b"a", b"b") + messages(OTHER, b"x"))
    assert [p.payload for p in await broker.history(OTHER, 0)] == [b"x"]


async def test_last_value_is_kept_only_for_state_streams(broker: Broker) -> None:
    await broker.publish(messages(TRADE, b"trade-1", b"trade-2"))
    assert await broker.last_value(TRADE) is None
    published = await broker.publish(messages(TICKER, b"tick-1", b"tick-2", keep_last=True))
    assert await broker.last_value(TICKER) == published[-1]
    assert await broker.last_value("never@bookTicker") is None


async def test_demand_keeps_the_latest_expiry_and_forgets_expired_streams(broker: Broker) -> None:
    assert await broker.read_demand(0.0) == set()
    await broker.announce_demand([TRADE, OTHER], 100.0)
    await broker.announce_demand([TRADE], 50.0)  # an earlier expiry never shortens interest
    await broker.announce_demand([TICKER], 200.0)
    await broker.announce_demand([], 1000.0)
    assert await broker.read_demand(99.0) == {TRADE, OTHER, TICKER}
    assert await broker.read_demand(100.0) == {TICKER}  # expiry <= now is expired
    await broker.announce_demand([TRADE], 150.0)
    assert await broker.read_demand(120.0) == {TRADE, TICKER}
    assert await broker.read_demand(500.0) == set()


async def test_exchange_info_round_trips_as_bytes(broker: Broker) -> None:
    assert await broker.get_exchange_info() is None
    document = b'{"timezone":"UTC","symbols":[{"symbol":"BTCUSDT"}]}'
    await broker.put_exchange_info(document)
    assert await broker.get_exchange_info() == document


async def test_listener_receives_subscribed_streams_only_and_in_order(broker: Broker, recorder: Recorder) -> None:
    await broker.subscribe([TRADE])
    await broker.publish(
        messages(TRADE, b"a1")
        + messages(OTHER, b"b1")
        + messages(TRADE, b"a2", b"a3")
        + messages(OTHER, b"b2")
        + messages(TRADE, b"a4")
    )
    await eventually(lambda: len(recorder.publications) >= 4, what="4 publications")
    assert [(s, p.seq, p.payload) for s, p in recorder.publications] == [
        (TRADE, 1, b"a1"),
        (TRADE, 2, b"a2"),
        (TRADE, 3, b"a3"),
        (TRADE, 4, b"a4"),
    ]


async def test_unsubscribe_stops_delivery(broker: Broker, recorder: Recorder) -> None:
    await broker.subscribe([TRADE, OTHER])
    await broker.subscribe([TRADE])  # idempotent
    await broker.publish(messages(TRADE, b"a1") + messages(OTHER, b"b1"))
    await eventually(lambda: len(recorder.publications) == 2, what="both streams")
    await broker.unsubscribe([TRADE])
    await broker.unsubscribe([TICKER])  # never subscribed: harmless
    await broker.publish(messages(TRADE, b"a2") + messages(OTHER, b"b2"))
    # OTHER's b2 was published after TRADE's a2 on the same connection, so once b2 is here a2 would be too.
    await eventually(lambda: recorder.payloads(OTHER) == [b"b1", b"b2"], what="b2")
    assert recorder.payloads(TRADE) == [b"a1"]
    await broker.subscribe([TRADE])
    await broker.publish(messages(TRADE, b"a3"))
    await eventually(lambda: recorder.payloads(TRADE) == [b"a1", b"a3"], what="a3 after resubscribing")


async def test_heartbeat_is_delivered(broker: Broker, recorder: Recorder) -> None:
    await broker.publish_heartbeat(1_700_000_000_123)
    await eventually(lambda: recorder.heartbeats == [1_700_000_000_123], what="heartbeat")


async def test_close_reports_disconnected(broker: Broker) -> None:
    await broker.close()
    assert not broker.connected


# ---------------------------------------------------------------------------------------------------------------
# Redis only
# ---------------------------------------------------------------------------------------------------------------


async def test_published_envelope_bytes_equal_encode_publication(
    redis_url: str, key_prefix: str, plain_redis: aioredis.Redis
) -> None:
    namer = ChannelNamer(key_prefix, "binance")
    keys = namer.keys(TICKER)
    pubsub = plain_redis.pubsub()
    await pubsub.subscribe(keys.channel)
    try:
        async with redis_broker(redis_url, key_prefix) as broker:
            payload = b'{"u":400900217,"s":"BNBUSDT","b":"25.35190000","B":"31.21000000"}\xe2\x82\xac'
            before_ms = time.time_ns() // 1_000_000
            (publication,) = await broker.publish(messages(TICKER, payload, keep_last=True))
            after_ms = time.time_ns() // 1_000_000
            expected = encode_publication(
                publication.epoch, publication.seq, publication.published_at_ms, publication.payload
            )
            received = None
            deadline = time.monotonic() + 3
            while received is None and time.monotonic() < deadline:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if message is not None:
                    received = message["data"]
            assert received == expected
            assert before_ms <= publication.published_at_ms <= after_ms
            # History entry ID is <seq>-0 and holds the same bytes; the last value too.
            assert await plain_redis.xrange(keys.history) == [(b"1-0", {b"e": expected})]
            assert await plain_redis.get(keys.last) == expected
            assert int_of(await plain_redis.get(keys.epoch)) == publication.epoch
            assert int_of(await plain_redis.get(keys.seq)) == 1
            # The history key carries the age bound as a TTL; epoch and seq never expire.
            assert 0 < await plain_redis.pttl(keys.history) <= 300_000
            assert await plain_redis.pttl(keys.epoch) == -1
            assert await plain_redis.pttl(keys.seq) == -1
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


class LatencyProxy(TcpProxy):
    """A TCP proxy to Redis that delays every chunk by ``delay_s`` in each direction without serialising
    chunks (like a long link: many chunks can be in flight), and can freeze its current connections to make
    them half-open (bytes stop flowing, sockets stay open) while new connections still pass."""

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        super().__init__(target_port)
        self.delay_s = delay_s
        self._frozen_gates: list[asyncio.Event] = []

    def freeze(self) -> None:
        """Stop forwarding on every connection opened so far."""
        for gate in self._frozen_gates:
            gate.clear()

    def connect(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> None:
        gate = asyncio.Event()
        gate.set()
        self._frozen_gates.append(gate)
        for source, sink in ((client_reader, server_writer), (server_reader, client_writer)):
            self._spawn(self._pump(source, sink, gate))

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, gate: asyncio.Event) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await gate.wait()
                if not data:
                    sink.close()
                    return
                sink.write(data)
                await sink.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await source.read(1 << 20)
                await queue.put((time.monotonic() + self.delay_s, data))
                if not data:
                    break
            await sender
        except (ConnectionError, asyncio.CancelledError):
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender


def redis_port(url: str) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port or 6379


def via_proxy(url: str, proxy: LatencyProxy) -> str:
    return url.replace(f":{redis_port(url)}/", f":{proxy.port}/")


async def test_a_batch_is_one_round_trip_over_a_slow_link(redis_url: str, key_prefix: str) -> None:
    rtt = 0.15
    async with LatencyProxy(redis_port(redis_url), delay_s=rtt / 2) as proxy:
        slow_url = via_proxy(redis_url, proxy)
        async with redis_broker(slow_url, key_prefix, redis_url, health_check_interval_s=60) as broker:
            # The link really is slow: one message costs at least one round trip.
            started = time.monotonic()
            await broker.publish(messages(TRADE, b"warm-up"))
            assert time.monotonic() - started >= rtt * 0.9
            # 1000 messages in under 3 round trips (a round trip per message would take 150 s).
            batch = [OutgoingMessage(f"s{n % 10}usdt@trade", b"m%d" % n, n % 2 == 0) for n in range(1000)]
            started = time.monotonic()
            async with asyncio.timeout(5 * rtt):
                published = await broker.publish(batch)
            elapsed = time.monotonic() - started
    assert elapsed < 3 * rtt, f"1000-message batch took {elapsed:.2f}s over a {rtt}s RTT link"
    assert [p.payload for p in published] == [m.payload for m in batch]
    for channel in range(10):
        seqs = [p.seq for p, m in zip(published, batch, strict=True) if m.stream == f"s{channel}usdt@trade"]
        assert seqs == list(range(1, 101))


async def test_a_large_batch_is_sequenced_in_order_and_delivered_completely(redis_url: str, key_prefix: str) -> None:
    async with redis_broker(redis_url, key_prefix) as broker:
        recorder = Recorder()
        broker.set_listener(recorder)
        await broker.subscribe([TRADE])
        payloads = [b'{"e":"trade","t":%d,"p":"%d.00"}' % (n, n) for n in range(3000)]
        big = b"[" + b"0" * (1 << 20) + b"]"  # bigger than one socket read: split across reads
        published = await broker.publish(messages(TRADE, *payloads, big))
        assert [p.seq for p in published] == list(range(1, 3002))
        await eventually(lambda: len(recorder.publications) == 3001, what="3001 publications")
        assert [p for _, p in recorder.publications] == published
        assert [p.payload for p in await broker.history(TRADE, 0)] == [*payloads, big][-1000:]


async def test_losing_the_epoch_or_seq_key_starts_a_new_epoch_without_stale_history(
    redis_url: str, key_prefix: str, plain_redis: aioredis.Redis
) -> None:
    keys = ChannelNamer(key_prefix, "binance").keys(TICKER)
    async with redis_broker(redis_url, key_prefix) as broker:
        old = await broker.publish(messages(TICKER, b"1", b"2", b"3", keep_last=True))
        # Everything lost (Redis restarted empty).
        await plain_redis.delete(keys.epoch, keys.seq, keys.history, keys.last)
        (fresh,) = await broker.publish(messages(TICKER, b"4", keep_last=True))
        assert (fresh.seq, fresh.payload) == (1, b"4") and fresh.epoch != old[0].epoch
        assert await broker.history(TICKER, 0) == [fresh]
        # Only the epoch key lost (e.g. evicted): seq restarts with a new epoch, old history dropped.
        await broker.publish(messages(TICKER, b"5"))
        await plain_redis.delete(keys.epoch)
        (after_epoch_loss,) = await broker.publish(messages(TICKER, b"6"))
        assert after_epoch_loss.seq == 1 and after_epoch_loss.epoch not in (fresh.epoch, old[0].epoch)
        assert await broker.history(TICKER, 0) == [after_epoch_loss]
        assert await broker.last_value(TICKER) is None  # the old epoch's last value is gone too
        # Only the seq key lost: seq 1 again must not reuse the epoch.
        await broker.publish(messages(TICKER, b"7"))
        await plain_redis.delete(keys.seq)
        (after_seq_loss,) = await broker.publish(messages(TICKER, b"8"))
        assert after_seq_loss.seq == 1 and after_seq_loss.epoch != after_epoch_loss.epoch
        assert await broker.history(TICKER, 0) == [after_seq_loss]
        assert int_of(await plain_redis.get(keys.epoch)) == after_seq_loss.epoch


async def test_history_ignores_entries_older_than_the_age_bound(
    redis_url: str, key_prefix: str, plain_redis: aioredis.Redis
) -> None:
    keys = ChannelNamer(key_prefix, "binance").keys(TRADE)
    async with redis_broker(redis_url, key_prefix, history_max_age_s=60) as broker:
        await broker.publish(messages(TRADE, b"fresh-1"))
        # An entry published 2 minutes ago by the same epoch (as if the channel had been quiet since).
        epoch = int_of(await plain_redis.get(keys.epoch))
        stale_ms = time.time_ns() // 1_000_000 - 120_000
        await plain_redis.delete(keys.history)
        await plain_redis.xadd(keys.history, {b"e": encode_publication(epoch, 1, stale_ms, b"stale")}, id="1-0")
        await plain_redis.set(keys.seq, 1)
        (fresh,) = await broker.publish(messages(TRADE, b"fresh-2"))
        assert fresh.seq == 2
        assert await broker.history(TRADE, 0) == [fresh]


@pytest.mark.parametrize(
    "script, payloads", [("_script_sha", (b"2",)), ("_batch_script_sha", (b"2", b"3"))], ids=["one", "batch"]
)
async def test_publish_recovers_when_redis_forgot_the_script(
    redis_url: str, key_prefix: str, script: str, payloads: tuple[bytes, ...]
) -> None:
    async with redis_broker(redis_url, key_prefix) as broker:
        await broker.publish(messages(TRADE, b"1"))
        # As after a Redis restart or SCRIPT FLUSH (not run here: the server is shared): NOSCRIPT for our SHA (the
        # one-message script's for a batch of one, the batch script's for more).
        real_sha = getattr(broker, script)
        setattr(broker, script, "0" * 40)
        published = await broker.publish(messages(TRADE, *payloads))
        assert [p.seq for p in published] == list(range(2, 2 + len(payloads)))
        assert [p.payload for p in published] == list(payloads)
        assert getattr(broker, script) == real_sha


async def test_a_large_batch_goes_out_in_several_batch_calls_in_order(tmp_path: pathlib.Path) -> None:
    """More messages than one batch call carries: split into calls of nearly equal size, one round trip, every
    message published once and in order; a message whose write fails ends its call, and the broker reports where.
    (A private server: the count of script calls is its own.)"""
    count = 2 * BATCH_CALL_MESSAGES + 3
    server = PrivateRedis(str(tmp_path / "redis.sock"))
    await server.start()
    plain = aioredis.from_url(server.url)
    try:
        async with redis_broker(server.url, "pgtest", history_maxlen=1000) as broker:
            published = await broker.publish(
                [OutgoingMessage(TRADE if n % 2 else OTHER, b"%d" % n, False) for n in range(count)]
            )
            assert await evalsha_calls(plain) == 3
            assert [p.payload for p in published] == [b"%d" % n for n in range(count)]
            assert [p.seq for p in published if int(p.payload) % 2] == list(range(1, count // 2 + 1))
            assert [p.payload for p in await broker.history(TRADE, 0)] == [b"%d" % n for n in range(1, count, 2)]
            # OTHER's history holds a string now: the batch's first two messages go out, the third fails.
            await plain.set(ChannelNamer("pgtest", "binance").keys(OTHER).history, "not a stream")
            with pytest.raises(PublishIncomplete, match="2/4") as failure:
                await broker.publish([*messages(TRADE, b"a", b"b"), *messages(OTHER, b"c"), *messages(TRADE, b"d")])
            assert failure.value.confirmed == 2
            assert [p.payload for p in await broker.history(TRADE, count // 2)] == [b"a", b"b"]
    finally:
        await plain.aclose()
        await server.kill()


async def evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_malformed_envelopes_are_skipped_and_counted(
    redis_url: str, key_prefix: str, plain_redis: aioredis.Redis
) -> None:
    namer = ChannelNamer(key_prefix, "binance")
    async with redis_broker(redis_url, key_prefix) as broker:
        recorder = Recorder()
        broker.set_listener(recorder)
        await broker.subscribe([TRADE])
        await plain_redis.publish(namer.channel(TRADE), b"not an envelope")
        await plain_redis.publish(namer.heartbeat_channel, b"soon")
        await broker.publish(messages(TRADE, b"good"))
        await broker.publish_heartbeat(7)
        await eventually(lambda: recorder.heartbeats == [7], what="heartbeat")
        assert recorder.payloads(TRADE) == [b"good"]
        assert broker.malformed_messages == 2


async def test_listener_errors_are_counted_and_do_not_stop_delivery(redis_url: str, key_prefix: str) -> None:
    class Flaky(Recorder):
        def on_publication(self, stream: str, publication: Publication) -> None:
            if publication.payload == b"boom":
                raise RuntimeError("listener bug")
            super().on_publication(stream, publication)

    async with redis_broker(redis_url, key_prefix) as broker:
        recorder = Flaky()
        broker.set_listener(recorder)
        await broker.subscribe([TRADE])
        await broker.publish(messages(TRADE, b"a", b"boom", b"b"))
        await eventually(lambda: recorder.payloads(TRADE) == [b"a", b"b"], what="delivery after the error")
        assert broker.listener_errors == 1
        assert broker.connected


async def test_reconnects_and_resubscribes_after_the_connection_is_killed(
    redis_url: str, key_prefix: str, plain_redis: aioredis.Redis
) -> None:
    async with redis_broker(redis_url, key_prefix, reconnect_initial_s=0.05) as broker:
        recorder = Recorder(broker=broker)
        broker.set_listener(recorder)
        await broker.subscribe([TRADE, OTHER])
        await broker.publish(messages(TRADE, b"before"))
        await eventually(lambda: recorder.payloads(TRADE) == [b"before"], what="first message")
        killed_id = broker.subscriber_client_id
        assert killed_id is not None
        # Kill exactly our connection (other pub/sub clients on this server are not ours to kill).
        assert await plain_redis.client_kill_filter(_id=str(killed_id)) == 1
        await eventually(lambda: recorder.reconnects == 1, what="on_broker_reconnect")
        # Every channel was resubscribed before the listener heard of the reconnect.
        assert recorder.connected_at_reconnect == [True]
        assert broker.connected and broker.reconnects == 1
        assert broker.subscriber_client_id not in (None, killed_id)
        channels = await plain_redis.pubsub_channels(f"{key_prefix}*")
        namer = ChannelNamer(key_prefix, "binance")
        assert {c.decode() if isinstance(c, bytes) else c for c in channels} == {
            namer.channel(TRADE),
            namer.channel(OTHER),
            namer.heartbeat_channel,
        }
        await broker.publish(messages(TRADE, b"after") + messages(OTHER, b"other-after"))
        await broker.publish_heartbeat(99)
        await eventually(lambda: recorder.payloads(OTHER) == [b"other-after"], what="messages after reconnect")
        assert recorder.payloads(TRADE) == [b"before", b"after"]
        await eventually(lambda: recorder.heartbeats == [99], what="heartbeat after reconnect")


async def test_a_half_open_subscription_is_detected_and_replaced(redis_url: str, key_prefix: str) -> None:
    async with LatencyProxy(redis_port(redis_url)) as proxy, redis_broker(redis_url, key_prefix) as ingest:
        gateway_url = via_proxy(redis_url, proxy)
        async with redis_broker(
            gateway_url, key_prefix, redis_url, reconnect_initial_s=0.05, health_check_interval_s=0.2
        ) as gateway:
            recorder = Recorder(broker=gateway)
            gateway.set_listener(recorder)
            await gateway.subscribe([TRADE])
            proxy.freeze()  # every socket opened so far goes half-open: no FIN, no RST, just silence
            # The recorded reconnect, not a poll of ``connected``: the subscription is down only for the reconnect
            # backoff (tens of milliseconds), which a poll can miss; the reconnect stays recorded.
            await eventually(lambda: recorder.reconnects == 1, timeout=5, what="half-open detected and replaced")
            assert gateway.connected
            await ingest.publish(messages(TRADE, b"after"))
            await eventually(lambda: recorder.payloads(TRADE) == [b"after"], what="message after reconnect")


async def test_a_quiet_healthy_subscription_is_kept(redis_url: str, key_prefix: str) -> None:
    async with redis_broker(redis_url, key_prefix, health_check_interval_s=0.05) as broker:
        client_id = broker.subscriber_client_id
        await asyncio.sleep(0.5)  # ten health-check intervals without a single message: PINGs keep it alive
        assert broker.connected and broker.reconnects == 0
        assert broker.subscriber_client_id == client_id


async def test_subscribe_while_disconnected_takes_effect_on_reconnect(
    redis_url: str, key_prefix: str, plain_redis: aioredis.Redis
) -> None:
    async with redis_broker(redis_url, key_prefix, reconnect_initial_s=0.3) as broker:
        recorder = Recorder(broker=broker)
        broker.set_listener(recorder)
        assert broker.subscriber_client_id is not None
        await plain_redis.client_kill_filter(_id=str(broker.subscriber_client_id))
        await eventually(lambda: not broker.connected, what="loss noticed")
        await asyncio.wait_for(broker.subscribe([TRADE]), 0.2)  # returns at once while down
        await eventually(lambda: recorder.reconnects == 1, what="reconnect")
        await broker.publish(messages(TRADE, b"x"))
        await eventually(lambda: recorder.payloads(TRADE) == [b"x"], what="delivery on the new subscription")


async def test_reader_dies_loudly_on_a_fatal_error(
    redis_url: str, key_prefix: str, plain_redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # A user of our own that we can delete: the reconnect then fails authentication, which no retry can fix.
    user = f"pgtest-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    await plain_redis.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=[f"{key_prefix}*"], channels=[f"{key_prefix}*"],
        commands=["+@all"],
    )  # fmt: skip
    broker = RedisBroker(
        redis_url.replace("redis://", f"redis://{user}:{password}@"), prefix=key_prefix, reconnect_initial_s=0.05
    )
    await broker.start()
    try:
        recorder = Recorder(broker=broker)
        broker.set_listener(recorder)
        await plain_redis.acl_deluser(user)  # Redis also drops the user's connections
        if broker.subscriber_client_id is not None:
            with contextlib.suppress(redis_errors.ResponseError):
                await plain_redis.client_kill_filter(_id=str(broker.subscriber_client_id))
        task = broker.reader_task
        assert task is not None
        with pytest.raises(redis_errors.AuthenticationError):
            await asyncio.wait_for(asyncio.shield(task), 3)
        assert not broker.connected
        assert isinstance(broker.failure, redis_errors.AuthenticationError)
        assert recorder.reconnects == 0
        assert "stopped" in caplog.text and password not in caplog.text
    finally:
        await broker.close()
        await delete_keys(redis_url, key_prefix)
        with contextlib.suppress(redis_errors.ResponseError):
            await plain_redis.acl_deluser(user)


async def test_survives_a_redis_restart_over_a_unix_socket(tmp_path: pathlib.Path) -> None:
    server = PrivateRedis(str(tmp_path / "redis.sock"))
    await server.start()
    try:
        async with redis_broker(server.url, "pgtest", reconnect_initial_s=0.05) as broker:
            recorder = Recorder(broker=broker)
            broker.set_listener(recorder)
            await broker.subscribe([TRADE])
            before = await broker.publish(messages(TRADE, b"1", b"2"))
            await eventually(lambda: len(recorder.publications) == 2, what="messages before the restart")
            await server.kill()
            await eventually(lambda: not broker.connected, what="loss noticed")
            await server.start()  # empty: no keys, no scripts
            await eventually(lambda: recorder.reconnects == 1, what="reconnect to the restarted server")
            # The command connection is replaced, the script reloaded, and the lost epoch replaced.
            (fresh,) = await broker.publish(messages(TRADE, b"3"))
            assert fresh.seq == 1 and fresh.epoch != before[0].epoch
            await eventually(lambda: recorder.payloads(TRADE) == [b"1", b"2", b"3"], what="message after restart")
    finally:
        await server.kill()


async def test_a_refused_subscription_raises_and_is_not_retried(
    redis_url: str, key_prefix: str, plain_redis: aioredis.Redis
) -> None:
    namer = ChannelNamer(key_prefix, "binance")
    user = f"pgtest-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    # May use our keys, but of the channels only the heartbeat and TRADE.
    await plain_redis.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=[f"{key_prefix}*"],
        channels=[namer.heartbeat_channel, namer.channel(TRADE)], commands=["+@all"],
    )  # fmt: skip
    url = redis_url.replace("redis://", f"redis://{user}:{password}@")
    try:
        async with redis_broker(url, key_prefix, redis_url, reconnect_initial_s=0.05) as broker:
            recorder = Recorder(broker=broker)
            broker.set_listener(recorder)
            with pytest.raises(BrokerError, match="NOPERM"):
                await broker.subscribe([OTHER])
            await broker.subscribe([TRADE])
            assert broker.connected
            # The refused channel is not retried: a reconnect resubscribes only what Redis allowed.
            assert broker.subscriber_client_id is not None
            await plain_redis.client_kill_filter(_id=str(broker.subscriber_client_id))
            await eventually(lambda: recorder.reconnects == 1, what="reconnect")
            await broker.publish(messages(TRADE, b"ok"))
            await eventually(lambda: recorder.payloads(TRADE) == [b"ok"], what="delivery")
            assert broker.failure is None
    finally:
        await plain_redis.acl_deluser(user)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_start_against_an_unreachable_port_raises_a_clear_broker_error() -> None:
    port = unused_port()
    broker = RedisBroker(f"redis://:s3cret@127.0.0.1:{port}/9", socket_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(BrokerError) as raised:
        await broker.start()
    message = str(raised.value)
    assert message.startswith(f"Redis at redis://:***@127.0.0.1:{port}/9: ")
    assert f"connecting to 127.0.0.1:{port}" in message
    assert "s3cret" not in message and "***" in message
    assert time.monotonic() - started < 2  # no hidden retry loop
    assert not broker.connected
    await broker.close()  # harmless after a failed start


async def test_calls_before_start_raise_broker_error() -> None:
    broker = RedisBroker("redis://127.0.0.1:1/0")
    with pytest.raises(BrokerError, match="not started"):
        await broker.publish(messages(TRADE, b"x"))
    await broker.subscribe([TRADE])  # only recorded until start


def feed_in_pieces(subscription: RedisSubscription, stream: bytes, cuts: Sequence[int]) -> None:
    """Feed ``stream`` to the reader's dispatcher split at ``cuts``, as socket reads would deliver it."""
    buffer = b""
    previous = 0
    for cut in [*cuts, len(stream)]:
        buffer += stream[previous:cut]
        previous = cut
        consumed = subscription.dispatch(buffer)
        buffer = buffer[consumed:]
    assert buffer == b""


async def test_the_dispatcher_handles_every_split_point() -> None:
    namer = ChannelNamer("pg:md", "binance")
    channel = namer.channel(TRADE).encode()
    envelope = encode_publication(5, 1, 1000, b'{"p":"1.0"}')
    wire = (
        b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%b\r\n:1\r\n" % (len(channel), channel)
        + b"*3\r\n$7\r\nmessage\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(channel), channel, len(envelope), envelope)
        + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
        + b">3\r\n$7\r\nmessage\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
        % (len(channel), channel, len(envelope), envelope.replace(b":1:", b":2:"))
    )
    for cut in range(len(wire) + 1):
        subscription = RedisSubscription(
            namer,
            safe_url="redis://127.0.0.1:1/0",
            socket_timeout_s=1,
            health_check_interval_s=1,
            reconnect_initial_s=0.1,
            reconnect_max_s=1,
        )
        recorder = Recorder()
        subscription.set_listener(recorder)
        await subscription.subscribe([TRADE])  # not open: only recorded, as dispatch needs
        feed_in_pieces(subscription, wire, [cut])
        assert [(s, p.seq) for s, p in recorder.publications] == [(TRADE, 1), (TRADE, 2)], cut
