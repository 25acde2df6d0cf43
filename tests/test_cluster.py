"""Redis Cluster with sharded Pub/Sub, on a cluster of the module's own (3 primaries + 3 replicas on loopback ports,
``tests/redis_server.py``), under real ``pricegate`` processes.

- The broker in process: each stream lives on the shard of its slot (keys, history, ``SPUBLISH``), subscriptions and
  reads follow it; the heartbeat, demand and exchangeInfo keep their names.
- Fencing across shards: a deposed leader is refused on every shard, in process (two leases) and with real processes
  (a leader frozen with SIGSTOP while a standby ``pricegate ingest`` takes over, then resumed: every one of its
  publishes, on each of the three shards, is refused by the publish script).
- End to end: ``pricegate ingest`` and two ``pricegate gateway`` processes; clients on both see the same events in
  the same order; the whole cluster holds exactly two shard subscriptions for the stream (one per gateway) and no
  classic channel carries it.
- A live stream's slot resharded to another primary (``redis-cli --cluster reshard``) and a primary killed (its
  replica promoted): clients get the stream again, ids never repeat or go backwards, and every id a gateway's
  client missed is counted in that gateway's ``pricegate_gateway_broker_lost_messages_total``; ``/readyz`` says why
  while a shard is away.
- Bad input at start: a dead seed among live ones still starts; a cluster that is down, a standalone server named as
  a cluster and a seed list where nothing answers each end the process with one line naming PRICEGATE_REDIS_URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis
from websockets.asyncio.client import connect

from ingest.metrics import IngestMetrics
from ingest.publish.leader import LeaderLease
from ingest.publish.publisher import Publisher
from shared.broker.contract import OutgoingMessage
from shared.broker.redis_cluster import ClusterBroker
from shared.errors import NotLeaderError
from shared.redis.slots import key_slot
from shared.streams import ChannelNamer
from tests.polling import eventually
from tests.processes import PricegateProcess, free_port, run_pricegate, start_pricegate
from tests.redis_server import LocalCluster, PrivateRedis, _free_port_pair, _Processes
from tests.test_broker_outage import Trades, assert_never_back_or_twice, processes, scrape

pytestmark = pytest.mark.integration

RESUME_AFTER_PROMOTION_S = 15.0  # the bound: clients get the stream again within 15 s of the promotion


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One cluster for the module (starting one takes a few seconds); each test uses a key prefix of its own."""
    local = LocalCluster().start()
    try:
        yield local
    finally:
        local.stop()


def prefix() -> str:
    return f"pgtest{uuid.uuid4().hex[:8]}"


def symbol_in_slot(wanted: set[int], kind: str = "trade") -> str:
    """A made-up symbol (the synthetic market trades any) whose ``<symbol>@<kind>`` stream lands in one of ``wanted``
    slots. The hash tag is the stream name alone, whatever the prefix."""
    for number in range(2_000_000):
        symbol = f"C{number}USDT"
        if key_slot(f"{{{symbol.lower()}@{kind}}}") in wanted:
            return symbol
    raise AssertionError(f"no symbol found for slots {sorted(wanted)[:5]}")


def one_symbol_per_shard(cluster: LocalCluster) -> list[str]:
    symbols: list[str] = []
    for first, last, _, _ in sorted(cluster.slots()):
        if len(symbols) < 3 and last - first > 100:
            symbols.append(symbol_in_slot(set(range(first, last + 1))))
    assert len(symbols) == 3, cluster.slots()
    return symbols


def env(cluster: LocalCluster, key_prefix: str, symbols: list[str], **extra: str) -> dict[str, str]:
    return {
        "PRICEGATE_REDIS_URL": cluster.url,
        "PRICEGATE_CHANNEL_PREFIX": key_prefix,
        "PRICEGATE_SYMBOLS": ",".join(symbols),
        "PRICEGATE_INGEST_METRICS_PORT": "0",
        "PRICEGATE_SYNTHETIC_TRADE_RATE": "100",
        "PRICEGATE_SHUTDOWN_DRAIN_S": "0.3",
        **extra,
    }


