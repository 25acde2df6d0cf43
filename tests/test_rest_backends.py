"""REST on the real backends: candles in PostgreSQL (a fresh schema per test), the response cache in Redis,
and the exchange's REST API faked by a local server. Covered ranges come from the database, holes from the
exchange, merged without duplicates; identical misses make one backend call per replica and across replicas;
an exchange failure serves the last good body marked stale; the exchange's 429 makes the gateway back off, and
so does its own weight budget."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.rest.technicals import analyse, technicals_json
from shared.binance.rest import BinanceRest, RestUnavailable
from shared.broker.memory import MemoryBroker
from shared.candles.model import Candle, candle_from_row
from shared.candles.postgres import PostgresCandleStore
from shared.db import open_pool
from shared.intervals import HOUR_MS, candle_window
from shared.settings import Settings
from tests.fake_binance import FakeBinance, fake_kline_row
from tests.harness import message, running_gateway

pytestmark = pytest.mark.integration

SYMBOLS = "BTCUSDT,ETHUSDT,BNBUSDT,SOLUSDT"  # SOLUSDT is unknown to the fake exchange


def current_hour() -> int:
    return candle_window("1h", int(time.time() * 1000))[0]


def stored_candle(open_time: int) -> Candle:
    """What ingest stored: deliberately different from the fake exchange's candle for the same hour, so a
    response shows where each candle came from."""
    return Candle(
        "BTCUSDT", "1h", open_time, open_time + HOUR_MS - 1, "1.00000000", "3.00000000", "0.50000000", "2.00000000",
        "7.00000000", "14.00000000", 3, "1.00000000", "2.00000000",
    )  # fmt: skip


@pytest.fixture
async def store(postgres_dsn: str, pg_schema: str) -> AsyncIterator[PostgresCandleStore]:
    settings = Settings(database_url=postgres_dsn, database_schema=pg_schema, db_migrate_on_start=True)
    candles = PostgresCandleStore(await open_pool(settings))
    yield candles
    await candles.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeBinance]:
    async with FakeBinance(symbols=("BTCUSDT", "ETHUSDT", "BNBUSDT")) as exchange:
        yield exchange


def gateway_settings(fake: FakeBinance, redis_url: str, key_prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "symbols": SYMBOLS,
        "source": "binance",
        "binance_rest_url": fake.rest_url,
        "redis_url": redis_url,
        "channel_prefix": key_prefix,
        **extra,
    }


async def test_covered_ranges_come_from_postgresql_and_holes_from_the_exchange(
    store: PostgresCandleStore, fake: FakeBinance, redis_url: str, key_prefix: str
) -> None:
    now_hour = current_hour()
    stored = [stored_candle(now_hour - i * HOUR_MS) for i in range(100, 0, -1)]  # the 100 closed hours before now
    await store.upsert(stored)
    async with (
        running_gateway(MemoryBroker(), candles=store, **gateway_settings(fake, redis_url, key_prefix)) as gateway,
        httpx.AsyncClient(base_url=gateway.http_base) as client,
    ):
        covered = await client.get(
            "/api/v3/klines",
            params={"symbol": "BTCUSDT", "interval": "1h", "startTime": stored[0].open_time, "limit": 100},
        )
        assert covered.json() == [candle.kline_row() for candle in stored]
        assert fake.rest_calls("klines") == []  # fully covered: the exchange was not asked

        newest = await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "limit": 150})
        rows = newest.json()
        opens = [now_hour - i * HOUR_MS for i in range(149, -1, -1)]
        assert [row[0] for row in rows] == opens  # every hour once, oldest first
        by_store = {candle.open_time: candle.kline_row() for candle in stored}
        assert rows == [by_store.get(t, fake_kline_row("BTCUSDT", "1h", t)) for t in opens]
        # One exchange call spanning the holes (the 49 oldest hours and the open one), never per hole.
        assert len(fake.rest_calls("klines")) == 1
        assert f"startTime={opens[0]}" in fake.rest_calls("klines")[0]

        metrics = (await client.get("/metrics")).text
        assert 'pricegate_gateway_klines_candles_served_total{source="store"} 200.0' in metrics
        assert 'pricegate_gateway_klines_candles_served_total{source="exchange"} 50.0' in metrics


async def test_responses_are_cached_in_redis_under_a_versioned_key(
    store: PostgresCandleStore, fake: FakeBinance, redis_url: str, key_prefix: str
) -> None:
    query: dict[str, str | int] = {"symbol": "ETHUSDT", "interval": "1h", "limit": 10}
    async with (
        running_gateway(MemoryBroker(), candles=store, **gateway_settings(fake, redis_url, key_prefix)) as gateway,
        httpx.AsyncClient(base_url=gateway.http_base) as client,
    ):
        first = await client.get("/api/v3/klines", params=query)
        second = await client.get("/api/v3/klines", params=query)
    assert first.headers["x-pricegate-cache"] == "miss" and second.headers["x-pricegate-cache"] == "hit"
    assert first.content == second.content and len(fake.rest_calls("klines")) == 1
    client_redis = aioredis.from_url(redis_url)
    try:
        first_open = first.json()[0][0]  # the key names the candles covered: the first open time and their count
        key = f"{key_prefix}:cache:v1:klines:ETHUSDT:1h:{first_open}:10"
        cached = await client_redis.get(key)
        assert isinstance(cached, bytes), cached
        stamp, _, body = cached.partition(b":")
        assert body == first.content and abs(int(stamp) - time.time() * 1000) < 10_000
        ttl = await client_redis.ttl(key)
        assert 60 < ttl <= 60 + 900  # fresh for cache_ttl_klines_s, then kept cache_stale_s to serve stale
    finally:
        await client_redis.aclose()


async def test_concurrent_identical_misses_make_one_exchange_call(
    store: PostgresCandleStore, fake: FakeBinance, redis_url: str, key_prefix: str
) -> None:
    fake.rest_delay_s = 0.3
    query: dict[str, str | int] = {"symbol": "BNBUSDT", "interval": "1h", "limit": 20}
    async with (
        running_gateway(MemoryBroker(), candles=store, **gateway_settings(fake, redis_url, key_prefix)) as gateway,
        httpx.AsyncClient(base_url=gateway.http_base) as client,
    ):
        responses = await asyncio.gather(*(client.get("/api/v3/klines", params=query) for _ in range(40)))
        metrics = (await client.get("/metrics")).text
    assert {response.status_code for response in responses} == {200}
    assert len({response.content for response in responses}) == 1
    assert len(fake.rest_calls("klines")) == 1
    results = sorted(response.headers["x-pricegate-cache"] for response in responses)
    assert results.count("miss") == 1 and results.count("coalesced") + results.count("hit") == 39
    assert 'pricegate_gateway_rest_cache_results_total{endpoint="klines",result="miss"} 1.0' in metrics


async def test_replicas_elect_one_caller_through_a_redis_lock(
    store: PostgresCandleStore, fake: FakeBinance, redis_url: str, key_prefix: str
) -> None:
    fake.rest_delay_s = 0.3
    query: dict[str, str | int] = {"symbol": "BTCUSDT", "interval": "4h", "limit": 30}
    settings = gateway_settings(fake, redis_url, key_prefix)
    async with (
        running_gateway(MemoryBroker(), candles=store, **settings) as one,
        running_gateway(MemoryBroker(), candles=store, **settings) as two,
        httpx.AsyncClient() as client,
    ):
        requests = [client.get(f"{base}/api/v3/klines", params=query) for base in (one.http_base, two.http_base)] * 10
        responses = await asyncio.gather(*requests)
    assert {response.status_code for response in responses} == {200}
    assert len({response.content for response in responses}) == 1
    assert len(fake.rest_calls("klines")) == 1  # two replicas, twenty requests, one exchange call


async def test_an_exchange_failure_serves_the_last_good_body_marked_stale(
    store: PostgresCandleStore, fake: FakeBinance, redis_url: str, key_prefix: str
) -> None:
    # Fresh for no time at all: the cached body is stale from the start (kept cache_stale_s), with no wait.
    settings = gateway_settings(fake, redis_url, key_prefix, cache_ttl_klines_s="0")
    query: dict[str, str | int] = {"symbol": "ETHUSDT", "interval": "1d", "limit": 5}
    async with (
        running_gateway(MemoryBroker(), candles=store, **settings) as gateway,
        httpx.AsyncClient(base_url=gateway.http_base) as client,
    ):
        good = await client.get("/api/v3/klines", params=query)
        fake.fail_next_rest(10, 500)
        stale = await client.get("/api/v3/klines", params=query)
        assert stale.status_code == 200 and stale.headers["x-pricegate-cache"] == "stale"
        assert stale.content == good.content and int(stale.headers["age"]) >= 0
        never_cached = await client.get("/api/v3/klines", params={**query, "limit": 6})
        assert never_cached.status_code == 503
        assert never_cached.json() == {
            "code": -1001,
            "msg": "Internal error; unable to process your request. Please try again.",
        }
        assert never_cached.headers["retry-after"] == "1"


async def test_the_exchanges_429_makes_the_gateway_back_off(
    store: PostgresCandleStore, fake: FakeBinance, redis_url: str, key_prefix: str
) -> None:
    async with (
        running_gateway(MemoryBroker(), candles=store, **gateway_settings(fake, redis_url, key_prefix)) as gateway,
        httpx.AsyncClient(base_url=gateway.http_base) as client,
    ):
        fake.fail_next_rest(1, 429)  # with Retry-After: 1
        refused = await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1m", "limit": 3})
        assert refused.status_code == 503
        during = await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1m", "limit": 4})
        assert during.status_code == 503 and len(fake.rest_calls("klines")) == 1  # not even tried
        await asyncio.sleep(1.1)
        after = await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1m", "limit": 4})
        assert after.status_code == 200 and len(after.json()) == 4
        metrics = (await client.get("/metrics")).text
        assert 'pricegate_gateway_exchange_requests_total{endpoint="klines",result="backoff"} 1.0' in metrics


async def test_the_fallbacks_weight_budget_fails_fast_rather_than_keep_a_client_waiting(fake: FakeBinance) -> None:
    """The gateway's client (no patience, a pool) holds back what would overrun its budget and says so at once."""
    fake.wall_clock = lambda: 600.0  # one wall-clock minute for the whole test
    results: Counter[tuple[str, str]] = Counter()
    rest = BinanceRest(
        fake.rest_url,
        weight_limit_per_min=60,
        max_wait_s=0.0,
        max_connections=2,
        on_result=lambda endpoint, result: results.update([(endpoint, result)]),
        wall_clock=lambda: 600.0,
    )
    try:
        for _ in range(2):
            assert len(orjson.loads(await rest.depth("BTCUSDT", 500))["bids"]) == 500  # weight 25 each
        started = time.monotonic()
        with pytest.raises(RestUnavailable, match="budget"):
            await rest.depth("BTCUSDT", 500)  # 75 > 60: the next minute is 60 s away
        assert time.monotonic() - started < 1 and len(fake.rest_calls("depth")) == 2
        prices = orjson.loads(await rest.ticker_prices(["ETHUSDT", "BTCUSDT"]))  # weight 4 still fits
        assert [entry["symbol"] for entry in prices] == ["ETHUSDT", "BTCUSDT"]
        assert results == {("depth", "ok"): 2, ("depth", "backoff"): 1, ("ticker/price", "ok"): 1}
        assert rest.budget.used == 54  # Binance's weights (the fake charges less and says so: the larger wins)
    finally:
        await rest.aclose()


