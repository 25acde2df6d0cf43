"""Exactly one publisher, on real Redis: the leader lease (one holder, takeover after expiry or release, stepping
down at once when a renewal fails) and the broker's fencing and duplicate filter, which hold even for a process
that has not noticed it lost the lease."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from ingest.metrics import IngestMetrics
from ingest.publish.leader import LeaderLease
from ingest.publish.publisher import Publisher
from shared.broker.contract import EventId, OutgoingMessage
from shared.broker.memory import MemoryBroker
from shared.broker.redis import RedisBroker
from shared.errors import ConfigError, NotLeaderError
from shared.streams import ChannelNamer
from tests.polling import eventually

pytestmark = [pytest.mark.timeout(30), pytest.mark.integration]

TTL_S = 1.0
RENEW_S = 0.2
TRADE = "btcusdt@aggTrade"


def agg(trade_id: int) -> OutgoingMessage:
    return OutgoingMessage(TRADE, b'{"e":"aggTrade","a":%d}' % trade_id, False, EventId(trade_id, trade_id, 1))


async def stored(client: aioredis.Redis, key: str) -> bytes:
    """A key's value as Redis holds it (the ``plain`` client does not decode responses)."""
    value = await client.get(key)
    assert isinstance(value, bytes), (key, value)
    return value


