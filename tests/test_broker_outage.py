"""Ingest survives its broker: a real ``redis-server`` of the test's own, killed (SIGKILL, nothing saved) and started
again empty on the same port, under real processes.

- The buffer (pure): holding keeps everything in order, bounded, and reports what the bound pushed out; taking
  and restoring keep the order; standing by drops what only this process could publish.
- The publisher in process, on a private Redis: a leader keeps publishing calls answered through the outage,
  takes the lease back when Redis returns and publishes what it held, in order, in a new epoch; one that finds
  another process holding the lease publishes nothing and drops its identity-less messages.
- End to end (``pricegate ingest``, ``pricegate gateway``, a WebSocket client): ingest keeps running (same PID),
  the client gets trades again, and trade ids never repeat, go backwards or (within the buffer) skip; an outage
  longer than the buffer is counted exactly (the ids the client missed) and logged once; two ingests on one host
  start with the default metrics port and ride out the restart with one leader and contiguous trades.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pathlib
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect

from ingest.metrics import IngestMetrics
from ingest.publish.leader import LeaderLease
from ingest.publish.publisher import Publisher
from ingest.publish.standby import StandbyBuffer
from shared.broker.contract import EventId, OutgoingMessage
from shared.broker.redis import RedisBroker
from shared.streams import ChannelNamer
from tests.fake_binance import FakeBinance
from tests.polling import eventually
from tests.processes import PricegateProcess, free_port, start_pricegate
from tests.redis_server import PrivateRedis

TRADE = "btcusdt@trade"
OUTAGE_S = 3.0  # the scenario: Redis killed, started again 3 s later on the same port
RESUME_WITHIN_S = 10.0  # Redis restart -> the client's next trade (gateway reconnect backoff is at most 5 s)


def synthetic(trade_id: int, stream: str = TRADE) -> OutgoingMessage:
    """A message as the synthetic market makes it: no exchange identity."""
    return OutgoingMessage(stream, b'{"e":"trade","t":%d}' % trade_id, False)


def exchange(trade_id: int) -> OutgoingMessage:
    return OutgoingMessage(TRADE, b'{"e":"trade","t":%d}' % trade_id, False, EventId(trade_id, trade_id))


def state(value: int, stream: str = "btcusdt@ticker") -> OutgoingMessage:
    return OutgoingMessage(stream, b'{"E":%d}' % value, True)


# ---- the buffer ---------------------------------------------------------------------------------------------


def test_holding_keeps_everything_in_order_without_a_window_and_reports_what_the_bound_pushed_out() -> None:
    buffer = StandbyBuffer(window_s=1.0, outage_max_events=5)
    buffer.add([synthetic(1)], now=0.0)
    assert len(buffer) == 0  # standing by: nothing without an exchange identity is kept
    buffer.hold()
    buffer.add([synthetic(n) for n in range(1, 4)] + [state(1)], now=0.0)
    buffer.add([synthetic(n) for n in range(4, 9)] + [state(2)], now=100.0)  # no window while holding
    assert buffer.take_lost() == {TRADE: 3} and buffer.take_lost() == {}
    assert buffer.drain(now=200.0) == [state(2)] + [synthetic(n) for n in range(4, 9)]
    assert buffer.evicted == 0


def test_take_and_restore_keep_the_order_and_a_newer_state_value_wins() -> None:
    buffer = StandbyBuffer(window_s=1.0, outage_max_events=4)
    buffer.hold()
    buffer.add([state(1), synthetic(1), synthetic(2), synthetic(3)], now=0.0)
    taken = buffer.take(3)
    assert taken == [state(1), synthetic(1), synthetic(2)]
    buffer.restore(taken[1:], now=1.0)  # what Redis did not confirm goes back in front
    assert buffer.take(10) == [synthetic(1), synthetic(2), synthetic(3)]
    buffer.add([state(2), synthetic(4), synthetic(5), synthetic(6)], now=2.0)
    buffer.restore([state(1), synthetic(2), synthetic(3)], now=3.0)  # the newer ticker stays; the bound drops one
    assert buffer.take_lost() == {TRADE: 1}
    assert buffer.take(10) == [state(2), synthetic(3), synthetic(4), synthetic(5), synthetic(6)]


def test_standing_by_drops_what_only_this_process_could_publish() -> None:
    buffer = StandbyBuffer(window_s=10.0, max_events=100, outage_max_events=100)
    buffer.hold()
    buffer.add([synthetic(1), exchange(1), state(1)], now=0.0)
    buffer.add([exchange(2)], now=20.0)
    assert buffer.stand_by(now=20.0) == 2  # the synthetic trade and ticker
    assert buffer.drain(now=20.0) == [exchange(2)]  # exchange(1) is older than the window again


# ---- the publisher on a private Redis -----------------------------------------------------------------------


# XRANGE as redis-py returns it from a client that does not decode responses: (entry id, fields) in bytes.
HistoryEntries = list[tuple[bytes, dict[bytes, bytes]]]


async def history_ids(url: str, prefix: str, stream: str = TRADE) -> tuple[list[int], list[int], set[bytes]]:
    """(trade ids, seqs, epochs) of the stream's history as Redis holds it."""
    client = aioredis.from_url(url)
    try:
        entries = cast(HistoryEntries, await client.xrange(ChannelNamer(prefix, "binance").keys(stream).history))
    finally:
        await client.aclose()
    envelopes = [fields[b"e"] for _, fields in entries]
    ids = [orjson.loads(envelope.split(b":", 3)[3])["t"] for envelope in envelopes]
    seqs = [int(envelope.split(b":", 2)[1]) for envelope in envelopes]
    return ids, seqs, {envelope.split(b":", 1)[0] for envelope in envelopes}