async def test_the_exchanges_own_refusal_reaches_the_client(
    store: PostgresCandleStore, fake: FakeBinance, redis_url: str, key_prefix: str
) -> None:
    async with (
        running_gateway(MemoryBroker(), candles=store, **gateway_settings(fake, redis_url, key_prefix)) as gateway,
        httpx.AsyncClient(base_url=gateway.http_base) as client,
    ):
        # SOLUSDT is in this gateway's symbol list but the exchange does not know it.
        response = await client.get("/api/v3/klines", params={"symbol": "SOLUSDT", "interval": "1h"})
    assert response.status_code == 400 and response.json() == {"code": -1121, "msg": "Invalid symbol."}


async def test_technicals_over_stored_and_fetched_candles(
    store: PostgresCandleStore, fake: FakeBinance, redis_url: str, key_prefix: str
) -> None:
    now_hour = current_hour()
    await store.upsert([stored_candle(now_hour - i * HOUR_MS) for i in range(300, 0, -1)])
    async with (
        running_gateway(MemoryBroker(), candles=store, **gateway_settings(fake, redis_url, key_prefix)) as gateway,
        httpx.AsyncClient(base_url=gateway.http_base) as client,
    ):
        technical = await client.get("/api/v1/technical/BTCUSDT", params={"interval": "1h"})
        again = await client.get("/api/v1/technical/BTCUSDT", params={"interval": "1h"})
        klines = await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "limit": 1000})
    candles = [candle_from_row("BTCUSDT", "1h", row) for row in klines.json()]
    assert len(candles) == 1000
    assert technical.content == technicals_json(analyse("BTCUSDT", "1h", candles))
    assert technical.headers["x-pricegate-cache"] == "miss" and again.headers["x-pricegate-cache"] == "hit"
    # one call for the technicals miss (none for its hit), one for the klines request (its own cache key)
    assert len(fake.rest_calls("klines")) == 2
    assert orjson.loads(technical.content)["candles"] == 1000


