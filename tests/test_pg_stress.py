"""The SQLite failure, reversed: many concurrent candle writers and API-key readers on the real PostgreSQL end
with zero errors (no lock errors, no deadlocks, no timeouts) and no lost rows. Writers' key ranges overlap, so
the same candles are upserted by two writers at once: idempotence and deadlock-free lock ordering are part of
what is checked. Sized to run in a few seconds; loadtests/candle_writes.py measures throughput."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from gateway.auth.api_keys import ApiKeys
from loadtests.candle_writes import START, candle_at
from shared.candles.postgres import PostgresCandleStore
from shared.db import open_pool
from shared.intervals import MINUTE_MS
from shared.settings import Settings

pytestmark = pytest.mark.integration

WRITERS = 50
UPSERTS_PER_WRITER = 2000
BATCH = 100
READERS = 10


async def test_concurrent_writers_and_key_readers_lose_nothing_and_fail_never(
    postgres_dsn: str, pg_schema: str
) -> None:
    settings = Settings(
        database_url=postgres_dsn,
        database_schema=pg_schema,
        db_migrate_on_start=True,
        db_pool_min=2,
        db_pool_max=20,  # fewer connections than writers: they queue for the pool, they do not fail
        db_statement_timeout_ms=5000,
    )
    pool = await open_pool(settings)
    try:
        store, keys = PostgresCandleStore(pool), ApiKeys(pool)
        labels = {await keys.create(f"bot-{i}"): f"bot-{i}" for i in range(20)}
        revoked = await keys.create("revoked")
        assert await keys.revoke(revoked)
        writers_done = asyncio.Event()
        lookups = 0

        async def writer(number: int) -> int:
            # Writer n covers minutes [n*1000, n*1000+2000): half of its candles are also written by writer n+1.
            first = number * UPSERTS_PER_WRITER // 2
            indexes = list(range(first, first + UPSERTS_PER_WRITER))
            random.Random(number).shuffle(indexes)  # batches arrive in any order; the store sorts within one
            written = 0
            for start in range(0, len(indexes), BATCH):
                written += await store.upsert([candle_at(i) for i in indexes[start : start + BATCH]])
            return written

        async def reader(number: int) -> None:
            nonlocal lookups
            rng = random.Random(1000 + number)
            choices = list(labels)
            while not writers_done.is_set():
                key = rng.choice(choices)
                found = await keys.lookup(key)
                assert found is not None and found.label == labels[key]
                assert await keys.lookup(revoked) is None
                await store.range("BTCUSDT", "1m", START, START + 100 * MINUTE_MS)
                lookups += 1

        readers = [asyncio.create_task(reader(n)) for n in range(READERS)]
        started = time.perf_counter()
        results = await asyncio.gather(*(writer(n) for n in range(WRITERS)), return_exceptions=True)
        elapsed = time.perf_counter() - started
        writers_done.set()
        reader_results = await asyncio.gather(*readers, return_exceptions=True)

        errors = [r for r in [*results, *reader_results] if isinstance(r, BaseException)]
        assert errors == []
        assert sum(r for r in results if isinstance(r, int)) == WRITERS * UPSERTS_PER_WRITER
        assert lookups > WRITERS  # readers really ran alongside the writers

        distinct = (WRITERS - 1) * UPSERTS_PER_WRITER // 2 + UPSERTS_PER_WRITER
        stored = await store.range("BTCUSDT", "1m", 0, 2**62)
        assert len(stored) == distinct
        assert stored == [candle_at(i) for i in range(distinct)]  # every row, exactly as written
        print(f"{WRITERS * UPSERTS_PER_WRITER} upserts by {WRITERS} writers in {elapsed:.2f}s, {lookups} reads")
    finally:
        await pool.close()


async def test_api_keys_issue_look_up_and_revoke(postgres_dsn: str, pg_schema: str) -> None:
    pool = await open_pool(Settings(database_url=postgres_dsn, database_schema=pg_schema, db_migrate_on_start=True))
    try:
        keys = ApiKeys(pool)
        key = await keys.create("trading bot")
        assert len(key) == 64 and key != await keys.create("trading bot")
        found = await keys.lookup(key)
        assert found is not None and found.label == "trading bot"
        assert await keys.lookup(key.upper()) is None  # keys are case-sensitive, like Binance's
        assert await keys.lookup("") is None and await keys.lookup("k" * 10_000) is None
        assert await keys.lookup("' OR '1'='1") is None
        stored = await pool.fetchval("SELECT count(*) FROM api_keys WHERE key_sha256 = convert_to($1, 'UTF8')", key)
        assert stored == 0  # the key itself is not in the table, only its digest
        assert await keys.revoke(key) and not await keys.revoke(key)
        assert await keys.lookup(key) is None
    finally:
        await pool.close()
