"""What gateway replicas share beside the broker, on a Redis Cluster and behind Sentinel (``tests/redis_server.py``:
a 3+3 cluster and a master + replica + 3 Sentinels of the module's own), with real PostgreSQL and uvicorn gateways:

- API keys (``PRICEGATE_AUTH=apikey``): a handshake storm on two gateways costs one database lookup (the entry and
  the lookup lock in one slot), per-key connection counts reach the other gateway (on the cluster from hashes on two
  shards), and ``pricegate keys revoke`` deletes the shared entry: both gateways refuse the key and close its
  connections with 4403 within the cache TTL.
- The REST response cache: a body computed by one gateway is a hit on the other; single flight across replicas (one
  computation, the other replica takes its result) on both deployments.
- Failovers: a Sentinel master killed and its replica promoted (handshakes keep working meanwhile: the database is
  asked directly), a cluster primary serving a key's entry killed and its replica promoted; afterwards the key cache
  and the REST cache are shared through the new master or primary again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.auth.api_keys import ApiKeys
from gateway.auth.key_validator import lock_key, redis_key
from gateway.auth.service import Authenticator
from gateway.rest.cache import RedisResponseCache, SingleFlight
from shared.broker.memory import MemoryBroker
from shared.candles.memory import MemoryCandleStore
from shared.redis.clients import state_client
from shared.redis.slots import key_slot
from tests.auth_support import auth_settings, key_table, raw_handshake
from tests.harness import RunningGateway, running_gateway
from tests.polling import eventually
from tests.processes import run_pricegate
from tests.redis_server import LocalCluster, LocalSentinel
from tests.test_rest import past_hours
from tests.test_single_flight import Backend

pytestmark = pytest.mark.integration

TTL_S = 2.0  # PRICEGATE_AUTH_CACHE_TTL_S here: revocation is seen within it (plus a second and a lookup)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster().start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalSentinel]:
    local = LocalSentinel().start()
    try:
        yield local
    finally:
        local.stop()


@dataclass
class Deployment:
    kind: str
    url: str
    cluster: LocalCluster | None = None


@pytest.fixture(params=["cluster", "sentinel"])
def deployment(request: pytest.FixtureRequest) -> Deployment:
    local = request.getfixturevalue(request.param)
    assert isinstance(local, LocalCluster | LocalSentinel)
    return Deployment(request.param, local.url, local if isinstance(local, LocalCluster) else None)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def authenticator(gw: RunningGateway) -> Authenticator:
    auth = gw.app.state.auth
    assert isinstance(auth, Authenticator)
    return auth


def db_lookups(*gateways: RunningGateway) -> int:
    total = 0
    for gw in gateways:
        keys = authenticator(gw).keys
        assert keys is not None
        total += keys.db_lookups
    return total


async def stored(url: str, key: str) -> bool:
    """Whether ``key`` exists, asked through a client of the deployment (on a cluster: the slot's primary)."""
    client = state_client(url, max_connections=1, timeout_s=2)
    try:
        async with client.turn() as redis:
            return bool(await redis.exists(key))
    finally:
        await client.aclose()


async def two_keys_on_two_shards(keys: ApiKeys, prefix: str, cluster: LocalCluster | None) -> tuple[str, str]:
    """Two keys whose connection-count hashes live on different primaries (any two keys off a cluster)."""
    first = await keys.create("first")

    def owner(key: str) -> int:
        assert cluster is not None
        return cluster.owner(key_slot(f"{prefix}:auth:conns:apikey:{digest(key)[:16]}"))

    second = await keys.create("second")
    while cluster is not None and owner(second) == owner(first):
        second = await keys.create("second")
    return first, second


async def closed_with(ws: ClientConnection, timeout: float) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), timeout)
    return None if closed.value.rcvd is None else closed.value.rcvd.code


