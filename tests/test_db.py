"""PostgreSQL plumbing on the real server: migrations applied once however many processes start together,
sessions confined to their schema, the statement timeout enforced, and the upsert's idempotence."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.candles.model import Candle
from shared.candles.postgres import PostgresCandleStore
from shared.db import create_pool, load_migrations, migrate, schema_version
from shared.errors import ConfigError, DatabaseError
from shared.settings import Settings

pytestmark = pytest.mark.integration


def candle(open_time: int, close: str = "2.00000000") -> Candle:
    return Candle(
        "ETHUSDT", "5m", open_time, open_time + 299_999, "1.00000000", "3.00000000", "0.50000000", close,
        "7.00000000", "14.00000000", 3, "1.00000000", "2.00000000",
    )  # fmt: skip


@pytest.fixture
async def other_schema(postgres_dsn: str) -> AsyncIterator[str]:
    schema = f"pgtest_{uuid.uuid4().hex[:12]}"
    yield schema
    connection = await asyncpg.connect(postgres_dsn)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # generated above
    finally:
        await connection.close()


async def test_replicas_migrating_at_once_apply_each_migration_once(postgres_dsn: str, pg_schema: str) -> None:
    pools = [
        await create_pool(postgres_dsn, schema=pg_schema, min_size=1, max_size=1, statement_timeout_ms=5000)
        for _ in range(5)
    ]
    try:
        applied = await asyncio.gather(*(migrate(pool, pg_schema) for pool in pools))
        assert sorted(len(batch) for batch in applied) == [0, 0, 0, 0, len(load_migrations())]
        assert await schema_version(pools[0]) == len(load_migrations())
        rows = await pools[0].fetch("SELECT version FROM pricegate_migrations ORDER BY version")
        assert [row["version"] for row in rows] == [1, 2]
    finally:
        for pool in pools:
            await pool.close()


async def test_each_schema_is_its_own_world(postgres_dsn: str, pg_schema: str, other_schema: str) -> None:
    one = await create_pool(postgres_dsn, schema=pg_schema, min_size=1, max_size=2, statement_timeout_ms=5000)
    two = await create_pool(postgres_dsn, schema=other_schema, min_size=1, max_size=2, statement_timeout_ms=5000)
    try:
        await migrate(one, pg_schema)
        await migrate(two, other_schema)
        await PostgresCandleStore(one).upsert([candle(0)])
        assert len(await PostgresCandleStore(one).range("ETHUSDT", "5m", 0, 2**62)) == 1
        assert await PostgresCandleStore(two).range("ETHUSDT", "5m", 0, 2**62) == []
    finally:
        await one.close()
        await two.close()


async def test_the_statement_timeout_cancels_long_statements(postgres_dsn: str, pg_schema: str) -> None:
    pool = await create_pool(postgres_dsn, schema=pg_schema, min_size=1, max_size=1, statement_timeout_ms=100)
    try:
        with pytest.raises(asyncpg.QueryCanceledError):
            await pool.fetchval("SELECT pg_sleep(2)")
        assert await pool.fetchval("SHOW statement_timeout") == "100ms"
    finally:
        await pool.close()


async def test_upserts_replace_and_are_idempotent(postgres_dsn: str, pg_schema: str) -> None:
    pool = await create_pool(postgres_dsn, schema=pg_schema, min_size=1, max_size=2, statement_timeout_ms=5000)
    try:
        await migrate(pool, pg_schema)
        store = PostgresCandleStore(pool)
        # duplicates inside one batch are fine (the last wins), and so is writing the same batch again
        assert await store.upsert([candle(0, "2.00000000"), candle(300_000), candle(0, "2.50000000")]) == 2
        written_at = await pool.fetchval("SELECT written_at FROM candles WHERE open_time = 0")
        assert await store.upsert([candle(0, "2.50000000"), candle(300_000)]) == 2
        assert await pool.fetchval("SELECT written_at FROM candles WHERE open_time = 0") == written_at  # untouched
        await store.upsert([candle(0, "2.75000000")])
        assert [c.close for c in await store.range("ETHUSDT", "5m", 0, 2**62)] == ["2.75000000", "2.00000000"]
    finally:
        await pool.close()


async def test_store_failures_are_database_errors(postgres_dsn: str, pg_schema: str) -> None:
    pool = await create_pool(postgres_dsn, schema=pg_schema, min_size=1, max_size=1, statement_timeout_ms=5000)
    try:
        with pytest.raises(DatabaseError, match="candle"):  # not migrated: no table
            await PostgresCandleStore(pool).range("ETHUSDT", "5m", 0, 1)
    finally:
        await pool.close()


def test_schema_names_and_database_urls_are_validated() -> None:
    with pytest.raises(ConfigError, match="PRICEGATE_DATABASE_SCHEMA"):
        Settings.from_env({"PRICEGATE_DATABASE_SCHEMA": 'x"; DROP SCHEMA public; --'})
    with pytest.raises(ConfigError, match="PRICEGATE_DATABASE_URL") as error:
        Settings.from_env({"PRICEGATE_DATABASE_URL": "mysql://user:secret@host/db"})
    assert "secret" not in str(error.value)
    with pytest.raises(ConfigError, match="PRICEGATE_CANDLE_INTERVALS"):
        Settings.from_env({"PRICEGATE_CANDLE_INTERVALS": "1m,2m"})
    with pytest.raises(ConfigError, match="PRICEGATE_DB_POOL_MIN"):
        Settings.from_env({"PRICEGATE_DB_POOL_MIN": "20", "PRICEGATE_DB_POOL_MAX": "10"})