def shard_subscribers(cluster: LocalCluster, channel: str) -> dict[int, int]:
    """``PUBSUB SHARDNUMSUB`` of ``channel`` on every running primary."""
    counts = {}
    for port in cluster.primaries():
        with cluster.client(port) as client:
            _, count = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            counts[port] = int(count)
    return counts


def classic_subscribers(cluster: LocalCluster, channel: str) -> int:
    total = 0
    for port in cluster.running():
        with cluster.client(port) as client:
            _, count = client.execute_command("PUBSUB", "NUMSUB", channel)
            total += int(count)
    return total


async def start_stack(
    started: list[PricegateProcess], environment: dict[str, str], gateways: int
) -> tuple[PricegateProcess, list[int]]:
    ingest = await start_pricegate("ingest", env=environment)
    started.append(ingest)
    ports = []
    for _ in range(gateways):
        port = free_port()
        started.append(await start_pricegate("gateway", "--port", str(port), env=environment))
        ports.append(port)
    await ingest.wait_for_line(r"pricegate ingest: synthetic source publishing")
    for process in started[-gateways:]:
        await process.wait_for_line(r"pricegate is serving on")
    return ingest, ports


@contextlib.asynccontextmanager
async def clients(ports: list[int], stream: str) -> AsyncIterator[list[Trades]]:
    """One WebSocket client per gateway on ``stream``, reading in the background."""
    readers = []
    all_trades = [Trades() for _ in ports]
    async with contextlib.AsyncExitStack() as stack:
        for port, trades in zip(ports, all_trades, strict=True):
            ws = await stack.enter_async_context(connect(f"ws://127.0.0.1:{port}/stream?streams={stream}"))
            readers.append(asyncio.create_task(trades.read(ws)))
        try:
            yield all_trades
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


def assert_nothing_lost_uncounted(ids: list[int], lost: float, what: str) -> int:
    """Ids only grow, and the ids missed between the first and the last received are the gateway's lost count."""
    gaps = assert_never_back_or_twice(ids, what)
    missed = sum(after - before - 1 for before, after in gaps)
    assert missed == lost, f"{what}: {missed} ids missed, {lost} counted as lost (gaps {gaps[:5]})"
    return missed


# ---- the broker in process ----------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.seqs: dict[str, list[int]] = {}
        self.heartbeats = 0
        self.reconnects = 0

    def on_publication(self, stream: str, publication: object) -> None:
        self.seqs.setdefault(stream, []).append(publication.seq)  # type: ignore[attr-defined]

    def on_heartbeat(self, published_at_ms: int) -> None:
        self.heartbeats += 1

    def on_broker_reconnect(self) -> None:
        self.reconnects += 1


async def test_each_stream_lives_on_the_shard_of_its_slot(cluster: LocalCluster) -> None:
    key_prefix = prefix()
    streams = [f"{symbol.lower()}@trade" for symbol in one_symbol_per_shard(cluster)]
    ingest, gateway = ClusterBroker(cluster.url, prefix=key_prefix), ClusterBroker(cluster.url, prefix=key_prefix)
    recorder = Recorder()
    await ingest.start()
    gateway.set_listener(recorder)
    await gateway.start()
    try:
        await gateway.subscribe(streams)
        batch = [OutgoingMessage(stream, b'{"t":%d}' % n, True) for n in range(1, 6) for stream in streams]
        published = await ingest.publish(batch)
        assert [p.seq for p in published] == [n for n in range(1, 6) for _ in streams]
        await ingest.publish_heartbeat(int(time.time() * 1000))
        await eventually(lambda: sum(map(len, recorder.seqs.values())) == 15, what="every publication delivered")
        assert all(recorder.seqs[stream] == [1, 2, 3, 4, 5] for stream in streams)
        await eventually(lambda: recorder.heartbeats == 1, what="the sharded heartbeat")
        namer = ChannelNamer(key_prefix, "binance")
        for stream in streams:
            keys = namer.keys(stream)
            owner = cluster.owner(key_slot(keys.channel))
            with cluster.client(owner) as client:  # every key of the stream on the one primary of its slot
                assert client.exists(keys.seq, keys.epoch, keys.history, keys.last) == 4
            assert [p.seq for p in await gateway.history(stream, 2)] == [3, 4, 5]
            last = await gateway.last_value(stream)
            assert last is not None and last.seq == 5
            assert shard_subscribers(cluster, keys.channel) == {
                port: 1 if port == owner else 0 for port in cluster.primaries()
            }
            assert classic_subscribers(cluster, keys.channel) == 0
        # The three streams' subscriptions (and the heartbeat's) are spread over the primaries that serve them.
        held = gateway.shard_subscriptions()
        assert sorted(s for names in held.values() for s in names if s) == sorted(streams)
        await gateway.announce_demand(streams, time.time() + 5)
        assert await ingest.read_demand(time.time()) == set(streams)
        await ingest.put_exchange_info(b'{"symbols":[]}')
        assert await gateway.get_exchange_info() == b'{"symbols":[]}'
    finally:
        await ingest.close()
        await gateway.close()


