"""REST cache hit vs miss latency, over real HTTP against real gateways, in the same run.

Starts (in this process, each on a free port): gateways on the in-memory broker with the PostgreSQL candle
store (a fresh schema holding 1000 closed hourly candles of BTCUSDT, dropped afterwards) and the Redis response
cache (a unique key prefix, deleted afterwards):

- ``hit``:  default TTLs; one warm-up request, then every request is answered from Redis;
- ``miss``: TTLs of 0; every request reads PostgreSQL (klines) and also recomputes the indicators
            (technicals), then writes the cache;
- ``exchange miss`` (``--exchange``): empty store, Binance source pointed at the local fake exchange
            (tests/fake_binance.py) with TTLs of 0; excludes the internet's latency, so real misses are slower.

For ``GET /api/v3/klines?symbol=BTCUSDT&interval=1h&limit=1000`` (about 130 kB) and
``GET /api/v1/technical/BTCUSDT?interval=1h``, N sequential requests over one keep-alive connection each;
prints p50/p90/p99/mean per case and the miss/hit ratio of the medians. The last line is all figures as JSON.

    python -m loadtests.rest_cache --requests 500 --exchange
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import redis.asyncio as aioredis
import uvicorn

from gateway.app import create_app
from gateway.server import bound_port, uvicorn_config
from shared.broker.memory import MemoryBroker
from shared.candles.model import Candle, CandleStore
from shared.candles.postgres import PostgresCandleStore
from shared.db import open_pool
from shared.intervals import HOUR_MS, candle_window
from shared.settings import Settings

PATHS = {
    "klines": "/api/v3/klines?symbol=BTCUSDT&interval=1h&limit=1000",
    "technical": "/api/v1/technical/BTCUSDT?interval=1h",
}


def history(count: int) -> list[Candle]:
    """``count`` closed hourly candles ending where the current hour opens."""
    current = candle_window("1h", int(time.time() * 1000))[0]
    candles = []
    for i in range(count):
        open_time = current - (count - i) * HOUR_MS
        price = 90_000 + (i * 37) % 1000 + i
        candles.append(
            Candle(
                symbol="BTCUSDT",
                interval="1h",
                open_time=open_time,
                close_time=open_time + HOUR_MS - 1,
                open=f"{price}.00000000",
                high=f"{price + 150}.00000000",
                low=f"{price - 150}.00000000",
                close=f"{price + 20}.00000000",
                volume="12.34567000",
                quote_volume=f"{price * 12.34567:.8f}",
                trades=1234,
                taker_buy_base_volume="6.00000000",
                taker_buy_quote_volume=f"{price * 6:.8f}",
            )
        )
    return candles


@contextlib.asynccontextmanager
async def gateway(settings: Settings, candles: CandleStore | None) -> AsyncIterator[str]:
    broker = MemoryBroker()
    await broker.start()
    app = create_app(settings, broker, candles=candles)
    server = uvicorn.Server(uvicorn_config(app, settings))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{bound_port(server)}"
    finally:
        server.should_exit = True
        await task
        await broker.close()


async def measure(base: str, path: str, requests: int, *, expect: str) -> dict[str, Any]:
    timings: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        await client.get(path)  # warm-up: connection, and the first (miss) fill of the cache
        for _ in range(requests):
            started = time.perf_counter()
            response = await client.get(path)
            timings.append(time.perf_counter() - started)
            if response.status_code != 200 or response.headers.get("x-pricegate-cache") != expect:
                raise RuntimeError(f"{path}: {response.status_code} {response.headers.get('x-pricegate-cache')}")
        size = len(response.content)
    timings.sort()
    return {
        "requests": requests,
        "bytes": size,
        "p50_ms": round(statistics.median(timings) * 1000, 3),
        "p90_ms": round(timings[int(len(timings) * 0.9)] * 1000, 3),
        "p99_ms": round(timings[int(len(timings) * 0.99)] * 1000, 3),
        "mean_ms": round(statistics.fmean(timings) * 1000, 3),
    }


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--dsn", default=os.environ.get("PRICEGATE_DATABASE_URL", "postgresql://postgres@127.0.0.1/test")
    )
    parser.add_argument("--redis-url", default=os.environ.get("PRICEGATE_REDIS_URL", "redis://127.0.0.1:6379/9"))
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--exchange", action="store_true", help="also measure misses served by the fake exchange")
    args = parser.parse_args(argv)

    schema = f"pgbench_{uuid.uuid4().hex[:12]}"
    prefix = f"pgbench{uuid.uuid4().hex[:10]}"
    base = Settings(port=0, log_level="warning", symbols=("BTCUSDT",), redis_url=args.redis_url, channel_prefix=prefix)
    stored = base.with_overrides({"database_url": args.dsn, "database_schema": schema, "db_migrate_on_start": True})
    uncached = {"cache_ttl_klines_s": 0.0, "cache_ttl_technicals_s": 0.0}
    results: dict[str, dict[str, Any]] = {}
    pool = await open_pool(stored)
    store = PostgresCandleStore(pool)
    try:
        await store.upsert(history(1000))
        async with gateway(stored, store) as hit_base, gateway(stored.with_overrides(uncached), store) as miss_base:
            for endpoint, path in PATHS.items():
                results[f"{endpoint} hit"] = await measure(hit_base, path, args.requests, expect="hit")
                results[f"{endpoint} miss (PostgreSQL)"] = await measure(miss_base, path, args.requests, expect="miss")
        if args.exchange:
            from tests.fake_binance import FakeBinance

            async with FakeBinance(symbols=("BTCUSDT",)) as fake:
                remote = base.with_overrides({**uncached, "source": "binance", "binance_rest_url": fake.rest_url})
                async with gateway(remote, None) as exchange_base:
                    for endpoint, path in PATHS.items():
                        key = f"{endpoint} miss (local fake exchange)"
                        results[key] = await measure(exchange_base, path, args.requests, expect="miss")
    finally:
        async with pool.acquire() as connection:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # our generated name
        await store.close()
        client = aioredis.from_url(args.redis_url)
        keys = [key async for key in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()

    for name, figures in results.items():
        print(
            f"{name:38s} p50 {figures['p50_ms']:8.3f} ms  p90 {figures['p90_ms']:8.3f}  p99 {figures['p99_ms']:8.3f}  "
            f"mean {figures['mean_ms']:8.3f}  ({figures['bytes']:,} B)"
        )
    ratios = {}
    for endpoint in PATHS:
        hit = results[f"{endpoint} hit"]["p50_ms"]
        for name, figures in results.items():
            if name.startswith(f"{endpoint} miss"):
                ratios[name] = round(figures["p50_ms"] / hit, 1)
                print(f"{name:38s} x{ratios[name]} the hit median")
    print(json.dumps({"args": vars(args), "results": results, "miss_over_hit_p50": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