async def test_depth_and_prices_fall_back_to_the_exchange_without_streams(
    store: PostgresCandleStore, fake: FakeBinance, redis_url: str, key_prefix: str
) -> None:
    async with (
        running_gateway(MemoryBroker(), candles=store, **gateway_settings(fake, redis_url, key_prefix)) as gateway,
        httpx.AsyncClient(base_url=gateway.http_base) as client,
    ):
        depth = await client.get("/api/v3/depth", params={"symbol": "ETHUSDT", "limit": 100})
        depth_again = await client.get("/api/v3/depth", params={"symbol": "ETHUSDT", "limit": 100})
        price = await client.get("/api/v3/ticker/price", params={"symbol": "BTCUSDT"})
        everything = await client.get("/api/v3/ticker/price")
        demand = await gateway.node.broker.read_demand(time.time())
    book = depth.json()
    assert len(book["bids"]) == 100 and len(book["asks"]) == 100
    assert depth_again.headers["x-pricegate-cache"] == "hit" and len(fake.rest_calls("depth")) == 1
    assert price.json()["symbol"] == "BTCUSDT" and float(price.json()["price"]) > 0
    assert [entry["symbol"] for entry in everything.json()] == ["BTCUSDT", "ETHUSDT", "BNBUSDT"]
    assert everything.headers["x-mbx-used-weight-1m"] == str(5 + 5 + 2 + 4)
    # ... and ingest was asked to start the streams, so the next requests are answered from them.
    assert {"ethusdt@depth20@100ms", "btcusdt@miniTicker"} <= demand