async def test_a_deposed_leader_is_refused_on_every_shard(cluster: LocalCluster) -> None:
    """Two leases on the cluster: the first holder stops renewing (as if paused), the second takes over and announces
    a higher fencing epoch in every slot; the first one's publishes are refused on each shard, atomically."""
    key_prefix = prefix()
    namer = ChannelNamer(key_prefix, "binance")
    streams = [f"{symbol.lower()}@trade" for symbol in one_symbol_per_shard(cluster)]
    old_broker, new_broker = (
        ClusterBroker(cluster.url, prefix=key_prefix),
        ClusterBroker(cluster.url, prefix=key_prefix),
    )
    await old_broker.start()
    await new_broker.start()
    old = LeaderLease(cluster.url, namer.leader_key, ttl_s=1.0, renew_s=0.2, fence=old_broker.take_fencing_epoch)
    new = LeaderLease(cluster.url, namer.leader_key, ttl_s=1.0, renew_s=0.2, fence=new_broker.take_fencing_epoch)

    async def nothing() -> None:
        return None

    old_loop = asyncio.create_task(old.run(nothing, lambda reason: None))
    try:
        await eventually(lambda: old_broker.fencing_epoch is not None, what="the first leader's epoch")
        first = [OutgoingMessage(stream, b'{"t":1}', False) for stream in streams]
        assert len(await old_broker.publish(first, fencing_token=old.token)) == 3
        # Paused: its loop stops renewing (the key expires), the other process takes the lease.
        old_loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await old_loop
        new_loop = asyncio.create_task(new.run(nothing, lambda reason: None))
        try:
            await eventually(lambda: new_broker.fencing_epoch is not None, timeout=5, what="the takeover")
            assert new.fencing_epoch is not None and old.fencing_epoch is not None
            assert new.fencing_epoch > old.fencing_epoch
            for stream in streams:  # each on its own shard
                with pytest.raises(NotLeaderError, match="below"):
                    await old_broker.publish([OutgoingMessage(stream, b'{"t":2}', False)], fencing_token=old.token)
                assert [p.seq for p in await new_broker.history(stream, 0)] == [1]
            published = await new_broker.publish(
                [OutgoingMessage(stream, b'{"t":2}', False) for stream in streams], fencing_token=new.token
            )
            assert [p.seq for p in published] == [2, 2, 2]
        finally:
            new_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await new_loop
    finally:
        await old.release()
        await new.release()
        await old_broker.close()
        await new_broker.close()


async def test_a_publisher_leads_with_the_lease_and_publishes_on_every_shard(cluster: LocalCluster) -> None:
    """The ingest publish path (lease, fence, publisher) on a cluster, as ``pricegate ingest`` wires it."""
    key_prefix = prefix()
    streams = [f"{symbol.lower()}@trade" for symbol in one_symbol_per_shard(cluster)]
    broker = ClusterBroker(cluster.url, prefix=key_prefix)
    await broker.start()
    lease = LeaderLease(
        cluster.url, ChannelNamer(key_prefix, "binance").leader_key, ttl_s=1.0, renew_s=0.2,
        fence=broker.take_fencing_epoch,
    )  # fmt: skip
    publisher = Publisher(broker, IngestMetrics(), leadership=lease)
    loop = asyncio.create_task(lease.run(publisher.take_over, publisher.step_down))
    try:
        await asyncio.wait_for(publisher.until_leading(), 10)
        await publisher.publish([OutgoingMessage(stream, b'{"t":%d}' % n, False) for n in (1, 2) for stream in streams])
        for stream in streams:
            assert [p.seq for p in await broker.history(stream, 0)] == [1, 2]
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await publisher.aclose()
        await lease.release()
        await broker.close()


