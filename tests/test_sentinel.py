"""Redis Sentinel (``redis+sentinel://s1,s2,s3/<master>``): a master, its replica and three Sentinels of the module's
own (``tests/redis_server.py``), under real ``pricegate`` processes.

- The broker and the lease on the master the Sentinels name: publishing (fenced by token and epoch), subscriptions,
  history.
- Writes lost in the asynchronous replication window: a replica promoted without the last writes the old master
  confirmed continues each stream's sequence after the publisher's floor, so gateways see a gap (repaired from what
  history holds, the rest counted as lost), never the same seq for another message.
- The master killed: the Sentinels promote the replica, ingest and the gateway follow it, and the gateway's client
  gets trades again within 10 s of the master's death; ids never repeat or go backwards and every id the client
  missed is counted; ``/readyz`` says why meanwhile.
- Bad input at start: a master name no Sentinel knows, a master the Sentinels name that does not answer, Sentinels
  that do not answer: one line naming PRICEGATE_REDIS_URL each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from gateway.sequencer import StreamCursor, Verdict
from shared.broker.contract import OutgoingMessage
from shared.broker.redis import RedisBroker, SentinelBroker
from tests.polling import eventually
from tests.processes import free_port, run_pricegate, start_pricegate
from tests.redis_server import MASTER_NAME, LocalSentinel, _Processes
from tests.test_broker_outage import Trades, assert_never_back_or_twice, processes, scrape

pytestmark = pytest.mark.integration

RESUME_AFTER_DEATH_S = 10.0  # the bound: clients get the stream again within 10 s of the master's death
TRADE = "btcusdt@trade"


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalSentinel]:
    local = LocalSentinel().start()
    try:
        yield local
    finally:
        local.stop()


def prefix() -> str:
    return f"pgtest{uuid.uuid4().hex[:8]}"


class Recorder:
    def __init__(self) -> None:
        self.seqs: list[int] = []

    def on_publication(self, stream: str, publication: object) -> None:
        self.seqs.append(publication.seq)  # type: ignore[attr-defined]

    def on_heartbeat(self, published_at_ms: int) -> None:
        pass

    def on_broker_reconnect(self) -> None:
        pass


async def test_the_broker_works_on_the_master_the_sentinels_name(sentinel: LocalSentinel) -> None:
    key_prefix = prefix()
    ingest, gateway = SentinelBroker(sentinel.url, prefix=key_prefix), SentinelBroker(sentinel.url, prefix=key_prefix)
    recorder = Recorder()
    await ingest.start()
    gateway.set_listener(recorder)
    await gateway.start()
    try:
        await gateway.subscribe([TRADE])
        await ingest.take_fencing_epoch(5)
        master = aioredis.Redis(port=sentinel.master())
        await master.set(ingest.namer.leader_key, "me")
        published = await ingest.publish(
            [OutgoingMessage(TRADE, b'{"t":%d}' % n, False) for n in (1, 2, 3)], fencing_token="me"
        )
        assert [p.seq for p in published] == [1, 2, 3]
        await eventually(lambda: recorder.seqs == [1, 2, 3], what="delivery")
        assert [p.seq for p in await gateway.history(TRADE, 1)] == [2, 3]
        ingest.fencing_epoch = 4  # a later leader announced 5: refused although the token matches
        with pytest.raises(Exception, match="NOTLEADER"):
            await ingest.publish([OutgoingMessage(TRADE, b'{"t":4}', False)], fencing_token="me")
        await master.aclose()
    finally:
        await ingest.close()
        await gateway.close()


async def test_a_replica_promoted_without_the_last_writes_continues_after_them_and_the_gap_is_counted() -> None:
    """Deterministic: the replica stops replicating (as if the master died right then), the master confirms three
    more; publishing then goes on at the 'promoted' replica with the same broker state the process had."""
    # Servers of the test's own, each in a directory of its own (a replica writes the master's snapshot there).
    nodes = _Processes()
    master_port, replica_port = free_port(), free_port()
    nodes.start(master_port, "--repl-diskless-sync-delay", "0")  # the replica syncs at once, not after 5 s
    nodes.start(replica_port, "--replicaof", "127.0.0.1", str(master_port))
    key_prefix = prefix()
    primary, plain = aioredis.Redis(port=master_port), aioredis.Redis(port=replica_port)
    # With the floors a SentinelBroker keeps (a failover is part of its design).
    old = RedisBroker(f"redis://127.0.0.1:{master_port}/0", prefix=key_prefix, seq_floors=True)
    promoted = RedisBroker(f"redis://127.0.0.1:{replica_port}/0", prefix=key_prefix, seq_floors=True)
    try:
        await old.start()
        published = await old.publish([OutgoingMessage(TRADE, b'{"t":%d}' % n, False) for n in range(1, 6)])

        async def in_sync() -> bool:
            return bool(await primary.wait(1, 100))

        await eventually(in_sync, what="the replica in sync")
        await plain.replicaof("NO", "ONE")  # promoted with seq 5
        later = await old.publish([OutgoingMessage(TRADE, b'{"t":%d}' % n, False) for n in (6, 7, 8)])
        assert [p.seq for p in later] == [6, 7, 8]  # confirmed by the old master, never replicated
        promoted._calls.floors.update(old._calls.floors)  # the same process, now talking to the new master
        await promoted.start()
        (next_one,) = await promoted.publish([OutgoingMessage(TRADE, b'{"t":9}', False)])
        assert (next_one.epoch, next_one.seq) == (published[0].epoch, 9)  # never seq 6 again for another trade
        # A gateway that had delivered seq 5 sees the jump and repairs from the new master's history: 3 lost.
        cursor = StreamCursor()
        for publication in published:
            cursor.judge(publication)
        assert cursor.judge(next_one) is Verdict.REPAIR
        result = cursor.finish_repair(await promoted.history(TRADE, cursor.seq))
        assert result.lost == 3 and result.payloads == [b'{"t":9}']
    finally:
        await old.close()
        await promoted.close()
        await primary.aclose()
        await plain.aclose()
        nodes.stop_all()


async def test_bad_sentinel_urls_stop_the_gateway_at_start_with_one_line_naming_the_setting(
    sentinel: LocalSentinel,
) -> None:
    nodes = _Processes()
    try:
        # A Sentinel watching a master that does not answer (nothing listens on its port).
        watcher = free_port()
        nodes.start_sentinel(watcher, "ghost", free_port(), quorum=1, down_after_ms=60_000)
        sentinels = ",".join(f"127.0.0.1:{port}" for port in sentinel.sentinel_ports)
        cases = {
            f"redis+sentinel://127.0.0.1:{watcher}/ghost": f"Sentinels (127.0.0.1:{watcher}) name for 'ghost'",
            f"redis+sentinel://{sentinels}/nosuchmaster": "no Sentinel of",
            f"redis+sentinel://127.0.0.1:{free_port()}/{MASTER_NAME}": "no Sentinel of",
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
            assert code == 2 and "Traceback" not in output, output
            assert "configuration error: PRICEGATE_REDIS_URL=" in lines[-1] and expected in lines[-1], output
    finally:
        nodes.stop_all()


@pytest.mark.timeout(60)
async def test_the_master_killed_ingest_and_gateway_follow_the_promoted_replica(sentinel: LocalSentinel) -> None:
    key_prefix = prefix()
    env = {
        "PRICEGATE_REDIS_URL": sentinel.url,
        "PRICEGATE_CHANNEL_PREFIX": key_prefix,
        "PRICEGATE_INGEST_METRICS_PORT": "0",
        "PRICEGATE_SYNTHETIC_TRADE_RATE": "100",
        "PRICEGATE_SHUTDOWN_DRAIN_S": "0.3",
    }
    async with processes() as started:
        ingest = await start_pricegate("ingest", env=env)
        started.append(ingest)
        port = free_port()
        started.append(await start_pricegate("gateway", "--port", str(port), env=env))
        await ingest.wait_for_line(r"pricegate ingest: synthetic source publishing")
        await started[-1].wait_for_line(r"pricegate is serving on")
        trades = Trades()
        reasons: list[str] = []
        async with contextlib.AsyncExitStack() as stack:
            ws = await stack.enter_async_context(connect(f"ws://127.0.0.1:{port}/ws/{TRADE}"))
            reader = asyncio.create_task(trades.read(ws))
            http = await stack.enter_async_context(httpx.AsyncClient())
            await eventually(lambda: len(trades.ids()) > 100, what="trades before")
            old_master = sentinel.master()
            sentinel.kill(old_master)
            died = time.monotonic()

            async def unready() -> bool:
                response = await http.get(f"http://127.0.0.1:{port}/readyz")
                if response.status_code == 503 and response.json()["broker_problem"]:
                    reasons.append(response.json()["broker_problem"])
                return bool(reasons)

            await eventually(unready, timeout=5, interval=0.05, what="/readyz false with the reason")
            await eventually(
                lambda: trades.after(died) > 0 and sentinel.master() != old_master,
                timeout=RESUME_AFTER_DEATH_S,
                what="trades after the failover",
            )
            resumed = min(at for at, _, _ in trades.seen if at > died) - died
            await eventually(lambda: trades.after(died + resumed) > 100, what="trades flowing again")
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        gaps = assert_never_back_or_twice(trades.ids(), "trade ids")
        missed = sum(after - before - 1 for before, after in gaps)
        lost = await scrape(port, "pricegate_gateway_broker_lost_messages_total")
        assert missed == lost, (missed, lost, gaps)
        for process in started:
            assert "Traceback" not in "".join(process.output), "".join(process.output)[-3000:]
        print(f"master killed: the client had trades again {resumed:.2f} s later; {missed} ids missed and counted")