async def test_api_keys_are_checked_once_counted_and_revoked_across_two_gateways(
    deployment: Deployment, postgres_dsn: str, pg_schema: str, key_prefix: str
) -> None:
    storm = 100  # handshakes per gateway and key, all at once
    async with key_table(postgres_dsn, pg_schema) as keys:
        key, other = await two_keys_on_two_shards(keys, key_prefix, deployment.cluster)
        overrides = auth_settings(
            postgres_dsn, pg_schema, deployment.url, key_prefix, auth_cache_ttl_s=TTL_S, max_connections_per_key=1000
        )
        async with (
            running_gateway(MemoryBroker(), **overrides) as first,
            running_gateway(MemoryBroker(), **overrides) as second,
        ):
            answers = await asyncio.gather(
                *(
                    raw_handshake(gw.port, headers={"X-MBX-APIKEY": credential})
                    for credential in (key, other)
                    for gw in (first, second)
                    for _ in range(storm)
                )
            )
            assert [answer.status for answer in answers] == [101] * len(answers)
            assert db_lookups(first, second) == 2  # one per key, however many handshakes on however many gateways
            assert key_slot(lock_key(key_prefix, digest(key))) == key_slot(redis_key(key_prefix, digest(key)))
            assert await stored(deployment.url, redis_key(key_prefix, digest(key)))

            # Each gateway learns the other's connections through Redis (hashes on two shards on the cluster).
            def counted(gw: RunningGateway) -> bool:
                counts = authenticator(gw).counts
                return all(counts.total(f"apikey:{digest(k)[:16]}") == 2 * storm for k in (key, other))

            await eventually(lambda: counted(first) and counted(second), what="counts from the other gateway")

            async with (
                connect(f"{first.ws_base}/ws/btcusdt@trade", additional_headers={"X-MBX-APIKEY": key}) as on_first,
                connect(f"{second.ws_base}/ws/btcusdt@trade", additional_headers={"X-MBX-APIKEY": key}) as on_second,
            ):
                env = {
                    "PRICEGATE_DATABASE_URL": postgres_dsn,
                    "PRICEGATE_DATABASE_SCHEMA": pg_schema,
                    "PRICEGATE_REDIS_URL": deployment.url,
                    "PRICEGATE_CHANNEL_PREFIX": key_prefix,
                }
                code, output = await run_pricegate("keys", "revoke", key, env=env)
                revoked_at = time.monotonic()
                assert code == 0 and output.startswith("revoked key ") and "could not be cleared" not in output, output
                assert not await stored(deployment.url, redis_key(key_prefix, digest(key)))  # the shared entry is gone
                codes = await asyncio.gather(closed_with(on_first, TTL_S + 3), closed_with(on_second, TTL_S + 3))
                assert list(codes) == [4403, 4403]
                print(f"{deployment.kind}: both connections closed {time.monotonic() - revoked_at:.2f} s after revoke")
            for gw in (first, second):
                refused = await raw_handshake(gw.port, headers={"X-MBX-APIKEY": key})
                assert refused.status == 401 and refused.body == b"API key revoked"
                refused.close()
            kept = await raw_handshake(second.port, headers={"X-MBX-APIKEY": other})
            assert kept.status == 101
            for answer in [*answers, kept]:
                answer.close()


@contextlib.asynccontextmanager
async def two_gateways(url: str, prefix: str, **extra: Any) -> AsyncIterator[tuple[RunningGateway, RunningGateway]]:
    """Two gateways sharing ``url`` (each with its own response cache client), candles in memory."""
    store = MemoryCandleStore()
    await store.upsert(past_hours(60))
    overrides = {"redis_url": url, "channel_prefix": prefix, "symbols": "BTCUSDT,ETHUSDT", **extra}
    async with (
        running_gateway(MemoryBroker(), candles=store, **overrides) as first,
        running_gateway(MemoryBroker(), candles=store, **overrides) as second,
    ):
        yield first, second


async def klines(gw: RunningGateway, limit: int, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.http_base, headers=headers) as http:
        response = await http.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "limit": limit})
    assert response.status_code == 200, response.text
    return response


async def test_a_response_one_gateway_cached_is_a_hit_on_the_other(deployment: Deployment, key_prefix: str) -> None:
    async with two_gateways(deployment.url, key_prefix) as (first, second):
        computed = await klines(first, 20)
        shared = await klines(second, 20)
        assert computed.headers["x-pricegate-cache"] == "miss" and shared.headers["x-pricegate-cache"] == "hit"
        assert shared.content == computed.content


async def test_one_computation_across_replicas_and_the_lock_in_its_entrys_slot(
    deployment: Deployment, key_prefix: str
) -> None:
    caches = [RedisResponseCache(deployment.url, key_prefix) for _ in range(2)]
    first, second = (SingleFlight(cache, stale_s=60, lock_ttl_ms=5000) for cache in caches)
    backend = Backend(delay_s=0.3)
    key = "klines:BTCUSDT:1h:0:0:20"
    try:
        assert key_slot(caches[0].lock_key(key)) == key_slot(caches[0].entry_key(key))
        one, two = await asyncio.gather(first.get("e", key, 10, backend), second.get("e", key, 10, backend))
        assert backend.calls == 1 and one.body == two.body == b"body-1"
        assert sorted([one.result, two.result]) == ["coalesced", "miss"]
        assert await stored(deployment.url, caches[0].entry_key(key))
        assert not await stored(deployment.url, caches[0].lock_key(key))  # released by its holder
        odd = caches[0].entry_key("a{b}c")  # a key holding braces is stored under its digest: lock and entry agree
        assert "{" not in odd and key_slot(caches[0].lock_key("a{b}c")) == key_slot(odd)
    finally:
        for cache in caches:
            await cache.aclose()