@contextlib.asynccontextmanager
async def leading_publisher(
    server: PrivateRedis, prefix: str, *, ttl_s: float = 1.0, renew_s: float = 0.2, outage_buffer: int = 1000
) -> AsyncIterator[tuple[Publisher, LeaderLease, IngestMetrics]]:
    broker = RedisBroker(server.url, prefix=prefix, reconnect_initial_s=0.05, socket_timeout_s=1.0)
    await broker.start()
    lease = LeaderLease(server.url, ChannelNamer(prefix, "binance").leader_key, ttl_s=ttl_s, renew_s=renew_s)
    metrics = IngestMetrics()
    publisher = Publisher(broker, metrics, leadership=lease, outage_buffer_messages=outage_buffer)
    loop = asyncio.create_task(lease.run(publisher.take_over, publisher.step_down))
    try:
        await asyncio.wait_for(publisher.until_leading(), 5)
        yield publisher, lease, metrics
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await publisher.aclose()
        await lease.release()
        await broker.close()


def sample(metrics: IngestMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.integration
@pytest.mark.timeout(20)
async def test_a_leader_holds_through_a_restart_takes_the_lease_back_and_publishes_in_order(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pricegate")
    server = PrivateRedis(str(tmp_path / "redis.sock"))
    await server.start()
    try:
        async with leading_publisher(server, "pgtest") as (publisher, lease, metrics):
            await publisher.publish([synthetic(n) for n in range(1, 11)])
            _, _, (epoch_before,) = await history_ids(server.url, "pgtest")
            await server.kill()
            for n in range(11, 31):  # answered, never raised: held
                await publisher.publish([synthetic(n)])
                await asyncio.sleep(0.01)
            await eventually(lambda: not publisher.active, timeout=3, what="the lease lost with Redis")
            await publisher.publish([synthetic(n) for n in range(31, 41)])
            assert len(publisher.standby) == 30
            await server.start()  # empty: no lease, no epoch, no script
            await eventually(lambda: publisher.active, timeout=5, what="the lease taken back")
            await publisher.publish([synthetic(41)])
            ids, seqs, epochs = await history_ids(server.url, "pgtest")
            assert ids == list(range(11, 42))  # nothing confirmed before is sent again, nothing held is lost
            assert seqs == list(range(1, 32)) and len(epochs) == 1 and epochs != {epoch_before}
            assert sample(metrics, "pricegate_ingest_outage_dropped_messages_total", kind="trade") == 0
            assert sample(metrics, "pricegate_ingest_broker_up") == 1
            assert lease.previous is None  # Redis had lost who led: nobody else did since
    finally:
        await server.kill()
    summaries = [r.getMessage() for r in caplog.records if "outage over" in r.getMessage()]
    assert len(summaries) == 1 and "30 messages held, 0 of them dropped" in summaries[0], summaries


@pytest.mark.integration
@pytest.mark.timeout(20)
async def test_an_outage_beyond_the_buffer_is_counted_and_logged_once(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pricegate")
    server = PrivateRedis(str(tmp_path / "redis.sock"))
    await server.start()
    try:
        async with leading_publisher(server, "pgtest", outage_buffer=10) as (publisher, _, metrics):
            await publisher.publish([synthetic(1)])
            await server.kill()
            for n in range(2, 52):
                await publisher.publish([synthetic(n)])
            await server.start()

            async def published() -> bool:
                return (await history_ids(server.url, "pgtest"))[0] == list(range(42, 52))  # the newest 10

            await eventually(published, timeout=5, what="the held messages published")
            assert sample(metrics, "pricegate_ingest_outage_dropped_messages_total", kind="trade") == 40
    finally:
        await server.kill()
    full = [r for r in caplog.records if "buffer is full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelno == logging.WARNING
    assert any("50 messages held, 40 of them dropped" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
@pytest.mark.timeout(20)
async def test_a_leader_that_finds_another_holder_publishes_nothing_and_drops_what_only_it_held(
    tmp_path: pathlib.Path,
) -> None:
    server = PrivateRedis(str(tmp_path / "redis.sock"))
    namer = ChannelNamer("pgtest", "binance")
    await server.start()
    try:
        # A long lease: the publisher still believes it leads when Redis is back, so its retry meets the fence.
        async with leading_publisher(server, "pgtest", ttl_s=4.0, renew_s=2.0) as (publisher, lease, _):
            await publisher.publish([synthetic(1)])
            await server.kill()
            await publisher.publish([synthetic(n) for n in range(2, 6)])
            await server.start()
            plain = aioredis.from_url(server.url)
            try:
                # Another ingest got there first (as its lease script does: the lease, and who took it last).
                await plain.set(namer.leader_key, "other-host:1:abc", px=3000)
                await plain.set(f"{namer.leader_key}:last", "other-host:1:abc")
                await eventually(lambda: not publisher.active, timeout=5, what="stepping down (fenced or refused)")
                await eventually(lambda: lease.seen_others > 0, timeout=5, what="the other holder seen")
                await publisher.publish([synthetic(6)])
                assert len(publisher.standby) == 0  # a standby keeps no identity-less message
                assert (await history_ids(server.url, "pgtest"))[0] == []  # the fence held: nothing published
                await plain.delete(namer.leader_key)  # the other one stops: this one leads again
                await eventually(lambda: publisher.active, timeout=5, what="leading again")
                assert lease.previous == "other-host:1:abc"
                await publisher.publish([synthetic(7)])
                assert (await history_ids(server.url, "pgtest"))[0] == [7]
            finally:
                await plain.aclose()
    finally:
        await server.kill()


@pytest.mark.integration
@pytest.mark.timeout(20)
async def test_after_redis_lost_its_data_the_previous_leader_takes_the_lease_back_first(tmp_path: pathlib.Path) -> None:
    server = PrivateRedis(str(tmp_path / "redis.sock"))
    key = ChannelNamer("pgtest", "binance").leader_key
    await server.start()
    leader, standby = (LeaderLease(server.url, key, ttl_s=1.0, renew_s=0.2) for _ in range(2))
    events: list[str] = []

    def runner(lease: LeaderLease, name: str) -> asyncio.Task[None]:
        async def acquired() -> None:
            events.append(f"{name} acquired")

        return asyncio.create_task(lease.run(acquired, lambda reason: events.append(f"{name} lost:{reason}")))

    tasks = [runner(leader, "leader")]
    try:
        await eventually(lambda: leader.is_leader, what="the first lease")
        tasks.append(runner(standby, "standby"))
        await eventually(lambda: standby.holder == leader.token, what="the standby sees the leader")
        for _ in range(3):  # whoever looks first after the restart, the previous leader gets it
            await server.kill()
            await eventually(lambda: not leader.is_leader, timeout=3, what="the lease lost with Redis")
            await server.start()
            await eventually(lambda: leader.is_leader, timeout=3, what="the previous leader back")
            assert not standby.is_leader and leader.previous is None
        # The previous leader is gone too (no release, as after kill -9): the standby takes over after one TTL.
        tasks[0].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[0]
        await server.kill()
        await server.start()
        restarted = time.monotonic()
        await eventually(lambda: standby.is_leader, timeout=3, what="the standby takes over")
        # One TTL (1 s) from the standby's first look at the restarted Redis, which may come just before
        # ``restarted`` is read (start() returns after its own PING).
        assert 0.9 <= time.monotonic() - restarted < 2.0
        assert "standby acquired" in events and events.count("leader acquired") == 4
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lease in (standby, leader):
            await lease.release()  # closes its connection; deletes the key only if it still holds it
        await server.kill()


# ---- real processes -----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[list[PricegateProcess]]:
    started: list[PricegateProcess] = []
    try:
        yield started
    finally:
        for process in started:
            if process.process.returncode is None:
                process.process.kill()
            await process.process.wait()
            if process._reader is not None:
                await process._reader


class Trades:
    """What a WebSocket client on the gateway receives: (receive time, stream, trade id)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, int]] = []

    async def read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = orjson.loads(raw)
            data, stream = (frame["data"], frame["stream"]) if "stream" in frame else (frame, TRADE)
            self.seen.append((time.monotonic(), stream, data["a"] if "a" in data else data["t"]))

    def ids(self, stream: str = TRADE) -> list[int]:
        return [trade_id for _, name, trade_id in self.seen if name == stream]

    def after(self, moment: float) -> int:
        return sum(1 for at, _, _ in self.seen if at > moment)


def assert_never_back_or_twice(ids: list[int], what: str) -> list[tuple[int, int]]:
    """Ids only grow; returns the gaps (last id before, first id after)."""
    assert ids, what
    backwards = [(a, b) for a, b in itertools.pairwise(ids) if b <= a]
    assert not backwards, f"{what}: ids repeat or go backwards at {backwards[:5]}"
    return [(a, b) for a, b in itertools.pairwise(ids) if b > a + 1]


async def scrape(port: int, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return sum(float(value) for value in values)


async def scrape_is(port: int, name: str, value: float) -> bool:
    return await scrape(port, name) == value


def synthetic_env(server: PrivateRedis, prefix: str, metrics_port: int, **extra: str) -> dict[str, str]:
    return {
        "PRICEGATE_REDIS_URL": server.url,
        "PRICEGATE_CHANNEL_PREFIX": prefix,
        "PRICEGATE_INGEST_METRICS_PORT": str(metrics_port),
        "PRICEGATE_SYNTHETIC_TRADE_RATE": "100",
        "PRICEGATE_SHUTDOWN_DRAIN_S": "0.3",
        **extra,
    }


async def ride_out_a_restart(
    server: PrivateRedis, env: dict[str, str], trades: Trades, ingests: list[PricegateProcess]
) -> tuple[float, float]:
    """Kill Redis, start it again OUTAGE_S later; returns (restart time, seconds until the client's next trade)."""
    pids = [p.process.pid for p in ingests]
    before = len(trades.seen)
    await server.kill()
    await asyncio.sleep(OUTAGE_S)
    await server.start()
    restarted = time.monotonic()
    await eventually(lambda: trades.after(restarted) > 0, timeout=RESUME_WITHIN_S, what="trades after the restart")
    resumed_s = next(at for at, _, _ in trades.seen[before:] if at > restarted) - restarted
    await eventually(lambda: trades.after(restarted) > 100, timeout=10, what="trades flowing again")
    for process, pid in zip(ingests, pids, strict=True):
        assert process.process.returncode is None and process.process.pid == pid, "".join(process.output[-30:])
        output = "".join(process.output)
        assert "Traceback" not in output, output[-3000:]
    return restarted, resumed_s


@pytest.mark.integration
@pytest.mark.timeout(40)
async def test_ingest_and_a_gateway_client_ride_out_a_redis_restart() -> None:
    server = PrivateRedis.on_tcp()
    await server.start()
    metrics_port = free_port()
    env = synthetic_env(server, f"pgtest{uuid.uuid4().hex[:8]}", metrics_port)
    try:
        async with processes() as started:
            started.append(await start_pricegate("ingest", env=env))
            ingest = started[-1]
            gateway_port = free_port()
            started.append(await start_pricegate("gateway", "--port", str(gateway_port), env=env))
            await ingest.wait_for_line(r"pricegate ingest: synthetic source publishing")
            await started[-1].wait_for_line(r"pricegate is serving on")
            trades = Trades()
            async with connect(f"ws://127.0.0.1:{gateway_port}/ws/{TRADE}") as ws:
                reader = asyncio.create_task(trades.read(ws))
                await eventually(lambda: len(trades.seen) > 50, timeout=10, what="trades before the outage")
                killed = asyncio.create_task(ride_out_a_restart(server, env, trades, [ingest]))
                await asyncio.sleep(1.5)
                assert await scrape(metrics_port, "pricegate_ingest_broker_up") == 0  # said while it lasts
                _, resumed_s = await killed
                reader.cancel()
            gaps = assert_never_back_or_twice(trades.ids(), "trade ids")
            assert gaps == [], f"trades lost although the buffer held them all: {gaps}"
            # Each loop finds Redis back on its own schedule (exchangeInfo after a backoff from 0.25 s).
            await eventually(
                lambda: scrape_is(metrics_port, "pricegate_ingest_broker_up", 1), timeout=5, what="broker_up back"
            )
            assert await scrape(metrics_port, "pricegate_ingest_outage_dropped_messages_total") == 0
            assert await scrape(metrics_port, "pricegate_ingest_is_leader") == 1
            print(f"client resumed {resumed_s:.2f} s after the Redis restart, {len(trades.seen)} trades, no gap")
            assert resumed_s < RESUME_WITHIN_S
    finally:
        await server.kill()


@pytest.mark.integration
@pytest.mark.timeout(40)
async def test_an_outage_longer_than_the_buffer_is_counted_exactly_and_logged_once() -> None:
    server = PrivateRedis.on_tcp()
    await server.start()
    metrics_port = free_port()
    env = synthetic_env(server, f"pgtest{uuid.uuid4().hex[:8]}", metrics_port, PRICEGATE_OUTAGE_BUFFER_MESSAGES="50")
    try:
        async with processes() as started:
            started.append(await start_pricegate("ingest", env=env))
            ingest = started[-1]
            gateway_port = free_port()
            started.append(await start_pricegate("gateway", "--port", str(gateway_port), env=env))
            await ingest.wait_for_line(r"pricegate ingest: synthetic source publishing")
            await started[-1].wait_for_line(r"pricegate is serving on")
            trades = Trades()
            async with connect(f"ws://127.0.0.1:{gateway_port}/ws/{TRADE}") as ws:
                reader = asyncio.create_task(trades.read(ws))
                await eventually(lambda: len(trades.seen) > 50, timeout=10, what="trades before the outage")
                await ride_out_a_restart(server, env, trades, [ingest])
                reader.cancel()
            gaps = assert_never_back_or_twice(trades.ids(), "trade ids")
            missed = sum(after - before - 1 for before, after in gaps)
            dropped = await scrape(metrics_port, "pricegate_ingest_outage_dropped_messages_total")
            assert len(gaps) == 1 and missed > 100, gaps  # ~3 s at 100 trades/s, 50 kept
            assert dropped == missed, (dropped, missed)  # every id the client missed is counted, nothing else
            full = [line for line in ingest.output if "buffer is full" in line]
            assert len(full) == 1, full
            print(f"outage {OUTAGE_S:.0f} s, buffer 50: {missed} trades lost and counted")
    finally:
        await server.kill()


async def lease_holder_pid(server: PrivateRedis, prefix: str) -> int:
    client = aioredis.from_url(server.url)
    try:
        token = await client.get(ChannelNamer(prefix, "binance").leader_key)
    finally:
        await client.aclose()
    assert isinstance(token, bytes), "nobody holds the lease"
    return int(token.decode().split(":")[1])  # <host>:<pid>:<random>


@pytest.mark.integration
@pytest.mark.timeout(50)
async def test_two_ingests_on_one_host_start_with_the_defaults_and_ride_out_a_redis_restart() -> None:
    streams = ("btcusdt@aggTrade", "btcusdt@trade")
    server = PrivateRedis.on_tcp()
    await server.start()
    prefix = f"pgtest{uuid.uuid4().hex[:8]}"
    try:
        async with (
            FakeBinance(keep_trading=True, data_interval_s=0.02, ping_interval_s=5) as fake,
            processes() as started,
        ):
            env = {
                "PRICEGATE_REDIS_URL": server.url,
                "PRICEGATE_CHANNEL_PREFIX": prefix,
                "PRICEGATE_BINANCE_WS_URL": fake.ws_url,
                "PRICEGATE_BINANCE_REST_URL": fake.rest_url,
                "PRICEGATE_ALWAYS_ON_STREAMS": ",".join(streams),
                "PRICEGATE_SHUTDOWN_DRAIN_S": "0.3",
            }  # PRICEGATE_INGEST_METRICS_PORT left at its default: both ingests on one host must start
            for _ in range(2):
                started.append(await start_pricegate("ingest", "--source", "binance", env=env))
            ingests = list(started)
            metrics_ports = [
                int((await p.wait_for_line(r"/metrics on http://127\.0\.0\.1:(\d+)/metrics")).group(1)) for p in ingests
            ]
            assert len(set(metrics_ports)) == 2 and all(9108 <= port <= 9127 for port in metrics_ports)
            assert any("is taken" in "".join(p.output) for p in ingests)
            gateway_port = free_port()
            started.append(await start_pricegate("gateway", "--port", str(gateway_port), env=env))
            await started[-1].wait_for_line(r"pricegate is serving on")
            trades = Trades()
            async with connect(f"ws://127.0.0.1:{gateway_port}/stream?streams={'/'.join(streams)}") as ws:
                reader = asyncio.create_task(trades.read(ws))
                await eventually(lambda: len(trades.seen) > 40, timeout=10, what="trades before the outage")
                leader_before = await lease_holder_pid(server, prefix)
                _, resumed_s = await ride_out_a_restart(server, env, trades, ingests)
                # The previous leader holds what Redis missed: the standby leaves it the lease for one TTL.
                holder = await lease_holder_pid(server, prefix)
                assert holder == leader_before, "".join(line for p in ingests for line in p.output[-40:])
                await asyncio.sleep(0.5)
                reader.cancel()
            leaders = sorted([await scrape(port, "pricegate_ingest_is_leader") for port in metrics_ports])
            assert leaders == [0.0, 1.0], leaders
            for stream in streams:
                ids = trades.ids(stream)
                gaps = assert_never_back_or_twice(ids, stream)
                assert gaps == [], f"{stream}: missing ids {gaps[:5]}"
            print(f"two ingests: the client resumed {resumed_s:.2f} s after the Redis restart")
            for process in ingests:
                assert await process.stop(signal.SIGTERM, timeout=10) == 0
    finally:
        await server.kill()