# ---- bad input at start -------------------------------------------------------------------------------------


async def test_a_dead_seed_among_live_ones_still_starts(cluster: LocalCluster) -> None:
    dead = free_port()
    url = f"redis+cluster://127.0.0.1:{dead},127.0.0.1:{cluster.ports[0]}/"
    broker = ClusterBroker(url, prefix=prefix())
    await broker.start()
    try:
        assert broker.connected
    finally:
        await broker.close()


async def test_bad_clusters_stop_the_gateway_at_start_with_one_line_naming_the_setting() -> None:
    nodes = _Processes()
    standalone = PrivateRedis.on_tcp()
    await standalone.start()
    try:
        # A cluster node with no slot assigned: cluster_state:fail, every query CLUSTERDOWN.
        down, bus = _free_port_pair([])
        nodes.start(
            down, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{down}.conf", "--cluster-port", str(bus)
        )
        cases = {
            f"redis+cluster://127.0.0.1:{down}/": "the cluster is down (CLUSTERDOWN",
            f"redis+cluster://127.0.0.1:{standalone.port}/": "not a Redis Cluster node",
            f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/": "no node of the cluster answered",
        }
        runs = await asyncio.gather(
            *(
                run_pricegate(
                    "gateway", "--port", "0", env={"PRICEGATE_REDIS_URL": url, "PRICEGATE_SHUTDOWN_DRAIN_S": "0"}
                )
                for url in cases
            )
        )
        for (code, output), expected in zip(runs, cases.values(), strict=True):
            lines = [line for line in output.splitlines() if line.strip()]
            assert code == 2, output
            assert "Traceback" not in output, output
            assert "configuration error: PRICEGATE_REDIS_URL=" in lines[-1] and expected in lines[-1], output
    finally:
        nodes.stop_all()
        await standalone.kill()


# ---- real processes -----------------------------------------------------------------------------------------

# A leader that never looks at its own clock: it takes the lease (announcing its epoch in every slot), then
# publishes a marked message on each stream every 50 ms whatever happens, and prints each outcome per shard.
PAUSED_LEADER = """
import asyncio, sys
from ingest.publish.leader import LeaderLease
from shared.broker.contract import OutgoingMessage
from shared.broker.redis_cluster import ClusterBroker
from shared.errors import BrokerError, NotLeaderError
from shared.streams import ChannelNamer

async def main(url, prefix, streams):
    broker = ClusterBroker(url, prefix=prefix)
    await broker.start()
    lease = LeaderLease(url, ChannelNamer(prefix, "binance").leader_key, ttl_s=1.0, renew_s=0.2,
                        fence=broker.take_fencing_epoch)
    async def acquired():
        print("leading", lease.fencing_epoch, flush=True)
    task = asyncio.create_task(lease.run(acquired, lambda reason: None))
    while broker.fencing_epoch is None:
        await asyncio.sleep(0.01)
    n = 0
    while True:
        n += 1
        for stream in streams:
            try:
                await broker.publish([OutgoingMessage(stream, b'{"probe":%d}' % n, False)], fencing_token=lease.token)
                print("published", stream, flush=True)
            except NotLeaderError:
                print("refused", stream, flush=True)
            except BrokerError as error:
                print("error", stream, error, flush=True)
        await asyncio.sleep(0.05)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3].split(",")))
"""


