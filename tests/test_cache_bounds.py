"""The REST response cache is bounded whatever clients send: the in-memory cache by bytes (LRU), either cache by
the size of one entry, single flight by what is in flight; klines are keyed by the candles they cover, so
arbitrary timestamps inside the same windows share one entry and the body is exactly what an uncached gateway
answers. Checked on the cache objects, on real gateways (memory and Redis caches), and as issue 10's probe: 2,900
klines requests with distinct ``endTime`` values against a real ``pricegate demo``, measuring its RSS."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.rest.api import RestApi
from gateway.rest.cache import ENTRY_OVERHEAD_BYTES, MemoryResponseCache, RedisResponseCache, SingleFlight
from shared.broker.memory import MemoryBroker
from shared.candles.memory import MemoryCandleStore
from shared.errors import UpstreamError
from shared.intervals import MINUTE_MS, candle_window
from tests.harness import RunningGateway, running_gateway
from tests.processes import free_port, start_pricegate
from tests.test_rest import past_hours

SYMBOLS = "BTCUSDT,ETHUSDT,BNBUSDT"
HOUR = 3_600_000


def rest_api(gateway: RunningGateway) -> RestApi:
    api = gateway.app.state.rest
    assert isinstance(api, RestApi)
    return api


def memory_cache(gateway: RunningGateway) -> MemoryResponseCache:
    cache = rest_api(gateway).cache
    assert isinstance(cache, MemoryResponseCache)
    return cache


async def test_the_memory_cache_holds_at_most_max_bytes_least_recently_used_out_first() -> None:
    cache = MemoryResponseCache(max_bytes=100_000)
    rng = random.Random(10)
    await cache.put("kept", b"k" * 1000, 0, 3600)
    for i in range(2000):
        await cache.put(f"key:{i}", bytes(rng.randrange(0, 6000)), 0, 3600)
        assert await cache.get("kept") is not None  # read after every write: never the least recently used
        assert cache.bytes <= cache.max_bytes
    live = {f"key:{i}": entry for i in range(2000) if (entry := await cache.get(f"key:{i}")) is not None}
    assert 10 < len(live) < 100 and list(live) == [f"key:{i}" for i in range(2000 - len(live), 2000)]  # the newest
    kept = await cache.get("kept")
    assert kept is not None and len(cache) == len(live) + 1
    # the account is exact: bodies, keys and the per-entry overhead
    costs = [MemoryResponseCache.entry_cost(key, entry.body) for key, entry in [*live.items(), ("kept", kept)]]
    assert cache.bytes == sum(costs) and costs[-1] == len("kept") + 1000 + ENTRY_OVERHEAD_BYTES


async def test_a_replaced_entry_is_accounted_once_and_an_oversized_body_is_not_kept() -> None:
    cache = MemoryResponseCache(max_bytes=160_000)  # one body at most 10 000 bytes
    await cache.put("k", b"a" * 5000, 1, 60)
    await cache.put("k", b"b" * 7000, 2, 60)
    assert cache.bytes == MemoryResponseCache.entry_cost("k", b"b" * 7000) and len(cache) == 1
    await cache.put("k", b"c" * 10_001, 3, 60)  # too large: served by the caller, not kept; the older body stays
    entry = await cache.get("k")
    assert entry is not None and entry.stored_at_ms == 2
    assert cache.bytes == MemoryResponseCache.entry_cost("k", entry.body)
    await cache.put("big", b"x" * 10_001, 3, 60)
    assert await cache.get("big") is None and len(cache) == 1


async def test_expired_entries_free_their_bytes() -> None:
    now = [1000.0]
    cache = MemoryResponseCache(max_bytes=100_000, clock=lambda: now[0])
    await cache.put("k", b"x" * 100, 0, 5)
    now[0] += 6
    assert await cache.get("k") is None and cache.bytes == 0 and len(cache) == 0


async def test_single_flight_keeps_nothing_once_its_flights_land() -> None:
    flights = SingleFlight(MemoryResponseCache(max_bytes=1 << 20), stale_s=60, lock_ttl_ms=1000)

    def backend(i: int) -> Callable[[], Awaitable[bytes]]:
        async def compute() -> bytes:
            await asyncio.sleep(0.001 * (i % 5))
            if i % 7 == 0:
                raise UpstreamError("down")
            return b"x" * (i % 50)

        return compute

    async def ask(i: int) -> None:
        try:
            await flights.get("e", f"key:{i % 300}", 10, backend(i))
        except UpstreamError:
            pass

    waiters = [asyncio.create_task(ask(i)) for i in range(1000)]
    for task in waiters[::3]:
        task.cancel()  # clients that leave before their answer
    await asyncio.gather(*waiters, return_exceptions=True)
    await asyncio.sleep(0.05)  # shielded flights whose waiters all left still land
    assert flights._flights == {}


@pytest.fixture
async def store() -> MemoryCandleStore:
    memory = MemoryCandleStore()
    await memory.upsert(past_hours(1000))
    await memory.upsert(past_hours(1000, "ETHUSDT"))
    return memory


@pytest.fixture
async def gateway(store: MemoryCandleStore) -> AsyncIterator[RunningGateway]:
    async with running_gateway(
        MemoryBroker(), candles=store, symbols=SYMBOLS, cache_max_bytes="4194304", rest_weight_limit_per_min="1000000"
    ) as running:
        yield running


async def test_timestamps_inside_the_same_windows_share_one_cache_entry(gateway: RunningGateway) -> None:
    now = int(time.time() * 1000)
    current = candle_window("1h", now)[0]
    async with httpx.AsyncClient(base_url=gateway.http_base) as client:
        # every endTime in [open, close) of one past hour, and every endTime in the future (the newest candles)
        answers = [
            await client.get(
                "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "endTime": end, "limit": 100}
            )
            for end in [current - 5 * HOUR + offset for offset in range(0, HOUR, HOUR // 97)]
        ]
        future = [
            await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "endTime": end})
            for end in range(now + HOUR, now + 1000 * HOUR, 7 * HOUR)
        ]
    assert {a.status_code for a in answers + future} == {200} and len({a.content for a in answers}) == 1
    assert [a.headers["x-pricegate-cache"] for a in answers] == ["miss"] + ["hit"] * (len(answers) - 1)
    assert len({a.content for a in future}) == 1 and len(memory_cache(gateway)) == 2


async def test_distinct_windows_stay_within_the_byte_bound(gateway: RunningGateway) -> None:
    cache = memory_cache(gateway)
    async with httpx.AsyncClient(base_url=gateway.http_base) as client:
        for limit in range(1000, 700, -1):  # 300 distinct keys, ~140 KB each: 42 MB unbounded
            response = await client.get(
                "/api/v3/klines", params={"symbol": "ETHUSDT", "interval": "1h", "limit": limit}
            )
            assert response.status_code == 200 and len(response.json()) == limit - 1  # the open hour has none
            assert cache.bytes <= 4 << 20
    assert 20 <= len(cache) <= 40  # 4 MiB of ~140 KB bodies


async def test_the_cached_body_is_exactly_the_uncached_answer(store: MemoryCandleStore) -> None:
    """Random startTime/endTime/limit, once through the cache (repeated, so most are hits on an entry another
    timestamp made) and once from a gateway that caches nothing: the same bytes."""
    rng = random.Random(3)
    now = int(time.time() * 1000)
    queries = []
    for _ in range(150):
        interval = rng.choice(["1h", "1h", "1h", "1w", "1M"])  # the store holds hours
        query: dict[str, str | int] = {
            "symbol": "BTCUSDT",
            "interval": interval,
            "limit": rng.choice([1, 7, 500, 1000]),
        }
        if rng.random() < 0.6:
            query["startTime"] = now - rng.randrange(0, 1100 * HOUR)
        if rng.random() < 0.6:
            query["endTime"] = int(query.get("startTime", now - 500 * HOUR)) + rng.randrange(0, 600 * HOUR)
        queries.append(query)
    async with (
        running_gateway(MemoryBroker(), candles=store, symbols=SYMBOLS, rest_weight_limit_per_min="1000000") as cached,
        running_gateway(
            MemoryBroker(), candles=store, symbols=SYMBOLS, rest_weight_limit_per_min="1000000", cache_ttl_klines_s="0"
        ) as uncached,
        httpx.AsyncClient(base_url=cached.http_base) as through_cache,
        httpx.AsyncClient(base_url=uncached.http_base) as direct,
    ):
        results = []
        for query in queries + queries:
            one, other = (
                await through_cache.get("/api/v3/klines", params=query),
                await direct.get("/api/v3/klines", params=query),
            )
            assert (one.status_code, one.content) == (other.status_code, other.content), query
            results.append(one.headers.get("x-pricegate-cache"))
    assert results.count("hit") >= len(queries)


@pytest.mark.integration
async def test_with_redis_the_process_keeps_nothing_per_key_and_a_huge_entry_is_not_stored(
    store: MemoryCandleStore, redis_url: str, key_prefix: str
) -> None:
    async with (
        running_gateway(
            MemoryBroker(),
            candles=store,
            symbols=SYMBOLS,
            redis_url=redis_url,
            channel_prefix=key_prefix,
            cache_max_bytes="1048576",  # one entry at most 64 KiB
            rest_weight_limit_per_min="1000000",
        ) as gateway,
        httpx.AsyncClient(base_url=gateway.http_base) as client,
    ):
        api = rest_api(gateway)
        assert isinstance(api.cache, RedisResponseCache) and api.cache.max_entry_bytes == 65_536
        small = await asyncio.gather(
            *(
                client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "limit": limit})
                for limit in range(1, 201)
            )
        )
        assert {r.status_code for r in small} == {200} and api.flights._flights == {}
        huge = [await client.get("/api/v3/klines", params={"symbol": "ETHUSDT", "interval": "1h", "limit": 1000})]
        huge.append(await client.get("/api/v3/klines", params={"symbol": "ETHUSDT", "interval": "1h", "limit": 1000}))
        assert len(huge[0].content) > 65_536 and huge[0].content == huge[1].content
        assert [r.headers["x-pricegate-cache"] for r in huge] == ["miss", "miss"]  # served, never stored
        assert api.flights._flights == {}
    redis = aioredis.from_url(redis_url)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{key_prefix}:cache:v1:klines:*", count=1000)]
        assert len(keys) == 200 and not any(b":ETHUSDT:" in key for key in keys)
    finally:
        await redis.aclose()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


PROBES = 1500


@pytest.mark.integration
async def test_distinct_end_times_do_not_grow_a_demo_beyond_the_cache_bound() -> None:
    """Issue 10's probe: 2,900 klines requests with distinct endTime values, inside one IP's weight budget (2 each
    of 6000), grew a demo by 475 MiB. Now they are one cache entry. Then distinct keys of full-size bodies (every
    limit, every symbol; the weight limit raised for them) stay within PRICEGATE_CACHE_MAX_BYTES plus the
    allocator's slack (before: 334 MiB for 2,900). PROBES (1,500) of each keep the suite short: unbounded, 1,500
    bodies of ~100 KB would still be ~150 MB against the 40 MiB asserted."""
    port = free_port()
    demo = await start_pricegate(
        "demo",
        "--port", str(port),
        env={
            "PRICEGATE_LOG_LEVEL": "warning",
            "PRICEGATE_CACHE_MAX_BYTES": str(8 << 20),
            "PRICEGATE_REST_WEIGHT_LIMIT_PER_MIN": "12000",
        },
    )  # fmt: skip
    try:
        await demo.wait_for_line(r"pricegate is serving on", timeout=60)
        pid = demo.process.pid
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            base: dict[str, str | int] = {"symbol": "BTCUSDT", "interval": "1m", "limit": 1000}
            for _ in range(3):
                assert (await client.get("/api/v3/klines", params=base)).status_code == 200  # warm
            concurrency = asyncio.Semaphore(16)

            async def klines(params: dict[str, str | int]) -> int:
                async with concurrency:
                    return (await client.get("/api/v3/klines", params=params)).status_code

            before = _rss_kib(pid)
            now = int(time.time() * 1000)
            same = await asyncio.gather(*(klines({**base, "endTime": now + MINUTE_MS + i}) for i in range(PROBES)))
            same_growth = _rss_kib(pid) - before
            symbols = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT"]
            distinct = await asyncio.gather(
                *(klines({**base, "symbol": symbols[i % 5], "limit": 1000 - i // 5}) for i in range(PROBES))
            )
            distinct_growth = _rss_kib(pid) - before
    finally:
        await demo.stop()
    assert set(same) == set(distinct) == {200}
    assert same_growth < 16 * 1024, f"RSS grew {same_growth // 1024} MiB for one window's {PROBES} timestamps"
    assert distinct_growth < 40 * 1024, f"RSS grew {distinct_growth // 1024} MiB for {PROBES} keys under an 8 MiB cache"
