"""Candle storage as a user runs it: ``pricegate db migrate | status``, a gateway refusing an un-migrated
schema, ingest persisting closed candles to PostgreSQL for the gateway to serve, and the demo serving klines
and technicals from memory with no database at all."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from tests.polling import eventually
from tests.processes import free_port, run_pricegate, start_pricegate

pytestmark = pytest.mark.integration


async def test_db_migrate_and_status(postgres_dsn: str, pg_schema: str) -> None:
    env = {"PRICEGATE_DATABASE_URL": postgres_dsn, "PRICEGATE_DATABASE_SCHEMA": pg_schema}
    code, output = await run_pricegate("db", "status", env=env)
    assert (code, output.strip()) == (
        0,
        f"schema {pg_schema}: version 0 (behind: run `pricegate db migrate` to reach 2)",
    )
    code, output = await run_pricegate("db", "migrate", env=env)
    assert (code, output.strip()) == (0, f"schema {pg_schema}: applied 0001_candles, 0002_api_keys; now at version 2")
    code, output = await run_pricegate("db", "migrate", "--database-schema", pg_schema, env=env)
    assert (code, output.strip()) == (0, f"schema {pg_schema}: applied none (already current); now at version 2")
    code, output = await run_pricegate("db", "status", env=env)
    assert (code, output.strip()) == (0, f"schema {pg_schema}: version 2 (current)")
    connection = await asyncpg.connect(postgres_dsn)
    try:
        tables = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", pg_schema)
    finally:
        await connection.close()
    assert {row["tablename"] for row in tables} == {"candles", "api_keys", "pricegate_migrations"}


async def test_db_commands_need_a_database_and_never_print_its_password() -> None:
    code, output = await run_pricegate("db", "migrate", env={"PRICEGATE_DATABASE_URL": ""})
    assert code == 2 and "PRICEGATE_DATABASE_URL" in output and "required" in output
    unreachable = f"postgresql://pricegate:s3cret@127.0.0.1:{free_port()}/test"
    code, output = await run_pricegate("db", "status", env={"PRICEGATE_DATABASE_URL": unreachable})
    assert code == 2 and "PRICEGATE_DATABASE_URL" in output
    assert "s3cret" not in output and "pricegate:***@" in output and "Traceback" not in output


async def test_a_gateway_refuses_to_start_on_an_unmigrated_schema(
    postgres_dsn: str, pg_schema: str, redis_url: str
) -> None:
    env = {
        "PRICEGATE_REDIS_URL": redis_url,
        "PRICEGATE_DATABASE_URL": postgres_dsn,
        "PRICEGATE_DATABASE_SCHEMA": pg_schema,
    }
    code, output = await run_pricegate("gateway", "--port", str(free_port()), env=env)
    assert code == 2
    assert "PRICEGATE_DATABASE_URL" in output and "version 0" in output and "pricegate db migrate" in output


async def test_ingest_stores_closed_candles_and_the_gateway_serves_them(
    postgres_dsn: str, pg_schema: str, redis_url: str
) -> None:
    env = {
        "PRICEGATE_REDIS_URL": redis_url,
        "PRICEGATE_CHANNEL_PREFIX": f"pgtest{uuid.uuid4().hex[:10]}",
        "PRICEGATE_DATABASE_URL": postgres_dsn,
        "PRICEGATE_DATABASE_SCHEMA": pg_schema,
        "PRICEGATE_DB_MIGRATE_ON_START": "true",
        "PRICEGATE_SYMBOLS": "BTCUSDT",
        "PRICEGATE_CANDLE_INTERVALS": "1s",
        "PRICEGATE_CANDLE_FLUSH_INTERVAL_S": "0.2",
        "PRICEGATE_CACHE_TTL_KLINES_S": "0",
        "PRICEGATE_INGEST_METRICS_PORT": "0",
        "PRICEGATE_SHUTDOWN_DRAIN_S": "0.5",
    }
    port = free_port()
    ingest = await start_pricegate("ingest", env=env)
    gateway = await start_pricegate("gateway", "--port", str(port), env=env)
    try:
        await gateway.wait_for_line(r"pricegate is serving on")
        connection = await asyncpg.connect(postgres_dsn, server_settings={"search_path": pg_schema})
        try:

            async def four_recorded() -> bool:
                count: int = await connection.fetchval("SELECT count(*) FROM candles WHERE kline_interval = '1s'")
                return count >= 4

            await eventually(four_recorded, timeout=15, interval=0.2, what="four 1s candles in PostgreSQL")
            stored = await connection.fetch(
                "SELECT open_time, close::text FROM candles WHERE symbol = 'BTCUSDT' AND kline_interval = '1s' "
                "ORDER BY open_time DESC LIMIT 3"
            )
        finally:
            await connection.close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            oldest = stored[-1]["open_time"]
            rows = (
                await client.get(
                    "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1s", "startTime": oldest, "limit": 3}
                )
            ).json()
        assert [(row[0], row[4]) for row in rows] == [(r["open_time"], r["close"]) for r in reversed(stored)]
    finally:
        assert await gateway.stop() == 0
        assert await ingest.stop() == 0


async def test_demo_serves_klines_and_technicals_without_a_database() -> None:
    port = free_port()
    demo = await start_pricegate(
        "demo", "--port", str(port), "--symbols", "BTCUSDT,ETHUSDT", "--candle-intervals", "1s,1h",
        "--shutdown-drain-s", "0.5",
        # Uncached klines: the test polls for a live candle, and a cached body would answer every poll alike.
        env={"PRICEGATE_DATABASE_URL": "", "PRICEGATE_CACHE_TTL_KLINES_S": "0"},
    )  # fmt: skip
    try:
        await demo.wait_for_line(r"pricegate is serving on")
        serving_ms = time.time() * 1000  # after the live market opened, so after every synthetic past candle
        assert any("in-memory candles" in line for line in demo.output)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def newest_seconds() -> list[list[Any]]:
                params: dict[str, str | int] = {"symbol": "BTCUSDT", "interval": "1s", "limit": 5}
                rows: list[list[Any]] = (await client.get("/api/v3/klines", params=params)).json()
                return rows

            async def a_live_second_recorded() -> bool:
                rows = await newest_seconds()
                return bool(rows) and rows[-1][0] >= serving_ms

            # Waited for, not slept for: how soon the first live 1s candle closes and is recorded depends on the
            # machine's load.
            await eventually(a_live_second_recorded, what="a live 1s candle in the demo's store")
            hours = (
                await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "limit": 1000})
            ).json()
            technical = (await client.get("/api/v1/technical/ETHUSDT", params={"interval": "1h"})).json()
            seconds = await newest_seconds()
        # 999 synthetic past hours and the open one: history from the first second
        assert len(hours) == 1000
        assert all(b[0] - a[0] == 3_600_000 for a, b in itertools.pairwise(hours))
        assert technical["candles"] == 1000 and technical["ema"]["200"] is not None
        assert technical["trend"]["direction"] in ("bullish", "bearish", "neutral")
        # the synthetic 1s stream pushes only closed candles: the open second may be missing from the newest five
        assert 4 <= len(seconds) <= 5 and all(b[0] - a[0] == 1000 for a, b in itertools.pairwise(seconds))
        assert seconds[-1][0] >= time.time() * 1000 - 3000  # live, recorded while the demo ran
    finally:
        assert await demo.stop() == 0
