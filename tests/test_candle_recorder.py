"""Closed candles from kline streams into the candle store: in memory, and through PostgreSQL failing and
recovering; the synthetic past the demo starts with."""

from __future__ import annotations

import asyncio
import itertools

import orjson
import pytest

from ingest.publish.candle_writer import CandleRecorder
from ingest.service import IngestService
from ingest.sources.synthetic.market import SyntheticMarket
from ingest.sources.synthetic.past_candles import synthetic_history
from ingest.sources.synthetic.source import SyntheticSource
from ingest.sources.synthetic.symbols import symbol_spec
from shared.broker.contract import OutgoingMessage
from shared.broker.memory import MemoryBroker
from shared.candles.memory import MemoryCandleStore
from shared.candles.model import Candle, candle_from_event
from shared.candles.postgres import PostgresCandleStore
from shared.db import create_pool, migrate
from shared.intervals import candle_window
from shared.settings import Settings
from tests.polling import eventually

MINUTE = 60_000
START = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def kline(symbol: str, interval: str, open_time: int, close: str, *, closed: bool) -> OutgoingMessage:
    payload = {
        "e": "kline", "E": open_time + MINUTE, "s": symbol,
        "k": {
            "t": open_time, "T": open_time + MINUTE - 1, "s": symbol, "i": interval, "f": 1, "L": 2, "o": "1.00000000",
            "c": close, "h": "2.00000000", "l": "0.50000000", "v": "3.00000000", "n": 2, "x": closed,
            "q": "4.00000000", "V": "1.00000000", "Q": "1.50000000", "B": "0",
        },
    }  # fmt: skip
    return OutgoingMessage(f"{symbol.lower()}@kline_{interval}", orjson.dumps(payload), True)


async def test_only_closed_candles_are_queued_once_per_key_and_written_in_batches() -> None:
    store = MemoryCandleStore()
    recorder = CandleRecorder(store, batch_size=2)
    recorder.observe(
        [
            kline("BTCUSDT", "1m", START, "1.10000000", closed=False),
            kline("BTCUSDT", "1m", START, "1.20000000", closed=True),
            kline("BTCUSDT", "1m", START, "1.30000000", closed=True),  # re-sent: replaces, not duplicates
            OutgoingMessage("btcusdt@trade", b'{"e":"trade"}', False),
            OutgoingMessage("btcusdt@kline_1m", b"not json", True),
            kline("ETHUSDT", "1m", START, "2.00000000", closed=True),
            kline("ETHUSDT", "1m", START + MINUTE, "2.10000000", closed=True),
        ]
    )
    assert recorder.pending == 3
    assert recorder.metrics.malformed._value.get() == 1
    assert await recorder.flush() == 3
    assert recorder.pending == 0
    assert [c.close for c in await store.range("BTCUSDT", "1m", 0, 2**62)] == ["1.30000000"]
    assert [c.close for c in await store.range("ETHUSDT", "1m", 0, 2**62)] == ["2.00000000", "2.10000000"]
    assert recorder.metrics.written._value.get() == 3


async def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    recorder = CandleRecorder(MemoryCandleStore(), batch_size=1, max_pending=3)
    recorder.observe([kline("BTCUSDT", "1m", START + i * MINUTE, "1.00000000", closed=True) for i in range(5)])
    assert recorder.pending == 3 and recorder.metrics.dropped._value.get() == 2
    await recorder.flush()
    stored = await recorder.store.range("BTCUSDT", "1m", 0, 2**62)
    assert [candle.open_time for candle in stored] == [START + i * MINUTE for i in (2, 3, 4)]


async def test_synthetic_market_closed_klines_become_stored_candles() -> None:
    market = SyntheticMarket(["BTCUSDT"], seed=3, trade_rate_per_s=20, start_ms=START + 5_000)
    store = MemoryCandleStore()
    recorder = CandleRecorder(store, symbols=["BTCUSDT"], intervals=["1m"])
    assert recorder.streams == {"btcusdt@kline_1m"}
    closed_payloads = []
    for step in range(1, 4 * 60 + 1):
        batch = market.advance(START + 5_000 + step * 1000, recorder.streams)
        recorder.observe([OutgoingMessage(stream, payload, True) for stream, payload in batch])
        closed_payloads += [payload for _, payload in batch if b'"x":true' in payload]
    await recorder.flush()
    stored = await store.range("BTCUSDT", "1m", 0, 2**62)
    assert [candle.open_time for candle in stored] == [START, START + MINUTE, START + 2 * MINUTE, START + 3 * MINUTE]
    assert stored == [candle_from_event(payload)[0] for payload in closed_payloads]