@pytest.mark.timeout(60)
async def test_keys_and_the_rest_cache_keep_working_when_a_cluster_primary_fails_over(
    cluster: LocalCluster, postgres_dsn: str, pg_schema: str, key_prefix: str
) -> None:
    """The primary serving a key's entry killed, its replica promoted (the last cluster test: no replica is left)."""
    async with key_table(postgres_dsn, pg_schema) as keys:
        before, after = await keys.create("before"), await keys.create("after")
        slot = key_slot(redis_key(key_prefix, digest(after)))
        overrides = auth_settings(postgres_dsn, pg_schema, cluster.url, key_prefix)
        del overrides["redis_url"], overrides["channel_prefix"]
        headers = {"X-MBX-APIKEY": before}
        async with two_gateways(cluster.url, key_prefix, **overrides) as (first, second):
            opened = [await raw_handshake(gw.port, headers=headers) for gw in (first, second)]
            assert [answer.status for answer in opened] == [101, 101] and db_lookups(first, second) == 1
            assert (await klines(first, 10, headers)).headers["x-pricegate-cache"] == "miss"
            assert (await klines(second, 10, headers)).headers["x-pricegate-cache"] == "hit"

            old_primary = cluster.owner(slot)
            cluster.kill(old_primary)
            killed_at = time.monotonic()
            await eventually(lambda: cluster.owner(slot) != old_primary, what="the replica promoted", timeout=20)
            print(f"the slot's replica was promoted {time.monotonic() - killed_at:.1f} s after its primary's death")
            lookups = db_lookups(first, second)
            admitted = [await raw_handshake(gw.port, headers={"X-MBX-APIKEY": after}) for gw in (first, second)]
            assert [answer.status for answer in admitted] == [101, 101]
            assert db_lookups(first, second) == lookups + 1  # the second gateway read the entry on the new primary
            with cluster.client(cluster.owner(slot)) as new_primary:
                assert new_primary.exists(redis_key(key_prefix, digest(after))) == 1
            assert (await klines(first, 15, headers)).headers["x-pricegate-cache"] == "miss"
            assert (await klines(second, 15, headers)).headers["x-pricegate-cache"] == "hit"
            for answer in [*opened, *admitted]:
                answer.close()


@pytest.mark.timeout(60)
async def test_keys_and_the_rest_cache_keep_working_when_the_sentinel_master_moves(
    sentinel: LocalSentinel, postgres_dsn: str, pg_schema: str, key_prefix: str
) -> None:
    """Last in the module: its Sentinel setup has no replica left afterwards."""
    async with key_table(postgres_dsn, pg_schema) as keys:
        before, during, after = [await keys.create(label) for label in ("before", "during", "after")]
        overrides = auth_settings(postgres_dsn, pg_schema, sentinel.url, key_prefix)
        del overrides["redis_url"], overrides["channel_prefix"]
        async with two_gateways(sentinel.url, key_prefix, **overrides) as (first, second):
            opened = [await raw_handshake(gw.port, headers={"X-MBX-APIKEY": before}) for gw in (first, second)]
            assert [answer.status for answer in opened] == [101, 101] and db_lookups(first, second) == 1
            headers = {"X-MBX-APIKEY": before}
            assert (await klines(first, 10, headers)).headers["x-pricegate-cache"] == "miss"
            assert (await klines(second, 10, headers)).headers["x-pricegate-cache"] == "hit"

            old_master = sentinel.master()
            sentinel.kill(old_master)
            killed_at = time.monotonic()
            # Meanwhile a key no cache knows is still admitted: the database is asked directly.
            meanwhile = await raw_handshake(first.port, headers={"X-MBX-APIKEY": during})
            assert meanwhile.status == 101
            await eventually(lambda: sentinel.master() != old_master, what="the replica promoted", timeout=20)
            new_master = aioredis.Redis(port=sentinel.master())
            print(f"the replica was promoted {time.monotonic() - killed_at:.1f} s after the master's death")
            try:
                # A new key: one lookup for both gateways, its entry shared through the new master.
                lookups = db_lookups(first, second)
                admitted = [await raw_handshake(gw.port, headers={"X-MBX-APIKEY": after}) for gw in (first, second)]
                assert [answer.status for answer in admitted] == [101, 101]
                assert db_lookups(first, second) == lookups + 1
                assert await new_master.exists(redis_key(key_prefix, digest(after))) == 1
                # A new response: computed by one gateway, a hit on the other, through the new master.
                assert (await klines(first, 15, headers)).headers["x-pricegate-cache"] == "miss"
                assert (await klines(second, 15, headers)).headers["x-pricegate-cache"] == "hit"
                for gw in (first, second):
                    async with httpx.AsyncClient() as http:
                        status = (await http.get(f"{gw.http_base}/readyz")).json()["auth"]
                    assert status["shared_cache"] == "ok", status
            finally:
                await new_master.aclose()
            for answer in [*opened, meanwhile, *admitted]:
                answer.close()