@pytest.fixture
async def plain(redis_url: str, key_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{key_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@contextlib.asynccontextmanager
async def started(broker: RedisBroker) -> AsyncIterator[RedisBroker]:
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


class Seen:
    """on_acquired / on_lost callbacks that record transitions."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def acquired(self) -> None:
        self.events.append("acquired")

    def lost(self, reason: str) -> None:
        self.events.append(f"lost:{reason}")


@contextlib.asynccontextmanager
async def lease_running(lease: LeaderLease, seen: Seen) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(lease.run(seen.acquired, seen.lost))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await lease.release()


# ---- fencing and duplicates in the publish script ----------------------------------------------------------


async def test_a_fenced_publish_needs_the_lease_atomically(
    redis_url: str, key_prefix: str, plain: aioredis.Redis
) -> None:
    namer = ChannelNamer(key_prefix, "binance")
    keys = namer.keys(TRADE)
    async with started(RedisBroker(redis_url, prefix=key_prefix)) as broker:
        # Nobody holds the lease: refused, nothing written.
        with pytest.raises(NotLeaderError):
            await broker.publish([agg(1)], fencing_token="me")
        assert await plain.get(keys.seq) is None and await plain.exists(keys.history) == 0
        # Someone else holds it: refused.
        await plain.set(namer.leader_key, "someone-else")
        with pytest.raises(NotLeaderError, match="0/1"):
            await broker.publish([agg(1)], fencing_token="me")
        assert await plain.get(keys.seq) is None
        # We hold it: published.
        await plain.set(namer.leader_key, "me")
        (publication,) = await broker.publish([agg(1)], fencing_token="me")
        assert publication.seq == 1
        # Lost in the middle of a batch: the prefix went out under the lease, the rest is refused.
        await plain.set(namer.leader_key, "successor")
        with pytest.raises(NotLeaderError, match="0/2"):
            await broker.publish([agg(2), agg(3)], fencing_token="me")
        assert int(await stored(plain, keys.seq)) == 1
        # Unfenced publishing (the demo, tests) is not checked at all.
        assert [p.seq for p in await broker.publish([agg(2)])] == [2]


async def test_an_event_published_once_is_dropped_by_any_later_publisher(
    redis_url: str, key_prefix: str, plain: aioredis.Redis
) -> None:
    """Two ingest processes overlap at a failover: the broker keeps each event once, in order."""
    async with (
        started(RedisBroker(redis_url, prefix=key_prefix)) as old,
        started(RedisBroker(redis_url, prefix=key_prefix)) as new,
    ):
        assert [p.seq for p in await old.publish([agg(n) for n in (1, 2, 3)])] == [1, 2, 3]
        # The new leader's buffer starts before the old one's last event: 2 and 3 are dropped, 4 and 5 go out.
        published = await new.publish([agg(n) for n in (2, 3, 4, 5)])
        assert [p.seq for p in published] == [4, 5]
        assert [p.payload for p in published] == [agg(4).payload, agg(5).payload]
        assert new.duplicates_dropped == 2
        # State streams are identified by event time; messages without identity are never dropped.
        ticker = "btcusdt@ticker"
        tick = OutgoingMessage(ticker, b'{"E":10}', True, EventId(10, 10, 10))
        assert len(await new.publish([tick, tick])) == 1
        plain_message = OutgoingMessage(ticker, b"{}", True)
        assert len(await new.publish([plain_message, plain_message])) == 2
        assert await new.last_event_ids([TRADE, ticker, "ethusdt@trade"]) == {TRADE: 5, ticker: 10}
        history = await new.history(TRADE, 0)
        assert [p.payload for p in history] == [agg(n).payload for n in (1, 2, 3, 4, 5)]


async def test_memory_broker_drops_duplicates_too() -> None:
    broker = MemoryBroker()
    await broker.publish([agg(1), agg(2)])
    assert [p.seq for p in await broker.publish([agg(2), agg(3)], fencing_token="ignored")] == [3]
    assert await broker.last_event_ids([TRADE]) == {TRADE: 3} and broker.duplicates_dropped == 1


# ---- the lease -------------------------------------------------------------------------------------------------


def test_lease_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="leader_renew_s"):
        LeaderLease("redis://x", "k", ttl_s=1.0, renew_s=0.6)
    with pytest.raises(ConfigError, match="leader_ttl_s"):
        LeaderLease("redis://x", "k", ttl_s=0)


async def test_one_holder_and_takeover_after_the_holder_dies(
    redis_url: str, key_prefix: str, plain: aioredis.Redis
) -> None:
    key = ChannelNamer(key_prefix, "binance").leader_key
    first, second = (
        LeaderLease(redis_url, key, ttl_s=TTL_S, renew_s=RENEW_S),
        LeaderLease(redis_url, key, ttl_s=TTL_S, renew_s=RENEW_S),
    )
    seen_first, seen_second = Seen(), Seen()
    async with lease_running(first, seen_first) as first_task:
        await eventually(lambda: first.is_leader, what="the first lease")
        async with lease_running(second, seen_second) as second_task:
            await asyncio.sleep(2 * TTL_S)  # renewed all along: the second never gets it
            assert first.holds() and not second.is_leader and seen_second.events == []
            assert second.holder == first.token and (await stored(plain, key)).decode() == first.token
            assert first.renewals >= 7
            # The holder dies without releasing (kill -9): the key expires, the standby takes it.
            first._leader = False  # so cancelling it does not count as a clean stop
            first_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first_task
            died = asyncio.get_running_loop().time()
            await eventually(lambda: second.is_leader, timeout=TTL_S + RENEW_S + 1, what="takeover")
            took = asyncio.get_running_loop().time() - died
            assert took <= TTL_S + RENEW_S + 0.4, took  # (the margin: scheduling on a busy machine)
            assert seen_second.events == ["acquired"]
            # A clean stop (what ingest does on SIGTERM: stop the loop, then release the key): a standby takes
            # over within one renewal period.
            async with lease_running(first, seen_first):
                await asyncio.sleep(RENEW_S)
                assert not first.is_leader
                stopped = asyncio.get_running_loop().time()
                second_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await second_task
                await second.release()
                await eventually(lambda: first.is_leader, timeout=1, what="takeover after release")
                assert asyncio.get_running_loop().time() - stopped <= RENEW_S + 0.4  # well under the TTL
                assert seen_second.events == ["acquired", "lost:stopped"]


async def test_a_holder_that_cannot_renew_stops_at_once(redis_url: str, key_prefix: str, plain: aioredis.Redis) -> None:
    key = ChannelNamer(key_prefix, "binance").leader_key
    lease = LeaderLease(redis_url, key, ttl_s=TTL_S, renew_s=RENEW_S)
    seen = Seen()
    async with lease_running(lease, seen):
        await eventually(lambda: lease.is_leader, what="lease")
        # Someone else holds the key now (ours expired while we were cut off, and a standby took it).
        await plain.set(key, "other", px=5000)
        # The recorded transitions, not a poll of ``is_leader``: a step-down can be shorter than any polling interval
        # (after the outage below the lease is not held for a few milliseconds), a recorded one stays recorded.
        await eventually(lambda: len(seen.events) >= 2, timeout=2 * RENEW_S + 0.5, what="stepping down")
        assert seen.events == ["acquired", "lost:refused"] and not lease.holds()
        assert (await plain.get(key)) == b"other"  # renewal never steals it back
        # Redis stops answering in time: the holder steps down at the first failed renewal...
        await plain.delete(key)
        await eventually(lambda: len(seen.events) >= 3, timeout=2, what="lease again")
        assert seen.events[2] == "acquired"
        # Server-wide, so kept short, but long enough that a whole renewal period plus the lease's own socket timeout,
        # min(renew, TTL / 3), fit inside it: some renewal surely starts and times out while Redis is paused.
        await plain.client_pause(600, all=False)  # CLIENT PAUSE 600 WRITE
        await eventually(lambda: len(seen.events) >= 4, timeout=2 * TTL_S, what="stepping down on a failed renewal")
        assert seen.events[3] == "lost:error"
        # ... and, still owning the key, takes it back once Redis answers again.
        await eventually(lambda: len(seen.events) >= 5, timeout=3 * TTL_S, what="lease back after the outage")
        assert seen.events == ["acquired", "lost:refused", "acquired", "lost:error", "acquired"] and lease.is_leader


async def test_holds_turns_false_when_the_local_clock_passes_the_lease(redis_url: str, key_prefix: str) -> None:
    now = [0.0]
    lease = LeaderLease(
        redis_url, ChannelNamer(key_prefix, "binance").leader_key, ttl_s=TTL_S, renew_s=RENEW_S, clock=lambda: now[0]
    )
    seen = Seen()
    async with lease_running(lease, seen):
        await eventually(lambda: lease.is_leader, what="lease")
        assert lease.holds()
        now[0] += TTL_S  # the process was paused for a whole TTL: its lease may be someone else's by now
        assert not lease.holds()


async def test_a_paused_ex_leader_cannot_publish_even_once(
    redis_url: str, key_prefix: str, plain: aioredis.Redis
) -> None:
    """The publisher believes it leads (its lease loop has not run), but Redis gave the lease to another
    process: the fenced publish is refused atomically, the publisher steps down and keeps the batch."""
    namer = ChannelNamer(key_prefix, "binance")

    class Believer:
        token = "old-leader"

        def holds(self) -> bool:
            return True  # it has not noticed

    metrics = IngestMetrics()
    async with started(RedisBroker(redis_url, prefix=key_prefix)) as broker:
        publisher = Publisher(broker, metrics, leadership=Believer())
        await plain.set(namer.leader_key, "old-leader")
        await publisher.take_over()
        await publisher.publish([agg(1)])
        assert int(await stored(plain, namer.keys(TRADE).seq)) == 1
        await plain.set(namer.leader_key, "new-leader")  # the lease moved while the old leader was paused
        await publisher.publish([agg(2)])
        assert int(await stored(plain, namer.keys(TRADE).seq)) == 1  # nothing more was published
        assert not publisher.active and metrics.is_leader._value.get() == 0
        assert publisher.standby.drain(publisher._clock()) == [agg(2)]
        await publisher.publish([agg(3)])  # a standby buffers from then on
        assert int(await stored(plain, namer.keys(TRADE).seq)) == 1


async def test_the_lease_loop_stops_even_when_a_redis_call_loses_the_cancellation(redis_url: str) -> None:
    """redis-py wraps socket I/O in Python 3.11's ``asyncio.wait_for``, which can return normally from a call that
    was cancelled: the lease loop must still stop (SIGTERM would otherwise hang ingest)."""

    class Swallowing(LeaderLease):
        inside = asyncio.Event()

        async def _try_acquire(self, *args: object) -> None:
            self.inside.set()
            try:
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                pass  # lost, as in wait_for

    lease = Swallowing(redis_url, "unused", ttl_s=TTL_S, renew_s=RENEW_S)
    seen = Seen()
    task = asyncio.create_task(lease.run(seen.acquired, seen.lost))
    await asyncio.wait_for(lease.inside.wait(), 2)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1)
    assert task in done and task.cancelled(), "the lease loop kept running after its cancellation was lost"
