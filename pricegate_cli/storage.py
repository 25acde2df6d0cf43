"""Candle storage for the commands: the PostgreSQL store (scaled mode), the demo's in-memory store pre-filled
with synthetic history, the ingest-side recorder, and ``pricegate db migrate | status``.

A database that is unreachable or not migrated at start is a configuration error naming
``PRICEGATE_DATABASE_URL`` (with any password redacted), reported like an unreachable Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ingest.publish.candle_writer import CandleRecorder
from ingest.sources.synthetic.past_candles import synthetic_history
from shared.candles.memory import MemoryCandleStore
from shared.candles.model import CandleStore
from shared.candles.postgres import PostgresCandleStore
from shared.db import create_pool, load_migrations, migrate, open_pool, schema_version
from shared.errors import ConfigError, DatabaseError
from shared.redaction import redact_url
from shared.settings import Settings, env_name

# Past and live candles the demo keeps per (symbol, interval): the history plus a day of live 1m candles.
DEMO_SERIES_HEADROOM = 1440


def _config_error(settings: Settings, error: DatabaseError) -> ConfigError:
    return ConfigError(env_name("database_url"), redact_url(settings.database_url or ""), str(error))


async def open_candle_store(settings: Settings) -> CandleStore | None:
    """The PostgreSQL candle store when ``database_url`` is set (schema checked or migrated), else None."""
    if not settings.database_url:
        return None
    try:
        return PostgresCandleStore(await open_pool(settings))
    except DatabaseError as error:
        raise _config_error(settings, error) from None


async def demo_candle_store(settings: Settings, history_before_ms: int | None) -> CandleStore:
    """PostgreSQL if configured; otherwise memory, pre-filled with synthetic candles ending at
    ``history_before_ms`` (the synthetic market's start; None for a replay, which brings its own)."""
    store = await open_candle_store(settings)
    if store is not None:
        return store
    memory = MemoryCandleStore(max_per_series=settings.demo_history_candles + DEMO_SERIES_HEADROOM)
    if history_before_ms is not None and settings.demo_history_candles:
        history = await asyncio.to_thread(
            synthetic_history,
            settings.symbols,
            settings.candle_intervals,
            count=settings.demo_history_candles,
            before_ms=history_before_ms,
            seed=settings.synthetic_seed,
            trade_rate_per_s=settings.synthetic_trade_rate,
        )
        memory.upsert_now(history)
    return memory


def candle_recorder(settings: Settings, store: CandleStore, registry: Any) -> CandleRecorder:
    return CandleRecorder(
        store,
        symbols=settings.symbols,
        intervals=settings.candle_intervals,
        batch_size=settings.candle_batch_size,
        flush_interval_s=settings.candle_flush_interval_s,
        registry=registry,
    )


async def run_db(settings: Settings, action: str) -> str:
    """``pricegate db migrate`` applies pending migrations; ``status`` reports the schema's version."""
    if not settings.database_url:
        raise ConfigError(env_name("database_url"), "", "required for this command (e.g. postgresql://host/db)")
    try:
        pool = await create_pool(
            settings.database_url,
            schema=settings.database_schema,
            min_size=1,
            max_size=1,
            statement_timeout_ms=0,  # migrations may legitimately run long
        )
    except DatabaseError as error:
        raise _config_error(settings, error) from None
    try:
        latest = len(await asyncio.to_thread(load_migrations))
        if action == "migrate":
            applied = await migrate(pool, settings.database_schema)
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied) or "none (already current)"
            return f"schema {settings.database_schema}: applied {names}; now at version {latest}"
        version = await schema_version(pool)
        state = "current" if version == latest else f"behind: run `pricegate db migrate` to reach {latest}"
        return f"schema {settings.database_schema}: version {version} ({state})"
    except DatabaseError as error:
        raise _config_error(settings, error) from None
    finally:
        await pool.close()