async def test_ingest_keeps_the_recorded_kline_streams_flowing_and_stores_their_candles() -> None:
    store = MemoryCandleStore()
    recorder = CandleRecorder(store, symbols=["BTCUSDT"], intervals=["1s"], flush_interval_s=0.05)
    settings = Settings(symbols=("BTCUSDT",))
    service = IngestService(settings, MemoryBroker(), SyntheticSource(["BTCUSDT"], seed=1), candles=recorder)
    assert "btcusdt@kline_1s" in service.wanted
    task = asyncio.create_task(service.run())
    try:

        async def two_recorded() -> bool:
            return len(await store.range("BTCUSDT", "1s", 0, 2**62)) >= 2

        await eventually(two_recorded, what="two 1s candles in the store")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    opens = [candle.open_time for candle in await store.range("BTCUSDT", "1s", 0, 2**62)]
    assert opens == sorted(opens) and all(b - a == 1000 for a, b in itertools.pairwise(opens))


@pytest.mark.integration
async def test_writes_are_retried_until_postgresql_accepts_them(postgres_dsn: str, pg_schema: str) -> None:
    pool = await create_pool(postgres_dsn, schema=pg_schema, min_size=1, max_size=2, statement_timeout_ms=5000)
    recorder = CandleRecorder(PostgresCandleStore(pool), batch_size=10, flush_interval_s=0.05)
    task = asyncio.create_task(recorder.run())
    try:
        recorder.observe([kline("BTCUSDT", "1m", START + i * MINUTE, f"1.{i:08d}", closed=True) for i in range(25)])
        # The schema does not exist yet: every write fails, and nothing may leave the queue.
        await eventually(lambda: recorder.metrics.write_errors._value.get() >= 1, what="a failed write")
        assert recorder.pending == 25
        await migrate(pool, pg_schema)
        await eventually(lambda: not recorder.pending, what="every candle written")
        stored = await PostgresCandleStore(pool).range("BTCUSDT", "1m", 0, 2**62)
        assert [candle.close for candle in stored] == [f"1.{i:08d}" for i in range(25)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.close()


def test_synthetic_history_ends_where_the_live_market_opens() -> None:
    now = START + 90 * MINUTE + 1234
    candles = synthetic_history(["BTCUSDT", "ETHUSDT"], ["1m", "1h", "1M"], count=50, before_ms=now, seed=7)
    assert candles == synthetic_history(["BTCUSDT", "ETHUSDT"], ["1m", "1h", "1M"], count=50, before_ms=now, seed=7)
    for symbol in ("BTCUSDT", "ETHUSDT"):
        spec = symbol_spec(symbol)
        for interval in ("1m", "1h", "1M"):
            series = [c for c in candles if c.symbol == symbol and c.interval == interval]
            assert len(series) == 50
            # contiguous windows, the newest ending where the live candle (the one containing now) opens
            for candle in series:
                assert (candle.open_time, candle.close_time + 1) == candle_window(interval, candle.open_time)
            assert all(a.close_time + 1 == b.open_time for a, b in itertools.pairwise(series))
            assert series[-1].close_time + 1 == candle_window(interval, now)[0]
            # the walk is continuous and closes at the live market's opening price
            assert all(a.close == b.open for a, b in itertools.pairwise(series))
            assert _atoms(series[-1].close) == spec.price_atoms
            for candle in series:
                assert _atoms(candle.low) <= min(_atoms(candle.open), _atoms(candle.close))
                assert _atoms(candle.high) >= max(_atoms(candle.open), _atoms(candle.close))
                assert _atoms(candle.low) % spec.tick_atoms == 0 and _atoms(candle.volume) % spec.step_atoms == 0
                assert 0 < _atoms(candle.taker_buy_base_volume) <= _atoms(candle.volume)


def _atoms(decimal: str) -> int:
    whole, _, fraction = decimal.partition(".")
    return int(whole) * 100_000_000 + int(fraction.ljust(8, "0"))


def test_candle_from_event_rejects_what_postgresql_would_refuse() -> None:
    good = orjson.loads(kline("BTCUSDT", "1m", START, "1.00000000", closed=True).payload)
    assert isinstance(candle_from_event(orjson.dumps(good))[0], Candle)
    for field, value in (("s", "BTC\x00USDT"), ("t", 2**63), ("T", START - 1), ("c", "1e5"), ("n", -1), ("i", "2m")):
        bad = {**good, "k": {**good["k"], field: value}}
        with pytest.raises(ValueError):
            candle_from_event(orjson.dumps(bad))
