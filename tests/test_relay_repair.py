"""The relay's sequence guarantees on real Redis (docs/architecture.md, "The Redis wire contract"): a real gateway
on a RedisBroker, a separate RedisBroker as ingest, real WebSocket clients. Pub/sub is at-most-once, so messages
really get lost between Redis and the gateway; these tests lose them in the two ways production does and check
what the client sees:

- the subscription connection dies (``CLIENT KILL`` of exactly the gateway's subscriber, or the Redis server
  itself stops): what ingest publishes meanwhile lands in history only, and the reconnect repairs from it;
- a publication that never reaches the subscriber while the connection stays up: the *real* publish script with
  its ``PUBLISH`` aimed at a channel nobody reads (history, seq and epoch as usual), so the gateway notices the
  gap from the next sequence number.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shared.broker.contract import OutgoingMessage
from shared.broker.redis import RedisBroker
from shared.errors import BrokerError
from shared.redis.scripts import PUBLISH_SCRIPT
from shared.streams import ChannelNamer
from tests.harness import RunningGateway, running_gateway
from tests.polling import eventually
from tests.redis_server import PrivateRedis
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

STREAM = "btcusdt@trade"
QUIET_S = 0.2  # how long a test waits to be sure that no duplicate or stray frame follows


def trade(seq: int, tag: bytes = b"") -> bytes:
    return b'{"e":"trade","s":"BTCUSDT","t":%d,"tag":"%b"}' % (seq, tag)


def trades(first: int, last: int, tag: bytes = b"") -> list[bytes]:
    return [trade(seq, tag) for seq in range(first, last + 1)]


class Client:
    """A real WebSocket client of the gateway that records every frame it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[bytes] = []
        self._progress = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    @classmethod
    async def open(cls, gw: RunningGateway, stream: str = STREAM) -> Client:
        client = cls(await connect(f"{gw.ws_base}/ws/{stream}"))
        await eventually(lambda: stream in gw.node.relay.active, what="the broker to confirm the subscription")
        return client

    async def _run(self) -> None:
        try:
            while True:
                self.frames.append(await self.ws.recv(decode=False))
                self._progress.set()
        except ConnectionClosed:
            pass

    async def wait_count(self, count: int, timeout: float = 5.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._progress.clear()
                    if len(self.frames) >= count:
                        return
                    await self._progress.wait()
        except TimeoutError:
            raise AssertionError(f"got {len(self.frames)} of {count} frames: {self.frames}") from None

    async def settled(self, count: int) -> list[bytes]:
        """The frames once ``count`` arrived and nothing more came for a while (a duplicate would)."""
        await self.wait_count(count)
        await asyncio.sleep(QUIET_S)
        return self.frames

    async def close(self) -> None:
        await self.ws.close()
        await self._task


@dataclass
class Rig:
    gw: RunningGateway
    ingest: RedisBroker
    gateway_broker: RedisBroker
    redis: aioredis.Redis
    prefix: str

    async def publish(self, payloads: list[bytes]) -> None:
        await self.ingest.publish([OutgoingMessage(STREAM, payload, False) for payload in payloads])

    async def publish_history_only(self, payloads: list[bytes]) -> None:
        """What a publication lost on pub/sub looks like: ingest's own atomic script (seq, epoch, history) runs,
        but its PUBLISH goes to a channel no gateway reads."""
        keys = ChannelNamer(self.prefix, "binance").keys(STREAM)
        for payload in payloads:
            await self.redis.eval(
                PUBLISH_SCRIPT, 4, keys.epoch, keys.seq, keys.history, keys.last,
                f"{self.prefix}:nobody-listens", random.randrange(1, 2**31), time.time_ns() // 1_000_000,
                payload, 0, self.ingest.history_maxlen, 300_000,
            )  # fmt: skip

    async def kill_subscriber(self) -> None:
        """Close exactly the gateway's subscription connection, server-side (others are not ours to kill)."""
        client_id = self.gateway_broker.subscriber_client_id
        assert client_id is not None
        assert await self.redis.client_kill_filter(_id=str(client_id)) == 1

    def metric(self, name: str, **labels: str) -> float:
        return self.gw.node.metrics.registry.get_sample_value(name, labels) or 0.0


async def delete_keys(client: aioredis.Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)


class SubscriptionValve(TcpProxy):
    """A TCP proxy to Redis that can hold back what Redis sends on the *subscription* connection (recognised by
    the SUBSCRIBE it sends) while every other connection flows: a pub/sub link lagging behind the command link,
    so a history read can overtake live messages that were published before it."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.holding = False
        self.held: list[bytes] = []
        self._subscription: asyncio.StreamWriter | None = None

    def url(self, redis_url: str) -> str:
        parts = urlsplit(redis_url)
        return parts._replace(netloc=f"127.0.0.1:{self.port}").geturl()

    def hold(self) -> None:
        self.holding = True

    def release(self, chunks: int | None = None) -> None:
        """Forward the oldest ``chunks`` held chunks (all of them, and stop holding, when None)."""
        count = len(self.held) if chunks is None else chunks
        release, self.held = self.held[:count], self.held[count:]
        if chunks is None:
            self.holding = False
        assert self._subscription is not None
        for data in release:
            self._subscription.write(data)

    def connect(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> None:
        self._spawn(self._upstream(client_reader, server_writer, client_writer))
        self._spawn(self._downstream(server_reader, client_writer))

    async def _upstream(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, client: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(1 << 16):
                if b"SUBSCRIBE" in data:
                    self._subscription = client
                sink.write(data)
        sink.close()

    async def _downstream(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(1 << 16):
                if sink is self._subscription and (self.holding or self.held):
                    self.held.append(data)
                else:
                    sink.write(data)
        sink.close()


@contextlib.asynccontextmanager
async def rig(
    url: str, prefix: str, *, history_maxlen: int = 1000, cleanup: bool = True, gateway_url: str | None = None
) -> AsyncIterator[Rig]:
    """Ingest and gateway on the same Redis and key prefix, as in production (same history_maxlen on both);
    the gateway through ``gateway_url`` (a proxy) if given."""
    ingest = RedisBroker(url, prefix=prefix, history_maxlen=history_maxlen)
    gateway_broker = RedisBroker(
        gateway_url or url, prefix=prefix, history_maxlen=history_maxlen, reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
    )  # fmt: skip
    plain = aioredis.from_url(url)
    await ingest.start()
    try:
        async with running_gateway(gateway_broker, channel_prefix=prefix, history_maxlen=history_maxlen) as gw:
            yield Rig(gw, ingest, gateway_broker, plain, prefix)
    finally:
        await ingest.close()
        if cleanup:
            await delete_keys(plain, prefix)
        await plain.aclose()


# ---- 1. repair from history after the subscription connection died -------------------------------------------------


async def test_messages_published_while_the_subscriber_reconnects_are_repaired_from_history(
    redis_url: str, key_prefix: str
) -> None:
    async with rig(redis_url, key_prefix) as r:
        client = await Client.open(r.gw)
        try:
            await r.publish(trades(1, 5))
            await client.wait_count(5)
            await r.kill_subscriber()
            await r.publish(trades(6, 10))  # Redis already dropped the subscriber: these reach history only
            await eventually(lambda: r.gateway_broker.reconnects == 1, what="the gateway's broker reconnect", timeout=3)
            # Nothing new has been published since: only the repair on reconnect can deliver 6..10.
            await client.wait_count(10, timeout=2)
            await r.publish(trades(11, 15))

            assert await client.settled(15) == trades(1, 15)
            # 6..10 really were missed on pub/sub: only 1..5 and 11..15 came that way.
            assert r.metric("pricegate_gateway_broker_messages_received_total") == 10
            assert r.metric("pricegate_gateway_broker_reconnects_total") == 1
            assert r.metric("pricegate_gateway_broker_gaps_total", result="repaired") == 1
            assert r.metric("pricegate_gateway_broker_gaps_total", result="lost") == 0
            assert r.metric("pricegate_gateway_broker_lost_messages_total") == 0
        finally:
            await client.close()


async def test_a_sequence_gap_on_a_live_subscription_is_repaired_and_the_overlap_not_delivered_twice(
    redis_url: str, key_prefix: str
) -> None:
    async with rig(redis_url, key_prefix) as r:
        client = await Client.open(r.gw)
        try:
            await r.publish(trades(1, 3))
            await client.wait_count(3)
            await r.publish_history_only(trades(4, 6))
            # 7 arrives live right after 3: the relay holds it, reads 4..7 from history (so 7 comes both ways)
            # and delivers each exactly once, in order.
            await r.publish(trades(7, 7))
            await r.publish(trades(8, 9))
            assert await client.settled(9) == trades(1, 9)
            assert r.metric("pricegate_gateway_broker_messages_received_total") == 6  # 1..3, 7..9
            assert r.metric("pricegate_gateway_broker_gaps_total", result="repaired") == 1
            assert r.metric("pricegate_gateway_broker_lost_messages_total") == 0
            assert r.metric("pricegate_gateway_broker_reconnects_total") == 0
        finally:
            await client.close()


async def test_live_messages_that_a_history_read_already_delivered_are_not_delivered_again(
    redis_url: str, key_prefix: str
) -> None:
    async with SubscriptionValve(urlsplit(redis_url).port or 6379) as valve:
        async with rig(redis_url, key_prefix, gateway_url=valve.url(redis_url)) as r:
            client = await Client.open(r.gw)
            try:
                await r.publish(trades(1, 3))
                await client.wait_count(3)
                valve.hold()  # from here on, pub/sub lags behind the command connection
                await r.publish_history_only(trades(4, 4))
                await r.publish(trades(5, 5))
                await eventually(lambda: len(valve.held) == 1, what="one held message")
                await r.publish(trades(6, 7))
                await eventually(lambda: len(valve.held) >= 2, what="two held messages")
                # 5 arrives: gap after 3, and the history read (which overtakes the held pub/sub link) has 4..7.
                valve.release(1)
                await client.wait_count(7)
                assert r.metric("pricegate_gateway_broker_gaps_total", result="repaired") == 1
                # Only now do 6 and 7 arrive live: already delivered, so dropped.
                valve.release()
                await eventually(
                    lambda: r.metric("pricegate_gateway_broker_messages_received_total") == 6,
                    what="six messages received",
                )
                assert await client.settled(7) == trades(1, 7)
                assert r.metric("pricegate_gateway_broker_lost_messages_total") == 0
            finally:
                await client.close()


# ---- 2. history too short --------------------------------------------------------------------------------------------


async def test_a_gap_longer_than_history_delivers_what_history_had_and_counts_the_rest(
    redis_url: str, key_prefix: str
) -> None:
    async with rig(redis_url, key_prefix, history_maxlen=5) as r:
        client = await Client.open(r.gw)
        try:
            await r.publish(trades(1, 3))
            await client.wait_count(3)
            await r.kill_subscriber()
            await r.publish(trades(4, 15))  # 12 missed; history keeps the newest 5 (11..15)
            await eventually(lambda: r.gateway_broker.reconnects == 1, what="the gateway's broker reconnect", timeout=3)
            # Let the repair finish before publishing on, so "the newest 5" is exactly 11..15.
            await eventually(
                lambda: r.metric("pricegate_gateway_broker_gaps_total", result="lost") == 1, what="the lost gap counted"
            )
            await r.publish(trades(16, 18))

            assert await client.settled(11) == trades(1, 3) + trades(11, 18)
            assert r.metric("pricegate_gateway_broker_lost_messages_total") == 7  # 4..10
            assert r.metric("pricegate_gateway_broker_gaps_total", result="repaired") == 0
        finally:
            await client.close()


# ---- 3. epoch change -------------------------------------------------------------------------------------------------


async def channel_keys_deleted(r: Rig) -> None:
    """Redis loses the channel's data (e.g. restarted without persistence): seq, epoch, history, last value."""
    keys = ChannelNamer(r.prefix, "binance").keys(STREAM)
    assert await r.redis.delete(keys.epoch, keys.seq, keys.history, keys.last) >= 2


async def test_a_new_epoch_restarting_at_seq_1_is_delivered_at_once(redis_url: str, key_prefix: str) -> None:
    async with rig(redis_url, key_prefix) as r:
        client = await Client.open(r.gw)
        try:
            before = await r.ingest.publish([OutgoingMessage(STREAM, p, False) for p in trades(1, 3, b"old")])
            await client.wait_count(3)
            await channel_keys_deleted(r)
            after = await r.ingest.publish([OutgoingMessage(STREAM, p, False) for p in trades(1, 3, b"new")])
            assert [p.seq for p in after] == [1, 2, 3] and after[0].epoch != before[0].epoch

            # No waiting for old seq 4, no "gap", nothing lost: the new epoch's seq 1 is the next message.
            await client.wait_count(6, timeout=1)
            assert await client.settled(6) == trades(1, 3, b"old") + trades(1, 3, b"new")
            assert r.metric("pricegate_gateway_broker_gaps_total", result="repaired") == 0
            assert r.metric("pricegate_gateway_broker_lost_messages_total") == 0
        finally:
            await client.close()


async def test_a_new_epoch_whose_first_messages_were_missed_is_repaired_from_its_history(
    redis_url: str, key_prefix: str
) -> None:
    async with rig(redis_url, key_prefix) as r:
        client = await Client.open(r.gw)
        try:
            await r.publish(trades(1, 3, b"old"))
            await client.wait_count(3)
            await channel_keys_deleted(r)
            await r.publish_history_only(trades(1, 2, b"new"))  # the new epoch's seq 1 and 2 miss pub/sub
            await r.publish(trades(3, 5, b"new"))
            assert await client.settled(8) == trades(1, 3, b"old") + trades(1, 5, b"new")
            assert r.metric("pricegate_gateway_broker_gaps_total", result="repaired") == 1
            assert r.metric("pricegate_gateway_broker_lost_messages_total") == 0
        finally:
            await client.close()


async def test_a_new_epoch_that_began_while_the_subscriber_was_down_is_repaired_from_its_history(
    redis_url: str, key_prefix: str
) -> None:
    async with rig(redis_url, key_prefix) as r:
        client = await Client.open(r.gw)
        try:
            await r.publish(trades(1, 10, b"old"))
            await client.wait_count(10)
            await r.kill_subscriber()
            await channel_keys_deleted(r)
            await r.publish(trades(1, 4, b"new"))  # new epoch, seq 1..4: history only (below the old seq 10)
            await eventually(lambda: r.gateway_broker.reconnects == 1, what="the gateway's broker reconnect", timeout=3)
            await r.publish(trades(5, 6, b"new"))
            assert await client.settled(16) == trades(1, 10, b"old") + trades(1, 6, b"new")
            assert r.metric("pricegate_gateway_broker_lost_messages_total") == 0
        finally:
            await client.close()


# ---- 5. readiness follows the broker connection -------------------------------------------------------------------


async def test_readiness_is_503_while_redis_is_down_and_200_after_the_reconnect(tmp_path: pathlib.Path) -> None:
    server = PrivateRedis(str(tmp_path / "redis.sock"))
    await server.start()
    try:
        async with rig(server.url, "pgtest", cleanup=False) as r, httpx.AsyncClient(base_url=r.gw.http_base) as http:
            client = await Client.open(r.gw)
            try:
                await r.publish(trades(1, 2))
                await client.wait_count(2)
                assert (await http.get("/readyz")).status_code == 200

                await server.kill()
                await eventually(
                    lambda: not r.gateway_broker.connected, what="the gateway noticing Redis is down", timeout=3
                )
                down = await http.get("/readyz")
                assert down.status_code == 503 and down.json()["broker_connected"] is False

                await server.start()  # empty, as after a crash without persistence
                await eventually(
                    lambda: r.gateway_broker.reconnects == 1, what="the gateway's broker reconnect", timeout=5
                )
                up = await http.get("/readyz")
                assert up.status_code == 200 and up.json()["broker_connected"] is True

                # And data flows again: the empty server starts a new epoch at seq 1, delivered at once.
                for attempt in range(3):  # ingest's command connection died with the server: retry once it knows
                    try:
                        await r.publish(trades(1, 1, b"after-restart"))
                        break
                    except BrokerError:
                        if attempt == 2:
                            raise
                assert await client.settled(3) == trades(1, 2) + trades(1, 1, b"after-restart")
            finally:
                await client.close()
    finally:
        await server.kill()