@pytest.mark.timeout(60)
async def test_a_paused_leader_cannot_publish_on_any_shard_after_a_standby_took_over(cluster: LocalCluster) -> None:
    key_prefix = prefix()
    symbols = one_symbol_per_shard(cluster)
    streams = [f"{symbol.lower()}@trade" for symbol in symbols]
    namer = ChannelNamer(key_prefix, "binance")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(PAUSED_LEADER)
    probe = await asyncio.create_subprocess_exec(
        sys.executable, script.name, cluster.url, key_prefix, ",".join(streams),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []

    async def read() -> None:
        assert probe.stdout is not None
        while line := await probe.stdout.readline():
            lines.append(line.decode().strip())

    reader = asyncio.create_task(read())
    try:
        async with processes() as started:
            await eventually(lambda: any(line.startswith("leading") for line in lines), what="the probe leads")
            await eventually(lambda: sum(line.startswith("published") for line in lines) >= 9, what="its publishes")
            probe.send_signal(signal.SIGSTOP)  # paused: no renewal, no publishing, no notice of anything
            standby = await start_pricegate(
                "ingest", env=env(cluster, key_prefix, symbols, PRICEGATE_ALWAYS_ON_STREAMS=",".join(streams))
            )
            started.append(standby)
            await standby.wait_for_line(r"took the leader lease .* \(fencing epoch \d+\)", timeout=20)
            await standby.wait_for_line(r"leading: \d+ buffered messages", timeout=20)
            before = len(lines)
            probe.send_signal(signal.SIGCONT)
            # Its next publishes on each of the three shards: every one refused by the script.
            await eventually(
                lambda: {line.split()[1] for line in lines[before:] if line.startswith("refused")} == set(streams),
                timeout=10,
                what="the paused leader refused on every shard",
            )
            after_resume = lines[before:]
            assert not [line for line in after_resume if line.startswith("published")], after_resume[:10]
            # Nothing of the probe's reached any stream's history after the standby took over.

            def payloads(stream: str) -> list[bytes]:
                key = namer.keys(stream).history
                with cluster.client(cluster.owner(key_slot(key))) as client:
                    entries = client.xrange(key)
                return [fields[b"e"].split(b":", 3)[3] for _, fields in entries]

            def standby_published() -> bool:
                return all(any(b'"probe"' not in payload for payload in payloads(stream)) for stream in streams)

            await eventually(standby_published, what="the standby's trades on every stream")
            for stream in streams:
                history = payloads(stream)
                first_new = next(i for i, payload in enumerate(history) if b'"probe"' not in payload)
                assert all(b'"probe"' not in payload for payload in history[first_new:]), stream
    finally:
        if probe.returncode is None:
            probe.kill()
            await probe.wait()
        await reader
        os.unlink(script.name)


@pytest.mark.timeout(60)
async def test_two_gateways_hold_two_shard_subscriptions_and_their_clients_see_the_same_events(
    cluster: LocalCluster,
) -> None:
    key_prefix = prefix()
    (symbol,) = one_symbol_per_shard(cluster)[:1]
    stream = f"{symbol.lower()}@trade"
    channel = ChannelNamer(key_prefix, "binance").channel(stream)
    async with processes() as started:
        _, ports = await start_stack(started, env(cluster, key_prefix, [symbol]), gateways=2)
        async with clients(ports, stream) as (first, second):
            await eventually(lambda: len(first.ids(stream)) > 50 and len(second.ids(stream)) > 50, what="trades")
            owner = cluster.owner(key_slot(channel))
            assert shard_subscribers(cluster, channel) == {p: 2 if p == owner else 0 for p in cluster.primaries()}
            assert classic_subscribers(cluster, channel) == 0
        common = set(first.ids(stream)) & set(second.ids(stream))
        assert len(common) > 40
        assert [i for i in first.ids(stream) if i in common] == [i for i in second.ids(stream) if i in common]
        for trades in (first, second):
            assert assert_never_back_or_twice(trades.ids(stream), "trade ids") == []


@pytest.mark.timeout(60)
async def test_a_live_streams_slot_resharded_to_another_primary(cluster: LocalCluster) -> None:
    """``redis-cli --cluster reshard`` moves the lowest slot of a primary: the stream is picked to live there."""
    key_prefix = prefix()
    layout = sorted(cluster.slots())
    first, _, source, _ = layout[len(layout) // 2]
    symbol = symbol_in_slot({first})
    stream = f"{symbol.lower()}@trade"
    channel = ChannelNamer(key_prefix, "binance").channel(stream)
    target = next(port for port in cluster.primaries() if port != source)
    async with processes() as started:
        _, ports = await start_stack(started, env(cluster, key_prefix, [symbol]), gateways=2)
        async with clients(ports, stream) as all_trades:
            await eventually(lambda: all(len(t.ids(stream)) > 50 for t in all_trades), what="trades before")
            moved = time.monotonic()
            cluster.cli(
                "--cluster", "reshard", f"127.0.0.1:{source}", "--cluster-from", cluster.node_id(source),
                "--cluster-to", cluster.node_id(target), "--cluster-slots", "1", "--cluster-yes",
            )  # fmt: skip
            assert cluster.owner(key_slot(channel)) == target
            await eventually(
                lambda: all(t.after(moved + 0.5) > 20 for t in all_trades), timeout=10, what="trades after the move"
            )
            resumed = [min(at for at, _, _ in t.seen if at > moved) - moved for t in all_trades]
            assert shard_subscribers(cluster, channel) == {p: 2 if p == target else 0 for p in cluster.primaries()}
        for port, trades in zip(ports, all_trades, strict=True):
            lost = await scrape(port, "pricegate_gateway_broker_lost_messages_total")
            assert_nothing_lost_uncounted(trades.ids(stream), lost, f"gateway {port}")
        print(f"slot {first} resharded: clients had trades {max(resumed):.2f} s after the move started")


@pytest.mark.timeout(90)
async def test_a_primary_killed_and_its_replica_promoted(cluster: LocalCluster) -> None:
    key_prefix = prefix()
    (symbol,) = one_symbol_per_shard(cluster)[1:2]
    stream = f"{symbol.lower()}@trade"
    channel = ChannelNamer(key_prefix, "binance").channel(stream)
    slot = key_slot(channel)
    async with processes() as started:
        _, ports = await start_stack(started, env(cluster, key_prefix, [symbol]), gateways=2)
        async with clients(ports, stream) as all_trades, httpx.AsyncClient() as http:
            await eventually(lambda: all(len(t.ids(stream)) > 100 for t in all_trades), what="trades before")
            owner = cluster.owner(slot)
            replica = cluster.replicas_of(owner)[0]
            cluster.kill(owner)
            killed = time.monotonic()
            # While no primary serves the slot, gateways say why they are not ready (and keep retrying).
            reasons: list[str] = []

            async def unready() -> bool:
                response = await http.get(f"http://127.0.0.1:{ports[0]}/readyz")
                if response.status_code == 503 and response.json()["broker_problem"]:
                    reasons.append(response.json()["broker_problem"])
                return bool(reasons)

            await eventually(unready, timeout=5, interval=0.05, what="/readyz false with the reason")

            def promoted() -> bool:
                try:
                    return cluster.owner(slot) == replica
                except (redis.exceptions.RedisError, StopIteration):
                    return False

            await eventually(promoted, timeout=20, interval=0.05, what="the replica's promotion")
            promotion = time.monotonic()
            await eventually(
                lambda: all(t.after(promotion) > 0 for t in all_trades),
                timeout=RESUME_AFTER_PROMOTION_S,
                what="trades on every gateway after the promotion",
            )
            resumed = [min(at for at, _, _ in t.seen if at > promotion) - promotion for t in all_trades]
            await eventually(lambda: all(t.after(promotion) > 100 for t in all_trades), what="trades flowing")
            for port in ports:
                body = (await http.get(f"http://127.0.0.1:{port}/readyz")).json()
                assert body["ready"] and body["broker_problem"] is None, body
        missed = []
        for port, trades in zip(ports, all_trades, strict=True):
            lost = await scrape(port, "pricegate_gateway_broker_lost_messages_total")
            missed.append(assert_nothing_lost_uncounted(trades.ids(stream), lost, f"gateway {port}"))
        print(
            f"primary killed: promoted after {promotion - killed:.2f} s; clients had trades again "
            f"{max(resumed):.2f} s after the promotion; ids missed and counted: {missed}; first reason: {reasons[0]}"
        )
    cluster.restart(owner)  # back as a replica of the new primary, for whatever runs next
