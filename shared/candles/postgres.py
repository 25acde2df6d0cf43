"""PostgreSQL candle store (asyncpg): batched idempotent upserts and range reads on the ``candles`` table.

A batch is one statement: ``INSERT ... SELECT FROM unnest(<one array per column>) ON CONFLICT DO UPDATE``, so
thousands of candles cost one round trip and one transaction, with every value a bind parameter. Rows are
de-duplicated and sorted by key first: ``ON CONFLICT DO UPDATE`` refuses to touch a row twice in one statement,
and taking row locks in one global order is what keeps concurrent writers of overlapping batches from
deadlocking. Re-writing an identical candle changes nothing (the update is skipped), so re-delivered closed
candles cost no table churn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from shared.candles.model import Candle
from shared.errors import DatabaseError

# What a query can fail with: server errors, a broken or closed connection, pool-acquire and network timeouts.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

_UPSERT = """
INSERT INTO candles (
    symbol, kline_interval, open_time, close_time, open, high, low, close, volume, quote_volume, trades,
    taker_buy_base_volume, taker_buy_quote_volume)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::numeric[], $6::numeric[], $7::numeric[],
    $8::numeric[], $9::numeric[], $10::numeric[], $11::bigint[], $12::numeric[], $13::numeric[])
ON CONFLICT (symbol, kline_interval, open_time) DO UPDATE SET
    close_time = excluded.close_time,
    open = excluded.open,
    high = excluded.high,
    low = excluded.low,
    close = excluded.close,
    volume = excluded.volume,
    quote_volume = excluded.quote_volume,
    trades = excluded.trades,
    taker_buy_base_volume = excluded.taker_buy_base_volume,
    taker_buy_quote_volume = excluded.taker_buy_quote_volume,
    written_at = now()
WHERE (candles.close_time, candles.open, candles.high, candles.low, candles.close, candles.volume,
       candles.quote_volume, candles.trades, candles.taker_buy_base_volume, candles.taker_buy_quote_volume)
    IS DISTINCT FROM
      (excluded.close_time, excluded.open, excluded.high, excluded.low, excluded.close, excluded.volume,
       excluded.quote_volume, excluded.trades, excluded.taker_buy_base_volume, excluded.taker_buy_quote_volume)
"""

# ::text keeps each numeric's own scale ("94250.01000000"), exactly the string that was written.
_RANGE = """
SELECT open_time, close_time, open::text, high::text, low::text, close::text, volume::text, quote_volume::text,
       trades, taker_buy_base_volume::text, taker_buy_quote_volume::text
FROM candles
WHERE symbol = $1 AND kline_interval = $2 AND open_time BETWEEN $3 AND $4
ORDER BY open_time
"""


def upsert_arguments(candles: Sequence[Candle]) -> list[list[Any]]:
    """The 13 column arrays of one upsert: de-duplicated by key (the last write wins) and sorted by key."""
    unique = sorted({candle.key: candle for candle in candles}.values(), key=lambda candle: candle.key)
    return [
        [c.symbol for c in unique],
        [c.interval for c in unique],
        [c.open_time for c in unique],
        [c.close_time for c in unique],
        [c.open for c in unique],
        [c.high for c in unique],
        [c.low for c in unique],
        [c.close for c in unique],
        [c.volume for c in unique],
        [c.quote_volume for c in unique],
        [c.trades for c in unique],
        [c.taker_buy_base_volume for c in unique],
        [c.taker_buy_quote_volume for c in unique],
    ]


class PostgresCandleStore:
    """Candles in PostgreSQL. ``pool`` is an asyncpg pool from :func:`shared.db.open_pool`; the store owns it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def upsert(self, candles: Sequence[Candle]) -> int:
        if not candles:
            return 0
        arguments = upsert_arguments(candles)
        try:
            await self.pool.execute(_UPSERT, *arguments)
        except _DRIVER_ERRORS as error:
            raise DatabaseError(f"writing {len(arguments[0])} candle(s) failed: {error!r}") from error
        return len(arguments[0])

    async def range(self, symbol: str, interval: str, first_open: int, last_open: int) -> list[Candle]:
        try:
            rows = await self.pool.fetch(_RANGE, symbol, interval, first_open, last_open)
        except _DRIVER_ERRORS as error:
            raise DatabaseError(f"reading {symbol} {interval} candles failed: {error!r}") from error
        return [Candle(symbol, interval, *row) for row in rows]

    async def close(self) -> None:
        await self.pool.close()