async def test_depth_uses_the_streamed_book_when_deep_enough_and_when_the_exchange_fails(
    store: PostgresCandleStore, fake: FakeBinance, redis_url: str, key_prefix: str
) -> None:
    broker = MemoryBroker()
    bids = [[f"{100 - i}.00000000", "1.00000000"] for i in range(20)]
    asks = [[f"{101 + i}.00000000", "1.00000000"] for i in range(20)]
    async with (
        running_gateway(broker, candles=store, **gateway_settings(fake, redis_url, key_prefix)) as gateway,
        httpx.AsyncClient(base_url=gateway.http_base) as client,
    ):
        broker.publish_now(
            [message("btcusdt@depth20@100ms", {"lastUpdateId": 5, "bids": bids, "asks": asks})],
            int(time.time() * 1000),
        )
        shallow = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT", "limit": 10})
        assert shallow.json() == {"lastUpdateId": 5, "bids": bids[:10], "asks": asks[:10]}
        assert fake.rest_calls("depth") == []  # 20 streamed levels cover limit=10
        deep = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT", "limit": 500})
        assert len(deep.json()["bids"]) == 500 and len(fake.rest_calls("depth")) == 1  # deeper: the exchange
        fake.fail_next_rest(5, 503)
        degraded = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT", "limit": 1000})
        assert degraded.status_code == 200 and degraded.json() == {"lastUpdateId": 5, "bids": bids, "asks": asks}
